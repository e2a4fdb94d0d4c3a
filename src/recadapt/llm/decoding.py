"""The ``generate`` and ``constrained`` ranking modes: greedy decoding, free or restricted to the candidates.

``generate`` is the papers' protocol (decode, then match the first line against the titles by their rule);
``constrained`` walks the candidates' prefix trie so the answer is always a candidate. Both pick one candidate
(a top-1), unlike :mod:`recadapt.llm.scoring`. Conventions: :mod:`recadapt.llm.ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from recadapt.llm.session import (
    DEFAULT_BATCH_SIZE,
    Prompt,
    _as_prompts,
    _candidate_tensor,
    _check_batch,
    _check_eval,
    _chunks,
    _Session,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_NEW_TOKENS = 64  # the papers' generation budget


@dataclass(frozen=True)
class GenerateResult:
    """A generated answer matched against the candidate titles by the papers' rule.

    ``text`` is the first line kept for matching; ``matches`` the indices of every candidate whose title appears
    in it. Valid means exactly one title appears, so an answer that contains two candidates (including a title
    that is a substring of another, "Heat" inside "Heat Wave", or two identical titles) is invalid.
    """

    text: str
    matches: tuple[int, ...]

    @property
    def valid(self) -> bool:
        return len(self.matches) == 1

    @property
    def predicted_index(self) -> int:
        """The matched candidate, or -1 for an invalid answer."""
        return self.matches[0] if self.valid else -1


# ---------------------------------------------------------------------------------------------------------------
# the papers' matching rule


def first_line(text: str) -> str:
    """The part of a generated answer the papers match: the stripped text up to its first newline."""
    return text.strip().split("\n")[0]


def match_candidates(text: str, titles: Sequence[str]) -> GenerateResult:
    """Match a generated answer against candidate titles exactly as LLaRA's evaluation does.

    The first line is lower-cased and every title (stripped, lower-cased) is looked up in it as a substring;
    every appearance counts, so the answer is valid only when exactly one title appears. An empty title would
    match everything, so it is rejected.
    """
    line = first_line(text)
    haystack = line.strip().lower()
    needles = [title.strip().lower() for title in titles]
    if not all(needles):
        raise ValueError("candidate titles must not be empty (an empty title matches any answer)")
    return GenerateResult(text=line, matches=tuple(i for i, n in enumerate(needles) if n in haystack))


def generated_hits(results: Sequence[GenerateResult], target_index: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample HitRatio@1 of generated answers: 1.0 when valid and the matched candidate is the target.

    Its mean over all samples is the papers' HitRatio@1 (invalid answers count as misses, not as absent).
    """
    target = np.asarray(target_index, dtype=np.int64)
    predicted = np.array([r.predicted_index for r in results], dtype=np.int64)
    return (predicted == target).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# generate


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer (chat models end turns with them)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(t) for t in configured)
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(int(tokenizer_eos))
    return ids


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    # as LLaRA decodes: special tokens dropped, spaces left as generated
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = True,
    eos_token_ids: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cond: torch.Tensor | None = None,
) -> list[str]:
    """Greedy continuations of the prompts, decoded without special tokens.

    A row stops at an end-of-sequence token (``eos_token_ids``, default: the generation config's and the
    tokenizer's), after ``max_new_tokens``, or, with ``stop_at_newline``, once its stripped text has a first line
    complete. Matching reads only that first line and greedy tokens never depend on later ones, so stopping there
    gives the same :func:`match_candidates` result as decoding all 64 tokens and is much faster;
    ``stop_at_newline=False`` reproduces the papers' full decoding (and cost).
    """
    _check_eval(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tensors = _as_prompts(model, prompts)
    eos = set(int(t) for t in eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in tensors]
    for chunk in _chunks(len(tensors), batch_size):
        session = _Session(model, cond)
        logits = session.prefill([tensors[i] for i in chunk], torch.tensor(list(chunk)))[:, -1]
        active = list(chunk)
        for step in range(max_new_tokens):
            next_tokens = logits.argmax(dim=-1).tolist()
            keep: list[int] = []
            for row, (index, token) in enumerate(zip(active, next_tokens, strict=True)):
                if token in eos:
                    continue
                generated[index].append(token)
                if stop_at_newline and "\n" in _decode(tokenizer, generated[index]).lstrip():
                    continue
                keep.append(row)
            if not keep or step + 1 == max_new_tokens:
                break
            if len(keep) < len(active):
                session.select(torch.tensor(keep))
            active = [active[row] for row in keep]
            step_ids = torch.tensor([[next_tokens[row]] for row in keep])
            logits = session.extend(step_ids, torch.ones_like(step_ids, dtype=torch.bool))[:, -1]
    return [_decode(tokenizer, ids) for ids in generated]


def generate_rank(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    candidate_titles: Sequence[Sequence[str]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = True,
    eos_token_ids: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cond: torch.Tensor | None = None,
) -> list[GenerateResult]:
    """The papers' protocol: greedy generation (:func:`greedy_generate`), then :func:`match_candidates`.

    ValidRatio is the share of valid results, HitRatio@1 the mean of :func:`generated_hits` over all samples.
    """
    _check_batch(prompts, candidate_titles, "candidate title lists")
    texts = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_at_newline=stop_at_newline,
        eos_token_ids=eos_token_ids,
        batch_size=batch_size,
        cond=cond,
    )
    return [match_candidates(text, titles) for text, titles in zip(texts, candidate_titles, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# constrained


class _TrieWalk:
    """A greedy walk down the prefix trie of one sample's candidate sequences.

    The trie is implicit: the node reached by a prefix is the set of candidates that start with it (``alive``), and
    its children are their distinct next tokens. Nodes with one child are followed without the model (their tokens
    are queued in ``pending``, to be fed with the next forward); the walk ends when one candidate is left, or when
    a candidate's whole sequence has been written (then it is the answer: it can only still share the node with a
    longer sequence it prefixes, or with an identical one, and the lowest index wins).
    """

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        self.tokens = tokens  # [C, L], -1 padded
        self.lengths = lengths  # [C]
        self.alive = torch.ones(len(tokens), dtype=torch.bool)
        self.depth = 0
        self.pending: list[int] = []
        self.result = -1
        self.advance()

    def advance(self) -> None:
        """Follow single-child nodes; set ``result`` once the answer is determined."""
        while True:
            finished = torch.nonzero(self.alive & (self.lengths <= self.depth)).flatten()
            if len(finished):
                self.result = int(finished[0])
                return
            alive = torch.nonzero(self.alive).flatten()
            if len(alive) == 1:
                self.result = int(alive[0])
                return
            children = self.tokens[alive, self.depth]
            if not bool((children == children[0]).all()):
                return  # a branching node: the model decides
            self.pending.append(int(children[0]))
            self.depth += 1

    def choose(self, logits: torch.Tensor) -> None:
        """Take the child with the highest logit (ties: the lowest candidate index), then advance."""
        children = self.tokens[:, self.depth]
        child_logits = logits[children.clamp(min=0).to(logits.device)].float().cpu()
        child_logits[~self.alive] = float("-inf")
        token = int(children[int(child_logits.argmax())])
        self.alive &= children == token
        self.depth += 1
        self.pending = [token]
        self.advance()


@torch.inference_mode()
def constrained_rank(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    candidate_token_ids: Sequence[Sequence[Sequence[int]]],
    *,
    answer_suffix_ids: Sequence[int] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    cond: torch.Tensor | None = None,
) -> np.ndarray:
    """Greedy decoding restricted to the candidates' token trie; returns the chosen candidate index per prompt.

    At every branching node only the node's children are allowed and the highest-logit child is taken; the walk
    stops as soon as the title is determined (one candidate left), so it costs one forward per branching node on
    the path, usually one or two, and never an invalid answer. Tokens on single-child nodes are forced and fed
    together with the next forward. The KV cache is reused across steps and finished rows leave the batch.
    """
    _check_eval(model)
    _check_batch(prompts, candidate_token_ids, "candidate lists")
    tensors = _as_prompts(model, prompts)
    tokens, lengths = _candidate_tensor(candidate_token_ids, answer_suffix_ids)
    chosen = np.full(len(tensors), -1, dtype=np.int64)
    for chunk in _chunks(len(tensors), batch_size):
        walks = {i: _TrieWalk(tokens[i], lengths[i]) for i in chunk}
        active = [i for i in chunk if walks[i].result < 0]
        if active:
            _walk_batch(model, [tensors[i] for i in active], active, walks, cond)
        for i in chunk:
            chosen[i] = walks[i].result
    return chosen


def _walk_batch(
    model: PreTrainedModel,
    prompts: list[torch.Tensor],
    active: list[int],
    walks: dict[int, _TrieWalk],
    cond: torch.Tensor | None,
) -> None:
    """Advance the walks of prompts ``active`` (all undetermined) until each has a result."""
    session = _Session(model, cond)
    logits = session.prefill(prompts, torch.tensor(active), [walks[i].pending for i in active])[:, -1]
    while True:
        for row, index in enumerate(active):
            walks[index].choose(logits[row])
        keep = [row for row, index in enumerate(active) if walks[index].result < 0]
        if not keep:
            return
        if len(keep) < len(active):
            session.select(torch.tensor(keep))
        active = [active[row] for row in keep]
        step_ids, valid = _left_padded([walks[i].pending for i in active])
        logits = session.extend(step_ids, valid)[:, -1]


def _left_padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists as [N, K] left-padded ids (pad 0) and a mask, so every row's last slot is real."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    valid = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        valid[row, width - len(seq) :] = True
    return ids, valid
