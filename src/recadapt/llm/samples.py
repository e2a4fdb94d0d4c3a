"""Prompt samples for the LLM recipe: :class:`PromptFactory` turns the rows of a persisted protocol part into
prompts and answers (titles, tags, ReLLa's retrieved view); :class:`PromptDataset` makes each sample one typed
record, tokenized once with its history fitted to the token budget, and collates records into training batches
or evaluation prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from recadapt.data.prepare import Prepared
from recadapt.data.splits import CANDIDATE_PROTOCOLS
from recadapt.errors import ConfigError
from recadapt.llm.encoding import EncodedBatch, ItemTokenizer, Tokenized
from recadapt.llm.prompt_templates import load_templates
from recadapt.llm.prompts import (
    Prompt,
    build_ctr_prompt,
    build_next_item_prompt,
    ctr_answer,
    describe_item,
    pick_template_index,
)

# prompt templates per shipped dataset (llm.domain=auto); other datasets get the generic "item" domain
DOMAIN_BY_DATASET = {
    "ml-100k": "movie",
    "ml-1m-ctr": "movie",
    "movielens-llara-test": "movie",
    "lastfm": "artist",
    "steam-llara-test": "game",
}


def resolve_domain(dataset: str, requested: str = "auto") -> str:
    """The prompt-template domain: ``requested`` unless ``auto``, else from the dataset name (``item`` if unknown)."""
    if requested != "auto":
        load_templates(requested)  # an unknown domain fails here, listing the known ones
        return requested
    return DOMAIN_BY_DATASET.get(dataset, "item")


class PromptFactory:
    """Prompts and answers for the rows of one protocol part (next-item, sampled-ranking or ctr), titles from
    ``prepared.items``.

    ``history_len`` caps a prompt's history at the most recent items; :meth:`prompt` can keep fewer (``n_history``)
    so a long sample fits the token budget.
    """

    def __init__(
        self,
        prepared: Prepared,
        part: str,
        domain: str,
        history_len: int,
        item_tags: int = 0,
        item_placement: str = "after",
        user_token: bool = False,
    ) -> None:
        self.protocol, self.part = prepared.protocol, part
        if self.protocol not in (*CANDIDATE_PROTOCOLS, "ctr"):
            raise ValueError(f"LLM prompts exist for next-item, sampled-ranking and ctr, not {self.protocol}")
        # next-item and sampled-ranking prompts list the persisted candidates; ctr asks Yes/No for the target
        self.ranks_candidates = self.protocol in CANDIDATE_PROTOCOLS
        self.domain = load_templates(domain)
        self.frame = prepared.parts[part].reset_index(drop=True)
        self.titles = item_titles(prepared.items, prepared.n_items)
        # how prompts write each item: the title, with up to item_tags tags when asked; answers stay titles
        self.names = self.titles
        if item_tags:
            tags = item_tag_lists(prepared.items, prepared.n_items, str(prepared.manifest.get("dataset", "")))
            self.names = [
                describe_item(t, g[:item_tags], self.domain) for t, g in zip(self.titles, tags, strict=True)
            ]
        self.history_len = history_len
        self.item_placement = item_placement  # hybrid prompts: the placeholder after or before each title
        self.user_token = user_token  # hybrid next-item prompts: a placeholder for the CRM's user vector
        self.n_templates = len(self.domain.next_item.templates)
        self.users = self.frame["user_id"].to_numpy(np.int64)
        self.targets = self.frame["target"].to_numpy(np.int64)
        # the whole history (a CRM conditioning a personalized adapter may read more than the prompt shows)
        self.full_histories = [np.asarray(h, dtype=np.int64) for h in self.frame["history"]]
        self.histories = [h[-history_len:] for h in self.full_histories]
        self.candidates: list[np.ndarray] = []
        self.labels: np.ndarray | None = None
        self.ratings: list[np.ndarray] = []
        self.full_ratings: list[np.ndarray] = []
        # ReLLa's retrieved view: positions into each full history (set by set_retrieval), else None
        self.retrieved: list[np.ndarray] | None = None
        self.profiles: dict[int, dict[str, Any]] = {}
        if self.ranks_candidates:
            self.candidates = [np.asarray(c, dtype=np.int64) for c in self.frame["candidates"]]
        else:
            self.labels = self.frame["label"].to_numpy(np.int64)
            self.full_ratings = [np.asarray(r, dtype=np.float64) for r in self.frame["history_ratings"]]
            self.ratings = [r[-history_len:] for r in self.full_ratings]
            users = prepared.users.drop(columns=["raw_id"], errors="ignore")
            self.profiles = {int(row.pop("user_id")): row for row in users.to_dict("records")}

    def __len__(self) -> int:
        return len(self.frame)

    def set_retrieval(self, positions: Sequence[np.ndarray]) -> None:
        """Give every row a retrieved view: ``positions`` (ascending) into its full history, e.g. ReLLa's SUBR
        top-K (:func:`recadapt.llm.retrieval.retrieval_positions`)."""
        if len(positions) != len(self):
            raise ValueError(f"{len(positions)} retrieved views for {len(self)} rows")
        self.retrieved = [np.asarray(p, dtype=np.int64) for p in positions]

    def view(self, row: int, retrieved: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The history items (oldest first) and, for ctr, their ratings that ``row``'s prompt shows: the most
        recent ``history_len`` items, or the retrieved ones."""
        ratings = self.ratings[row] if self.ratings else None
        if not retrieved:
            return self.histories[row], ratings
        if self.retrieved is None:
            raise ValueError("no retrieved view: call set_retrieval first")
        keep = self.retrieved[row]
        return self.full_histories[row][keep], (self.full_ratings[row][keep] if self.full_ratings else None)

    def n_history(self, row: int, retrieved: bool = False) -> int:
        return len(self.view(row, retrieved)[0])

    def prompt(
        self,
        row: int,
        *,
        n_history: int | None = None,
        template: int = 0,
        hybrid: bool = False,
        retrieved: bool = False,
    ) -> Prompt:
        """The prompt of ``row`` with the ``n_history`` most recent items of its view (default: all kept)."""
        history, ratings = self.view(row, retrieved)
        keep = len(history) if n_history is None else n_history
        history = history[len(history) - keep :]
        history_titles = [self.names[i] for i in history]
        if self.ranks_candidates:
            candidates = self.candidates[row]
            return build_next_item_prompt(
                history_titles,
                [self.names[i] for i in candidates],
                self.domain,
                template,
                hybrid,
                history_ids=history.tolist(),
                candidate_ids=candidates.tolist(),
                placement=self.item_placement,
                user_token=self.user_token,
            )
        assert ratings is not None
        return build_ctr_prompt(
            history_titles,
            self.names[self.targets[row]],
            self.domain,
            history_ratings=ratings[len(ratings) - keep :].tolist(),
            profile=self.profiles.get(int(self.users[row])),
            hybrid=hybrid,
            history_ids=history.tolist(),
            target_id=int(self.targets[row]),
            placement=self.item_placement,
        )

    def answer(self, row: int) -> str:
        """The training answer: the target title (next-item) or "Yes."/"No." (ctr)."""
        if self.labels is not None:
            return ctr_answer(int(self.labels[row]), self.domain)
        return self.titles[self.targets[row]]

    def template(self, row: int, *, seed: int, epoch: int) -> int:
        """The next-item template of ``row`` in ``epoch`` (a fresh seeded draw per epoch; ctr has one)."""
        if not self.ranks_candidates:
            return 0
        return pick_template_index(self.n_templates, seed=seed, sample_index=row, epoch=epoch)


def item_titles(items: pd.DataFrame, n_items: int) -> list[str]:
    """Titles indexed by item id; an item without one is called by its source id."""
    titles = [f"item {i}" for i in range(n_items)]
    raw = items["raw_id"] if "raw_id" in items else items["item_id"]
    title_column = items["title"] if "title" in items else pd.Series([None] * len(items))
    for item_id, title, source in zip(items["item_id"], title_column, raw, strict=True):
        text = str(title).strip() if isinstance(title, str) else ""
        titles[int(item_id)] = text or f"item {source}"
    return titles


def item_tag_lists(items: pd.DataFrame, n_items: int, dataset: str = "") -> list[list[str]]:
    """Each item's tags (the items table's ``tags`` column, else ``genres``; '|' joined, most telling first),
    indexed by item id. Raises ``ConfigError`` on ``llm.item_tags`` when the table has neither."""
    column = next((c for c in ("tags", "genres") if c in items), None)
    if column is None:
        raise ConfigError(
            "config",
            "llm.item_tags",
            f"the {dataset or 'dataset'} items have no tags or genres column to show",
        )
    lists: list[list[str]] = [[] for _ in range(n_items)]
    for item_id, text in zip(items["item_id"], items[column], strict=True):
        if isinstance(text, str) and text.strip():
            lists[int(item_id)] = [t.strip() for t in text.split("|") if t.strip()]
    return lists


@dataclass(frozen=True)
class SampleKey:
    """Which sample to build: a row of the part, the template, hybrid or text prompt, and ReLLa's view."""

    row: int
    template: int = 0
    hybrid: bool = False
    retrieved: bool = False


@dataclass(frozen=True)
class SampleRecord:
    """One sample, built and tokenized once: its prompt (history fitted to the token budget), answer and tokens,
    and what a conditioned adapter reads (the user and the whole history), so a batch carries its own
    conditioning."""

    key: SampleKey
    prompt: Prompt
    answer: str
    tokens: Tokenized
    n_history: int
    user: int
    history: np.ndarray
    # the item a ctr prompt asks about (an input, like the history); -1 where the prompt lists candidates, whose
    # answer must never reach the conditioning
    query_item: int = -1


class PromptDataset(torch.utils.data.Dataset):
    """The samples of one protocol part as records (torchtune's ``SFTTransform``, litgpt's ``SFTDataset``): item
    ``key`` is the :class:`SampleRecord` of that row, template, prompt kind and view, with the prompt + answer
    fitted to ``max_tokens`` by dropping the oldest history items one at a time, each sample on its own. The
    collate functions make training batches (:meth:`training_batch`) and evaluation prompts
    (:meth:`prompt_batch`) from the same records."""

    def __init__(self, factory: PromptFactory, encoder: ItemTokenizer, max_tokens: int) -> None:
        self.factory, self.encoder, self.max_tokens = factory, encoder, max_tokens

    def __len__(self) -> int:
        return len(self.factory)

    def __getitem__(self, key: SampleKey) -> SampleRecord:
        factory, row = self.factory, key.row
        answer = factory.answer(row)
        keep = factory.n_history(row, key.retrieved)
        while True:
            prompt = factory.prompt(
                row, n_history=keep, template=key.template, hybrid=key.hybrid, retrieved=key.retrieved
            )
            (tokens,) = self.encoder.tokenize([prompt], [answer])
            if len(tokens) <= self.max_tokens:
                return SampleRecord(
                    key,
                    prompt,
                    answer,
                    tokens,
                    keep,
                    int(factory.users[row]),
                    factory.full_histories[row],
                    -1 if factory.ranks_candidates else int(factory.targets[row]),
                )
            if keep == 0:
                raise ValueError(
                    f"sample {row} needs {len(tokens)} tokens without any history, over "
                    f"llm.max_prompt_tokens={self.max_tokens}; raise it"
                )
            keep -= 1

    def records(self, keys: Sequence[SampleKey]) -> list[SampleRecord]:
        return [self[key] for key in keys]

    def training_batch(self, records: Sequence[SampleRecord]) -> EncodedBatch:
        """Prompt + answer, right-padded, labels on the answers."""
        return self.encoder.pad([r.tokens for r in records], answers=True)

    def prompt_batch(self, records: Sequence[SampleRecord]) -> EncodedBatch:
        """The prompts alone, left-padded: what ranking and p(Yes) read."""
        return self.encoder.pad([r.tokens for r in records], answers=False)


def conditioning_inputs(
    records: Sequence[SampleRecord],
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The users, whole histories and query items (ctr targets, else -1) of ``records``: what a
    :class:`~recadapt.cf.runs.CondSource` reads."""
    return (
        np.array([r.user for r in records], dtype=np.int64),
        [r.history for r in records],
        np.array([r.query_item for r in records], dtype=np.int64),
    )
