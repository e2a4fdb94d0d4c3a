"""From a trained run to a user's top-k: :func:`load` rebuilds any run (a conventional recommender, an LLM
next-item or CTR run, a full-ranking Laser/DARec run) as a :class:`Recommender` with one interface.

``recommend(history, k)`` ranks the catalogue (CRMs, full-ranking methods) or, for an LLM ranker that reads a
candidate list, re-ranks candidates: the ones given, or a retrieval stage's top-N (the run's own CRM, or any run
that ranks the catalogue: the CRM top-N -> LLM re-rank pipeline of :func:`load_pipeline`). ``score(history,
items)`` returns the model's score of each item. The batched forms (``recommend_many``, ``score_many``) score
every request of a batch in one forward: personalized adapters (iLoRA's gate, RecLoRA's user mix) are computed
per row inside it from each row's own conditioning, never by swapping weights per user.

Histories are the dataset's item ids (as in its files) or exact titles, oldest first; results name the dataset's
ids. Every bad input raises :class:`~recadapt.serving.catalogue.RequestError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from recadapt.errors import ConfigError
from recadapt.serving.catalogue import Catalogue, ItemRef, Recommendation, RequestError

MAX_HISTORY = 1000  # items a request's history may hold (a model reads its most recent max_len of them)
DEFAULT_CANDIDATES = (
    20  # the retrieval stage's top-N for a CTR ranker (next-item rankers use their protocol's)
)


@dataclass
class Query:
    """One request, resolved to item ids: ``candidates`` to rank or score (None: the catalogue, or the
    retrieval stage's top-N), ``user`` (the dataset's user, when known) and, for CTR prompts, the history's
    ``ratings`` (NaN where unknown)."""

    history: np.ndarray
    k: int = 10
    candidates: np.ndarray | None = None
    exclude_seen: bool = True
    user: int | None = None
    ratings: np.ndarray | None = None


class Recommender:
    """A trained run that answers requests. Subclasses implement :meth:`_candidate_scores` and, when they rank
    the whole catalogue, :meth:`_catalogue_scores`."""

    kind: ClassVar[str]
    ranks_catalogue: ClassVar[bool] = True  # else it re-ranks candidates (given, or from the retriever)

    def __init__(self, run_dir: Path, config: Any, prepared: Any) -> None:
        self.run_dir, self.config, self.prepared = Path(run_dir), config, prepared
        self.catalogue = Catalogue(prepared.items, prepared.users, prepared.n_items)
        self.protocol: str = config.data.protocol
        self.max_history = MAX_HISTORY
        self.retriever: Recommender | None = None
        self.n_candidates = 0  # the retriever's top-N (rankers of candidates only)
        self.needs_user = False  # the model reads a user id (user embeddings, a per-user random vector)

    # --- building requests -------------------------------------------------------------------------------------

    def query(
        self,
        history: Sequence[ItemRef],
        k: int = 10,
        candidates: Sequence[ItemRef] | None = None,
        exclude_seen: bool = True,
        user: ItemRef | None = None,
        ratings: Sequence[float | None] | None = None,
        *,
        scoring: bool = False,
    ) -> Query:
        """Check and resolve one request (``scoring``: ``candidates`` are the items to score, all kept)."""
        what = "items" if scoring else "candidates"
        if isinstance(history, str | bytes) or not isinstance(history, Sequence):
            raise RequestError("history", "a list of item ids or titles")
        if not history:
            raise RequestError("history", "empty: give at least one item the user interacted with")
        if len(history) > self.max_history:
            raise RequestError("history", f"{len(history)} items, at most {self.max_history}")
        ids = self.catalogue.items(history, "history")
        user_id = self.catalogue.user(user)
        if self.needs_user and user_id is None:
            raise RequestError("user", f"this {self.kind} run reads a user id: give the dataset's user")
        rating_values = None
        if ratings is not None:
            if len(ratings) != len(history):
                raise RequestError("ratings", f"{len(ratings)} ratings for {len(history)} history items")
            try:
                rating_values = np.array([np.nan if r is None else float(r) for r in ratings])
            except (TypeError, ValueError):
                raise RequestError("ratings", "numbers (or null where unknown)") from None
        chosen = None
        if candidates is not None:
            if isinstance(candidates, str | bytes) or not isinstance(candidates, Sequence):
                raise RequestError(what, "a list of item ids or titles")
            if not candidates:
                raise RequestError(what, "empty")
            if len(candidates) > self.catalogue.n_items:
                raise RequestError(
                    what, f"{len(candidates)} items, the catalogue has {self.catalogue.n_items}"
                )
            chosen = self.catalogue.items(candidates, what)
            if scoring:
                exclude_seen = False
            elif len(np.unique(chosen)) != len(chosen):
                raise RequestError(what, "an item is listed twice")
            if exclude_seen:
                chosen = chosen[~np.isin(chosen, ids)]
                if not len(chosen):
                    raise RequestError(what, "every candidate is in the history (exclude_seen is on)")
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise RequestError("k", f"an integer, got {type(k).__name__}")
        if not scoring:
            available = self._available(chosen, ids, exclude_seen)
            if not 1 <= k <= available:
                raise RequestError("k", f"must be between 1 and {available}, got {k}")
        return Query(ids, int(k), chosen, bool(exclude_seen), user_id, rating_values)

    def _available(self, candidates: np.ndarray | None, history: np.ndarray, exclude_seen: bool) -> int:
        """How many items a request may ask for: its candidates, the retriever's top-N, or the catalogue."""
        if candidates is not None:
            return len(candidates)
        if not self.ranks_catalogue:
            if self.retriever is None:
                raise RequestError(
                    "candidates",
                    f"this {self.kind} run re-ranks candidates and has no retrieval stage: give the candidates, "
                    "or load it with a retriever (recadapt.load(run, retriever=CRM_RUN))",
                )
            return self.n_candidates
        seen = len(np.unique(history)) if exclude_seen else 0
        return self.catalogue.n_items - seen

    # --- the public API ----------------------------------------------------------------------------------------

    def recommend(
        self,
        history: Sequence[ItemRef],
        k: int = 10,
        candidates: Sequence[ItemRef] | None = None,
        exclude_seen: bool = True,
        user: ItemRef | None = None,
    ) -> list[Recommendation]:
        """The ``k`` best items for a user with this history (oldest first), best first."""
        return self.run_recommend([self.query(history, k, candidates, exclude_seen, user)])[0]

    def recommend_many(
        self,
        histories: Sequence[Sequence[ItemRef]],
        k: int = 10,
        candidates: Sequence[Sequence[ItemRef]] | None = None,
        exclude_seen: bool = True,
        users: Sequence[ItemRef | None] | None = None,
    ) -> list[list[Recommendation]]:
        """:meth:`recommend` for many users, scored in batched forwards."""
        queries = [
            self.query(
                h,
                k,
                None if candidates is None else candidates[n],
                exclude_seen,
                None if users is None else users[n],
            )
            for n, h in enumerate(histories)
        ]
        return self.run_recommend(queries)

    def score(
        self, history: Sequence[ItemRef], items: Sequence[ItemRef], user: ItemRef | None = None
    ) -> list[Recommendation]:
        """The model's score of each of ``items`` (in their order) for a user with this history."""
        return self.score_many([history], [items], [user])[0]

    def score_many(
        self,
        histories: Sequence[Sequence[ItemRef]],
        items: Sequence[Sequence[ItemRef]],
        users: Sequence[ItemRef | None] | None = None,
    ) -> list[list[Recommendation]]:
        if len(items) != len(histories):
            raise RequestError("items", f"{len(items)} item lists for {len(histories)} histories")
        queries = [
            self.query(h, 1, items[n], False, None if users is None else users[n], scoring=True)
            for n, h in enumerate(histories)
        ]
        return self.run_score(queries)

    @torch.no_grad()
    def run_recommend(self, queries: Sequence[Query]) -> list[list[Recommendation]]:
        """Top-k of resolved queries: catalogue rows in one batch, candidate rows in another."""
        results: list[list[Recommendation]] = [[] for _ in queries]
        open_rows = [n for n, q in enumerate(queries) if q.candidates is None]
        if open_rows and self.ranks_catalogue:
            scores = self._catalogue_scores([queries[n] for n in open_rows])
            for row, n in enumerate(open_rows):
                line = scores[row].astype(np.float64, copy=True)
                if queries[n].exclude_seen:
                    line[queries[n].history] = -np.inf
                results[n] = self._top(np.arange(len(line)), line, queries[n].k)
            open_rows = []
        queries = list(queries)
        if open_rows:  # the retrieval stage: the retriever's top-N become the candidates
            assert self.retriever is not None
            retrieved = self.retriever.run_recommend(
                [dataclasses.replace(queries[n], k=self.n_candidates) for n in open_rows]
            )
            for n, found in zip(open_rows, retrieved, strict=True):
                picked = np.array([self.catalogue.item(r.item, "candidates") for r in found], dtype=np.int64)
                queries[n] = dataclasses.replace(queries[n], candidates=picked)
        rows = [n for n, q in enumerate(queries) if q.candidates is not None]
        if rows:
            scored = self._candidate_scores([queries[n] for n in rows])
            for n, values in zip(rows, scored, strict=True):
                results[n] = self._top(queries[n].candidates, values, queries[n].k)
        return results

    @torch.no_grad()
    def run_score(self, queries: Sequence[Query]) -> list[list[Recommendation]]:
        scored = self._candidate_scores(queries)
        describe = self.catalogue.describe
        return [
            [describe(int(i), float(s)) for i, s in zip(q.candidates, values, strict=True)]
            for q, values in zip(queries, scored, strict=True)
        ]

    def _top(self, items: np.ndarray, scores: np.ndarray, k: int) -> list[Recommendation]:
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:k]  # ties: the lower index first
        return [self.catalogue.describe(int(items[i]), scores[i]) for i in order if np.isfinite(scores[i])]

    def info(self) -> dict[str, Any]:
        """What the run is: model, data, protocol, its test metrics, the retrieval stage."""
        metrics_file = self.run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        return {
            "run": str(self.run_dir),
            "kind": self.kind,
            "model": self.config.model_name,
            "dataset": self.config.data.dataset,
            "protocol": self.protocol,
            "n_items": self.catalogue.n_items,
            "ranks": "catalogue" if self.ranks_catalogue else "candidates",
            "retriever": None if self.retriever is None else str(self.retriever.run_dir),
            "n_candidates": self.n_candidates or None,
            "max_history": self.max_history,
            "needs_user": self.needs_user,
            "test": metrics.get("test", {}),
        }

    # --- the model's side --------------------------------------------------------------------------------------

    def _catalogue_scores(self, queries: Sequence[Query]) -> np.ndarray:
        """[len(queries), n_items]: every item's score."""
        raise NotImplementedError(f"{type(self).__name__} ranks candidates only")

    def _candidate_scores(self, queries: Sequence[Query]) -> list[np.ndarray]:
        """Each query's scores of its ``candidates``."""
        raise NotImplementedError


class CRMRecommender(Recommender):
    """A conventional recommender run (SASRec, GRU4Rec, Caser, BERT4Rec, DIN): logits over the catalogue, or
    p(click) for a CTR run."""

    kind = "crm"

    def __init__(self, run_dir: Path, config: Any, prepared: Any, model: torch.nn.Module) -> None:
        super().__init__(run_dir, config, prepared)
        self.model = model.eval()
        self.max_len = int(config.train.max_len)
        self.needs_user = getattr(model, "user_embedding", None) is not None

    def _batch(self, queries: Sequence[Query]) -> dict[str, torch.Tensor]:
        from recadapt.data.batching import pad_histories

        device = next(self.model.parameters()).device
        history = pad_histories([q.history for q in queries], self.max_len, int(self.model.pad_id))
        users = [0 if q.user is None else q.user for q in queries]
        return {
            "history": torch.from_numpy(history).to(device),
            "user_id": torch.tensor(users, dtype=torch.int64, device=device),
        }

    def _outputs(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.float()
        return (torch.sigmoid(logits) if self.protocol == "ctr" else logits).cpu().numpy()

    def _catalogue_scores(self, queries: Sequence[Query]) -> np.ndarray:
        return self._outputs(self.model.score_all(self._batch(queries)))

    def _candidate_scores(self, queries: Sequence[Query]) -> list[np.ndarray]:
        width = max(len(q.candidates) for q in queries)
        padded = np.zeros((len(queries), width), dtype=np.int64)  # item 0 fills short rows, then is cut off
        for n, q in enumerate(queries):
            padded[n, : len(q.candidates)] = q.candidates
        batch = self._batch(queries)
        scores = self._outputs(
            self.model.score_candidates(batch, torch.from_numpy(padded).to(batch["history"].device))
        )
        return [scores[n, : len(q.candidates)] for n, q in enumerate(queries)]


class FullRankRecommender(Recommender):
    """A full-ranking LLM run (Laser, DARec): the user embedding against the item table it saved."""

    kind = "fullrank"

    def __init__(self, run_dir: Path, config: Any, prepared: Any, model: Any, table: torch.Tensor) -> None:
        super().__init__(run_dir, config, prepared)
        self.model, self.table = model.eval(), table
        self.max_len = int(config.train.max_len)

    def _catalogue_scores(self, queries: Sequence[Query]) -> np.ndarray:
        histories = [q.history[-self.max_len :] for q in queries]
        users, _ = self.model.user_embeddings(histories)
        return self.model.logits(users, self.table).float().cpu().numpy()

    def _candidate_scores(self, queries: Sequence[Query]) -> list[np.ndarray]:
        scores = self._catalogue_scores(queries)
        return [scores[n, q.candidates] for n, q in enumerate(queries)]


class LLMRecommender(Recommender):
    """An LLM run (TALLRec, LLaRA, iLoRA, RecLoRA, ReLLa, ReLLaX, zero-shot) that re-ranks candidates: by each
    candidate's log-likelihood per answer token after the prompt (next-item, the ``score`` mode), or by p(Yes)
    for a CTR run (one prompt per candidate). Prompts are built exactly as the run's evaluation builds them."""

    kind = "llm"
    ranks_catalogue = False

    def __init__(self, loaded: Any) -> None:
        from recadapt.llm.samples import resolve_domain

        super().__init__(loaded.run_dir, loaded.config, loaded.prepared)
        self.loaded = loaded
        llm = loaded.llm
        self.domain = resolve_domain(loaded.config.data.dataset, llm.domain)
        self.embedder = loaded.embedder
        cond = (
            loaded.cond_source
        )  # a CRM with user embeddings must be told the user (a random vector need not)
        self.needs_user = cond is not None and getattr(cond.crm, "user_embedding", None) is not None
        test = loaded.prepared.parts.get("test")
        if self.protocol != "ctr" and test is not None and len(test):
            self.n_candidates = len(test["candidates"].iloc[0])
        else:
            self.n_candidates = DEFAULT_CANDIDATES

    def _frame(self, queries: Sequence[Query]) -> pd.DataFrame:
        """The queries as a protocol part: one row per query (next-item), one per (query, candidate) (ctr)."""
        new_user = self._anonymous_user()
        rows: list[dict[str, Any]] = []
        for q in queries:
            user = new_user if q.user is None else q.user
            if self.protocol != "ctr":
                rows.append(
                    {
                        "user_id": user,
                        "history": q.history,
                        "target": int(q.candidates[0]),
                        "candidates": q.candidates,
                    }
                )
                continue
            ratings = q.ratings if q.ratings is not None else np.full(len(q.history), np.nan)
            rows.extend(
                {
                    "user_id": user,
                    "target": int(item),
                    "label": 0,  # prompts do not read it (the answer only sizes the token budget)
                    "history": q.history,
                    "history_ratings": ratings,
                }
                for item in q.candidates
            )
        return pd.DataFrame(rows)

    def _anonymous_user(self) -> int:
        """The user id of a request that names none: one past the known users (no profile, no embedding)."""
        return int(self.prepared.n_users)

    def _candidate_scores(self, queries: Sequence[Query]) -> list[np.ndarray]:
        from recadapt.llm.samples import PromptFactory
        from recadapt.tasks.llm import score_rows
        from recadapt.train.llm import apply_retrieval

        loaded, llm = self.loaded, self.loaded.llm
        request = dataclasses.replace(self.prepared, parts={"request": self._frame(queries)})
        factory = PromptFactory(
            request,
            "request",
            self.domain,
            loaded.config.train.max_len,
            llm.item_tags,
            llm.item_placement,
            llm.user_token,
        )
        if loaded.item_vectors is not None:
            apply_retrieval(factory, loaded.item_vectors)
        scores = score_rows(
            loaded.model,
            loaded.encoder,
            factory,
            np.arange(len(factory)),
            embedder=self.embedder,
            max_tokens=llm.max_prompt_tokens,
            batch_size=llm.eval_batch_size,
            autocast=loaded.autocast,
            cond_source=loaded.cond_source,
            retrieved=loaded.item_vectors is not None,
        )
        if self.protocol != "ctr":
            return scores
        flat = np.concatenate(scores)
        bounds = np.cumsum([0, *(len(q.candidates) for q in queries)])
        return [flat[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


# --- loading -------------------------------------------------------------------------------------------------------


def load(
    path: str | Path, *, retriever: str | Path | None = None, n_candidates: int | None = None
) -> Recommender:
    """The :class:`Recommender` of a finished run directory, or of a pipeline YAML (:func:`load_pipeline`).

    ``retriever``: a run that ranks the catalogue (e.g. a SASRec run) whose top ``n_candidates`` an LLM ranker
    re-ranks when a request gives no candidates; default: the LLM run's own ``llm.crm_run``, when it is one.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return load_pipeline(path)
    recommender = load_run(path)
    if not recommender.ranks_catalogue:
        _attach_retriever(recommender, retriever, n_candidates)
    elif retriever is not None:
        raise ConfigError(path, "retriever", f"this {recommender.kind} run ranks the whole catalogue itself")
    return recommender


def load_run(run_dir: Path) -> Recommender:
    """A run directory's recommender, by the recipe of its model."""
    from recadapt.data.store import prepared_for
    from recadapt.methods.registry import method
    from recadapt.train.config import load_config

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    recipe = method(config.model_name).recipe
    if recipe == "llm":
        from recadapt.train.llm import load_llm_run

        return LLMRecommender(load_llm_run(run_dir))
    if recipe == "fullrank":
        from recadapt.train.fullrank import BEST_DIR, build_run, load_trainable

        if not (run_dir / BEST_DIR).is_dir():
            raise FileNotFoundError(
                f"{run_dir} holds no trained model (no {BEST_DIR}/ folder); train it first"
            )
        model, prepared, _ = build_run(config, progress=False)
        table = load_trainable(model, run_dir / BEST_DIR)
        if table is None:
            with torch.no_grad():
                table = model.item_table()
        return FullRankRecommender(run_dir, config, prepared, model, table)
    from recadapt.cf.checkpoint import load_crm

    if not (run_dir / "best").is_dir():
        raise FileNotFoundError(f"{run_dir} holds no trained model (no best/ folder); train it first")
    return CRMRecommender(run_dir, config, prepared_for(config.data), load_crm(run_dir / "best"))


def _attach_retriever(ranker: Recommender, retriever: str | Path | None, n_candidates: int | None) -> None:
    llm = ranker.config.llm
    source, field = (
        (retriever, "retriever") if retriever is not None else (getattr(llm, "crm_run", None), "llm.crm_run")
    )
    if n_candidates is not None:
        if n_candidates < 1:
            raise ConfigError(ranker.run_dir, "n_candidates", f"must be >= 1, got {n_candidates}")
        ranker.n_candidates = int(n_candidates)
    if source is None:
        return  # requests must then give their candidates
    stage = load_run(Path(source))
    if not stage.ranks_catalogue:
        raise ConfigError(
            ranker.run_dir, field, f"{source} re-ranks candidates; a retriever ranks the catalogue"
        )
    if (
        stage.config.data.dataset != ranker.config.data.dataset
        or stage.catalogue.n_items != ranker.catalogue.n_items
    ):
        raise ConfigError(
            ranker.run_dir,
            field,
            f"{source} was trained on {stage.config.data.dataset!r}, the ranker on {ranker.config.data.dataset!r}",
        )
    ranker.retriever = stage


PIPELINE_KEYS = ("ranker", "retriever", "candidates")


def load_pipeline(path: Path) -> Recommender:
    """A retrieve-then-rank pipeline from one YAML file::

        ranker: runs/llara-lastfm-next-item-s0      # the run that orders the candidates
        retriever: runs/sasrec-lastfm-next-item-s0  # a run that ranks the catalogue (default: the ranker's CRM)
        candidates: 20                              # the retriever's top-N the ranker sees

    Relative paths are read from the current directory. Errors name the file, line and field."""
    from recadapt.train.config import _read_yaml

    source = str(path)
    raw, lines, _ = _read_yaml(path.read_text(encoding="utf-8"), source)
    if not isinstance(raw, dict):
        raise ConfigError(source, None, "a pipeline file is a mapping with ranker, retriever and candidates")
    for key in raw:
        if key not in PIPELINE_KEYS:
            raise ConfigError(
                f"{source}:{lines.get(key, '?')}", key, f"unknown key (known: {', '.join(PIPELINE_KEYS)})"
            )
    if "ranker" not in raw:
        raise ConfigError(source, "ranker", "missing: the run directory that ranks")
    candidates = raw.get("candidates")
    if candidates is not None and (
        isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1
    ):
        raise ConfigError(
            f"{source}:{lines.get('candidates', '?')}",
            "candidates",
            f"a positive integer, got {candidates!r}",
        )
    return load(raw["ranker"], retriever=raw.get("retriever"), n_candidates=candidates)
