"""Batched, KV-cached forwards of a causal LM over left-padded prompts, shared by every ranking mode.

Generation, constrained decoding, candidate scoring and CTR's p(Yes) all run prompts the same way: left-padded
with explicit position ids, padded slots masked in the cache, rows dropped or repeated without recomputing the
prompt. :class:`_Session` is that engine; the rest checks and packs the inputs the modes share (prompts as token
ids or embeddings, candidate token tensors, batch chunks). The conventions are in :mod:`recadapt.llm.ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Prompt = torch.Tensor | Sequence[int]
DEFAULT_BATCH_SIZE = 8  # prompts per forward


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
