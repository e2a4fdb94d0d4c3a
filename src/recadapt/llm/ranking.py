"""Rank a next-item sample's candidates with a causal LM, three ways, and score CTR answers.

Modes (:data:`RANKING_MODES`, chosen at evaluation time through :func:`rank_candidates`):

``generate``
    The LLaRA/iLoRA protocol: greedy decoding (up to 64 new tokens), first line of the stripped text, lower-cased
    substring match against the candidate titles (:func:`generate_rank`). ValidRatio and HitRatio@1 as the papers
    compute them; the only protocol comparable with their published numbers.
``constrained``
    Greedy decoding restricted to the candidates' token sequences (a prefix trie), stopping as soon as one
    candidate is left (:func:`constrained_rank`). Always a valid candidate; a handful of forwards instead of a
    title's worth.
``score``
    Length-normalised log-likelihood of every candidate after the shared prompt (:func:`score_candidates`): one
    prompt pass, then one pass over all candidates packed side by side after it, each seeing the prompt and its
    own tokens only (a 4-D attention mask). A full ranking, so HitRatio@K and NDCG@K apply.

CTR prompts are scored by :func:`yes_probability` (softmax over the "Yes"/"No" answer-token logits, as in ReLLa).

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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Prompt = torch.Tensor | Sequence[int]
RankingMode = Literal["generate", "constrained", "score"]
RANKING_MODES: tuple[RankingMode, ...] = ("generate", "constrained", "score")
Normalise = Literal["mean", "sum"]

DEFAULT_MAX_NEW_TOKENS = 64  # the papers' generation budget
DEFAULT_BATCH_SIZE = 8  # prompts per forward
# prompts per forward in score mode, whose logits are prompts x candidates x tokens
DEFAULT_SCORE_BATCH_SIZE = 4
# attention kernels that take a ready 4-D mask (see recadapt.llm.masking): score mode packs the candidates of a
# prompt into one row under them, and otherwise copies the prompt's KV cache once per candidate
PACKED_ATTENTION = ("sdpa", "eager")


# ---------------------------------------------------------------------------------------------------------------
# results


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
# incremental forwards over a padded batch


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_eval(model: torch.nn.Module) -> None:
    if model.training:
        raise ValueError("rank with the model in eval mode (model.eval()): dropout would make scores random")


def _as_prompt(prompt: Prompt, hidden_size: int) -> torch.Tensor:
    """A prompt as a LongTensor [T] of ids or a float tensor [T, H] of embeddings; anything else is an error."""
    tensor = prompt if isinstance(prompt, torch.Tensor) else torch.as_tensor(list(prompt), dtype=torch.long)
    if tensor.ndim == 1 and not tensor.is_floating_point() and not tensor.is_complex():
        tensor = tensor.long()
    elif tensor.ndim == 2 and tensor.is_floating_point():
        if tensor.shape[1] != hidden_size:
            raise ValueError(f"prompt embeddings have width {tensor.shape[1]}, the model's is {hidden_size}")
    else:
        raise ValueError(
            f"a prompt must be 1-D token ids or 2-D [T, H] float embeddings, got shape {tuple(tensor.shape)} "
            f"of {tensor.dtype}"
        )
    if tensor.shape[0] == 0:
        raise ValueError("empty prompt")
    return tensor


def _as_prompts(model: PreTrainedModel, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
    hidden = int(model.get_input_embeddings().weight.shape[1])
    return [_as_prompt(p, hidden) for p in prompts]


class _Session:
    """Incremental forwards over a batch of left-padded prompts sharing one KV cache.

    Each row keeps its own position counter, so padding (left of a prompt, or inside a step's chunk) never shifts
    a row's positions: padded slots stay in the cache, masked out. Rows can be dropped (finished) or repeated (one
    copy per candidate) without recomputing the prompt.
    """

    def __init__(self, model: PreTrainedModel, cond: torch.Tensor | None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cond = cond  # [prompts, d]: per-prompt conditioning, indexed by self.rows at every forward
        self.device = _model_device(model)
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [rows, cache slots]
        self.next_position = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows]
        self.rows = torch.zeros(0, dtype=torch.long)  # [rows] index of each row's prompt (on CPU)
        self.packed = False  # the cache holds independent continuations side by side: no further extension

    def prefill(
        self,
        prompts: Sequence[torch.Tensor],
        rows: torch.Tensor,
        extra_ids: Sequence[Sequence[int]] | None = None,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run the prompts (each followed by its ``extra_ids``) left-padded; return the logits [B, keep, V]."""
        extra = [list(e) for e in extra_ids] if extra_ids is not None else [[] for _ in prompts]
        lengths = torch.tensor(
            [len(p) + len(e) for p, e in zip(prompts, extra, strict=True)], device=self.device
        )
        width = int(lengths.max())
        mask = torch.arange(width, device=self.device)[None, :] >= (width - lengths)[:, None]
        inputs: dict[str, torch.Tensor]
        if any(p.ndim == 2 for p in prompts):
            embedding = self.model.get_input_embeddings()
            dtype = embedding.weight.dtype
            embeds = torch.zeros(
                len(prompts), width, embedding.weight.shape[1], dtype=dtype, device=self.device
            )
            for i, (prompt, ids) in enumerate(zip(prompts, extra, strict=True)):
                parts = [self._embed(prompt, embedding, dtype)]
                if ids:
                    parts.append(embedding(torch.tensor(ids, device=self.device)).to(dtype))
                row = torch.cat(parts)
                embeds[i, width - len(row) :] = row
            inputs = {"inputs_embeds": embeds}
        else:
            input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
            for i, (prompt, ids) in enumerate(zip(prompts, extra, strict=True)):
                row = torch.cat(
                    [prompt.to(self.device), torch.tensor(ids, dtype=torch.long, device=self.device)]
                )
                input_ids[i, width - len(row) :] = row
            inputs = {"input_ids": input_ids}
        self.mask = mask.long()
        self.next_position = lengths
        self.rows = rows.cpu()
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        return self._forward(inputs, positions, logits_to_keep)

    def _embed(self, prompt: torch.Tensor, embedding: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if prompt.ndim == 2:
            return prompt.to(self.device, dtype)
        return embedding(prompt.to(self.device)).to(dtype)

    def _check_open(self) -> None:
        if self.packed:
            raise RuntimeError("this session's cache holds packed continuations; it cannot be extended")

    def extend(self, input_ids: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Append a chunk [rows, K] of tokens (``valid`` False at padded slots) to every row; return logits."""
        self._check_open()
        valid = valid.to(self.device)
        self.mask = torch.cat([self.mask, valid.long()], dim=1)
        positions = self.next_position[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
        self.next_position = self.next_position + valid.sum(1)
        return self._forward({"input_ids": input_ids.to(self.device)}, positions, logits_to_keep)

    def extend_packed(self, blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append C independent continuations ``blocks`` [rows, C, L] (``valid`` False at padded slots, which
        follow a block's real tokens) to every row in one forward; return their logits [rows, C * L, V].

        Each continuation sees its row's cached slots and its own earlier tokens, never another continuation
        (a 4-D mask from :func:`recadapt.llm.masking.context_allowed`, one segment per block, with positions
        running on from the row's cache), so C candidates cost one pass over C x L new tokens instead of C copies
        of the cache. The cache then holds the continuations side by side, so the session ends here.
        """
        from recadapt.llm.masking import context_attention_mask

        self._check_open()
        rows, n_blocks, width = blocks.shape
        valid = valid.to(self.device).reshape(rows, n_blocks * width)
        segments = torch.arange(1, n_blocks + 1, device=self.device).repeat_interleave(width)
        mask = context_attention_mask(
            segments.expand(rows, -1),
            valid,
            prefix_len=self.mask.shape[1],
            prefix_mask=self.mask,
            dtype=self.model.get_input_embeddings().weight.dtype,
        )
        offsets = torch.arange(width, device=self.device).repeat(n_blocks)
        positions = self.next_position[:, None] + offsets[None, :]
        self.packed = True
        inputs = {"input_ids": blocks.reshape(rows, n_blocks * width).to(self.device)}
        return self._forward(inputs, positions, logits_to_keep=0, attention_mask=mask)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (indices into the current rows)."""
        keep_device = keep.to(self.device)
        self.cache.batch_select_indices(keep_device)
        self.mask = self.mask[keep_device]
        self.next_position = self.next_position[keep_device]
        self.rows = self.rows[keep.cpu()]

    def repeat(self, times: int) -> None:
        """Repeat every row ``times`` times in place (row-major: a row's copies are adjacent)."""
        self.cache.batch_repeat_interleave(times)
        self.mask = self.mask.repeat_interleave(times, dim=0)
        self.next_position = self.next_position.repeat_interleave(times)
        self.rows = self.rows.repeat_interleave(times)

    def _forward(
        self,
        inputs: dict[str, torch.Tensor],
        positions: torch.Tensor,
        logits_to_keep: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.cond is not None:
            inputs = {**inputs, "cond": self.cond[self.rows.to(self.cond.device)]}
        out = self.model(
            **inputs,
            attention_mask=self.mask if attention_mask is None else attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.cache = out.past_key_values
        return out.logits


def _chunks(n: int, size: int) -> list[range]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _candidate_tensor(
    candidate_token_ids: Sequence[Sequence[Sequence[int]]], answer_suffix_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (+ suffix) as tokens [B, C, L] padded with -1, and their lengths [B, C]."""
    suffix = [int(t) for t in answer_suffix_ids]
    sequences = [[[int(t) for t in cand] + suffix for cand in sample] for sample in candidate_token_ids]
    counts = {len(sample) for sample in sequences}
    if len(counts) > 1:
        raise ValueError(f"every prompt needs the same number of candidates, got {sorted(counts)}")
    if counts == {0}:
        raise ValueError("every prompt needs at least one candidate")
    if any(not seq for sample in sequences for seq in sample):
        raise ValueError("a candidate has no tokens (empty title and no answer suffix)")
    n_candidates = counts.pop() if counts else 0
    longest = max((len(seq) for sample in sequences for seq in sample), default=1)
    tokens = torch.full((len(sequences), n_candidates, longest), -1, dtype=torch.long)
    lengths = torch.zeros(len(sequences), n_candidates, dtype=torch.long)
    for b, sample in enumerate(sequences):
        for c, seq in enumerate(sample):
            tokens[b, c, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths[b, c] = len(seq)
    return tokens, lengths


def _check_batch(prompts: Sequence[Any], per_prompt: Sequence[Any], what: str) -> None:
    if len(prompts) != len(per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} {what}")


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


# ---------------------------------------------------------------------------------------------------------------
# score


def packs_by_default(kernel: str | None, device: torch.device) -> bool:
    """Whether :func:`score_candidates` packs the candidates when not told: on a CPU, under a 4-D-mask kernel."""
    return kernel in PACKED_ATTENTION and device.type == "cpu"


@torch.inference_mode()
def score_candidates(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    candidate_token_ids: Sequence[Sequence[Sequence[int]]],
    *,
    answer_suffix_ids: Sequence[int] = (),
    normalise: Normalise = "mean",
    batch_size: int = DEFAULT_SCORE_BATCH_SIZE,
    cond: torch.Tensor | None = None,
    packed: bool | None = None,
) -> torch.Tensor:
    """Log-likelihood of every candidate (+ suffix) after its prompt: float32 scores [B, C] on the CPU.

    ``normalise="mean"`` divides by the candidate's token count, so long titles are not penalised for their
    length; ``"sum"`` is the total log-probability. Each prompt is run once; then all its candidates' tokens are
    scored in one forward: ``packed`` side by side after the prompt under a 4-D mask, or on one copy of the
    prompt's KV cache per candidate (C times the cache, and attention over C copies of the prompt). The default
    packs on a CPU when the model's attention kernel takes a 4-D mask (:data:`PACKED_ATTENTION`): there compute
    is the bottleneck and packing was 1.5x faster; on an accelerator the copies cost little and the unmasked
    kernels win (copied 1.2x faster on an H200, docs/benchmarks.md). The logits of that
    forward, ``batch_size`` x C x longest candidate x vocabulary, bound the memory.
    """
    _check_eval(model)
    _check_batch(prompts, candidate_token_ids, "candidate lists")
    if normalise not in ("mean", "sum"):
        raise ValueError(f"normalise must be 'mean' or 'sum', got {normalise!r}")
    tensors = _as_prompts(model, prompts)
    tokens, lengths = _candidate_tensor(candidate_token_ids, answer_suffix_ids)
    n_candidates, longest = tokens.shape[1], tokens.shape[2]
    scores = torch.zeros(len(tensors), n_candidates, dtype=torch.float32)
    kernel = getattr(model.config, "_attn_implementation", None)
    if packed is None:
        packed = packs_by_default(kernel, model.device)
    elif packed and kernel not in PACKED_ATTENTION:
        raise ValueError(
            f"packed=True needs an attention kernel that takes a 4-D mask {PACKED_ATTENTION}, got {kernel!r}"
        )
    for chunk in _chunks(len(tensors), batch_size):
        session = _Session(model, cond)
        last = session.prefill([tensors[i] for i in chunk], torch.tensor(list(chunk)))[:, -1].float()
        chunk_tokens = tokens[list(chunk)].to(last.device)  # [b, C, L]
        chunk_lengths = lengths[list(chunk)].to(last.device)
        total = last.log_softmax(dim=-1).gather(1, chunk_tokens[:, :, 0])  # the first token, from the prompt
        if longest > 1:
            rows = len(chunk) * n_candidates
            inputs = chunk_tokens[:, :, :-1]
            targets = chunk_tokens[:, :, 1:].reshape(rows, longest - 1)
            valid = targets >= 0  # position j is real and predicts a real token j + 1
            if packed:
                logits = session.extend_packed(inputs.clamp(min=0), valid.view(len(chunk), n_candidates, -1))
                logits = logits.float().view(rows, longest - 1, -1)
            else:
                session.repeat(n_candidates)
                inputs = inputs.reshape(rows, longest - 1).clamp(min=0)
                logits = session.extend(inputs, valid, logits_to_keep=0).float()
            picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            log_probs = (picked - logits.logsumexp(dim=-1)).masked_fill(~valid, 0.0)
            total = total + log_probs.sum(dim=1).view(len(chunk), n_candidates)
        if normalise == "mean":
            total = total / chunk_lengths
        scores[list(chunk)] = total.cpu()
    return scores


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
