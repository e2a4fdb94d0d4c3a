"""Rank a next-item sample's candidates with a causal LM, three ways, and score CTR answers.

Modes (:data:`RANKING_MODES`, chosen at evaluation time through :func:`rank_candidates`):

``generate``
    The LLaRA/iLoRA protocol: greedy decoding (up to 64 new tokens), first line of the stripped text, lower-cased
    substring match against the candidate titles (:func:`~recadapt.llm.decoding.generate_rank`). ValidRatio and
    HitRatio@1 as the papers compute them; the only protocol comparable with their published numbers.
``constrained``
    Greedy decoding restricted to the candidates' token sequences (a prefix trie), stopping as soon as one
    candidate is left (:func:`~recadapt.llm.decoding.constrained_rank`). Always a valid candidate; a handful of
    forwards instead of a title's worth.
``score``
    Length-normalised log-likelihood of every candidate after the shared prompt
    (:func:`~recadapt.llm.scoring.score_candidates`): one prompt pass, then one pass over all candidates packed
    side by side after it, each seeing the prompt and its own tokens only (a 4-D attention mask). A full ranking,
    so HitRatio@K and NDCG@K apply.

CTR prompts are scored by :func:`yes_probability` (softmax over the "Yes"/"No" answer-token logits, as in ReLLa).
This module is the evaluation entry point; the modes live in :mod:`recadapt.llm.decoding` and
:mod:`recadapt.llm.scoring`, on the batched forwards of :mod:`recadapt.llm.session`.

Inputs are already tokenized, so nothing here depends on how prompts are built. A prompt is a 1-D sequence of
token ids or a float tensor ``[T, H]`` of input embeddings (LLaRA's hybrid prompts, where projected item
embeddings replace placeholder tokens; give them as the model's input-embedding layer would output them, scaling
included). A batch may mix both: id prompts are then embedded with that layer. A candidate is the token ids of its
title exactly as the model should write it right after the prompt (a tokenizer can merge across a boundary, so
tokenize the title in the form the prompt leaves it, e.g. with its leading space after ``"Answer:"``), and
``answer_suffix_ids`` (a newline, or the chat end-of-turn token) is appended to every candidate: it marks where
the answer ends, so a title that is a prefix of another ("Heat", "Heat Wave") is still told apart and its score
includes "and then the answer stops".

Batching never changes a row's result beyond floating point: prompts are left-padded with explicit position ids,
padded slots stay masked in the KV cache, and rows leave the batch as they finish. Run the model in eval mode;
for reduced precision wrap the call in ``backbone.autocast()`` (these functions use whatever precision the caller
sets up; log-probabilities are always taken in float32).

Per-instance conditioning (iLoRA's CRM sequence representation, RecLoRA's user vector) is an explicit argument:
``cond`` [len(prompts), d] is passed to every model forward as ``model(..., cond=rows_cond)``, sliced to the rows
of that forward. Rows are dropped as they finish (and, in ``score`` mode under an attention kernel that takes no
4-D mask, repeated once per candidate, user-major), and ``cond`` follows them; the model must accept the ``cond``
keyword (e.g. :class:`recadapt.adapters.AdaptedModel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from recadapt.llm.decoding import DEFAULT_MAX_NEW_TOKENS, constrained_rank, generate_rank
from recadapt.llm.scoring import DEFAULT_SCORE_BATCH_SIZE, score_candidates
from recadapt.llm.session import DEFAULT_BATCH_SIZE, Prompt, _as_prompts, _check_eval, _chunks, _Session

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RankingMode = Literal["generate", "constrained", "score"]
RANKING_MODES: tuple[RankingMode, ...] = ("generate", "constrained", "score")


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Ranking:
    """One mode's outcome over B samples with C candidates each, in a form the metrics take directly.

    ``scores`` [B, C], higher is better: the candidates' normalised log-likelihoods in ``score`` mode (a full
    ranking); in ``generate`` and ``constrained`` mode 1.0 at the chosen candidate and 0.0 elsewhere (a top-1
    only: with :func:`recadapt.tasks.metrics.target_ranks`' pessimistic ties an unchosen target ranks last, so
    HitRatio@1 is exact and HitRatio@K for K > 1 equals it). ``predicted`` [B] is the top candidate, -1 for an
    invalid generated answer; ``valid`` [B] is False only there; ``texts`` holds the generated first lines.
    """

    mode: RankingMode
    scores: np.ndarray
    predicted: np.ndarray
    valid: np.ndarray
    texts: list[str] | None = field(default=None)


# ---------------------------------------------------------------------------------------------------------------
# CTR


@torch.inference_mode()
def yes_probability(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    yes_id: int,
    no_id: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """p(Yes) per prompt: softmax over the "Yes" and "No" token logits at the answer position (ReLLa's CTR score).

    Only the two answer tokens compete, so the probability is defined however much mass the model puts elsewhere.
    Returns float32 [B] on the CPU.
    """
    _check_eval(model)
    tensors = _as_prompts(model, prompts)
    probs = torch.zeros(len(tensors), dtype=torch.float32)
    for chunk in _chunks(len(tensors), batch_size):
        session = _Session(model, cond)
        logits = session.prefill([tensors[i] for i in chunk], torch.tensor(list(chunk)))[:, -1]
        pair = logits[:, [yes_id, no_id]].float()
        probs[list(chunk)] = pair.softmax(dim=-1)[:, 0].cpu()
    return probs


# ---------------------------------------------------------------------------------------------------------------
# one entry point for evaluation


def rank_candidates(
    mode: RankingMode,
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    candidate_token_ids: Sequence[Sequence[Sequence[int]]],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    candidate_titles: Sequence[Sequence[str]] | None = None,
    answer_suffix_ids: Sequence[int] = (),
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    cond: torch.Tensor | None = None,
) -> Ranking:
    """Rank with the chosen mode and return a :class:`Ranking` (``generate`` needs ``tokenizer`` and titles)."""
    n = len(prompts)
    if mode == "generate":
        if tokenizer is None or candidate_titles is None:
            raise ValueError("mode 'generate' needs the tokenizer and the candidate titles")
        results = generate_rank(
            model,
            tokenizer,
            prompts,
            candidate_titles,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            cond=cond,
        )
        predicted = np.array([r.predicted_index for r in results], dtype=np.int64)
        n_candidates = len(candidate_titles[0]) if n else 0
        return Ranking(
            mode, _one_hot(predicted, n_candidates), predicted, predicted >= 0, [r.text for r in results]
        )
    if mode == "constrained":
        predicted = constrained_rank(
            model,
            prompts,
            candidate_token_ids,
            answer_suffix_ids=answer_suffix_ids,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            cond=cond,
        )
        n_candidates = len(candidate_token_ids[0]) if n else 0
        return Ranking(mode, _one_hot(predicted, n_candidates), predicted, np.ones(n, dtype=bool))
    if mode == "score":
        scores = score_candidates(
            model,
            prompts,
            candidate_token_ids,
            answer_suffix_ids=answer_suffix_ids,
            batch_size=batch_size or DEFAULT_SCORE_BATCH_SIZE,
            cond=cond,
        ).numpy()
        predicted = scores.argmax(axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        return Ranking(mode, scores.astype(np.float64), predicted, np.ones(n, dtype=bool))
    raise ValueError(f"unknown ranking mode {mode!r}; use one of {', '.join(RANKING_MODES)}")


def _one_hot(predicted: np.ndarray, n_candidates: int) -> np.ndarray:
    scores = np.zeros((len(predicted), n_candidates), dtype=np.float64)
    rows = np.flatnonzero(predicted >= 0)
    scores[rows, predicted[rows]] = 1.0
    return scores
