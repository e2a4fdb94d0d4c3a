"""What a request names, resolved to the ids a run was trained with: items by the dataset's own id or by title,
users by the dataset's own id. Every error names the field and the offending value, so the HTTP layer can
answer 4xx with it as it stands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recadapt.llm.samples import item_titles

ItemRef = int | str  # the dataset's item id (as in its files) or an exact title (case-insensitive)


class RequestError(ValueError):
    """A request a recommender cannot answer as given: ``field`` names the part (``history[3]``, ``k``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class Recommendation:
    """One recommended (or scored) item: the dataset's id, its title, the model's score (higher is better;
    log-likelihood per answer token for LLM rankers, p(click) for CTR models)."""

    item: str
    title: str
    score: float

    def to_dict(self) -> dict[str, object]:
        return {"item": self.item, "title": self.title, "score": self.score}


class Catalogue:
    """Item ids, titles and user ids of a prepared split, with lookups both ways."""

    def __init__(self, items: pd.DataFrame, users: pd.DataFrame, n_items: int) -> None:
        self.n_items = n_items
        self.titles = item_titles(items, n_items)
        raw = items["raw_id"] if "raw_id" in items else items["item_id"]
        self.raw_ids = [str(i) for i in range(n_items)]
        for item_id, source in zip(items["item_id"], raw, strict=True):
            self.raw_ids[int(item_id)] = str(source)
        self._by_raw = {r: i for i, r in enumerate(self.raw_ids)}
        by_title: dict[str, list[int]] = {}
        for i, title in enumerate(self.titles):
            by_title.setdefault(title.casefold(), []).append(i)
        self._by_title = by_title
        user_raw = users["raw_id"] if "raw_id" in users else users.get("user_id", pd.Series([], dtype=str))
        self._users = {str(r): int(u) for u, r in zip(users.get("user_id", []), user_raw, strict=True)}

    def item(self, ref: ItemRef, field: str) -> int:
        """The id of ``ref``: the dataset's item id first, else a unique title."""
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise RequestError(field, f"an item is its id or title, got {type(ref).__name__}")
        key = str(ref).strip()
        if key in self._by_raw:
            return self._by_raw[key]
        matches = self._by_title.get(key.casefold(), [])
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(self.raw_ids[i] for i in matches[:5])
            raise RequestError(
                field, f"the title {key!r} names {len(matches)} items (ids {ids}); give the id"
            )
        raise RequestError(field, f"unknown item {key!r} (neither an item id nor a title of this dataset)")

    def items(self, refs: Sequence[ItemRef], field: str) -> np.ndarray:
        return np.array([self.item(r, f"{field}[{n}]") for n, r in enumerate(refs)], dtype=np.int64)

    def user(self, ref: ItemRef | None, field: str = "user") -> int | None:
        """The id of the dataset's user ``ref``; None when no user is given."""
        if ref is None:
            return None
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise RequestError(field, f"a user is the dataset's user id, got {type(ref).__name__}")
        key = str(ref).strip()
        if key not in self._users:
            raise RequestError(field, f"unknown user {key!r}")
        return self._users[key]

    def describe(self, item: int, score: float) -> Recommendation:
        return Recommendation(self.raw_ids[item], self.titles[item], float(score))
