"""Context masking (DARec): each history item's tokens attend only within that item, so an item is encoded the
same whatever surrounds it, while the instruction and answer tokens read the whole prompt.

Segment ids label every token: 0 for instruction and other tokens (causal over every earlier real token), s > 0
for the tokens of history item s (causal within segment s only). :func:`context_attention_mask` turns them into the
ready 4-D mask a Hugging Face decoder takes as ``attention_mask``. In transformers 5.x, ``masking_utils.
_preprocess_mask_arguments`` returns any 4-D mask unchanged for every attention implementation, so it must already
be in the form the attention kernel consumes: ``eager_attention_forward`` (``models/llama/modeling_llama.py``)
*adds* it to the scores, so it must be an additive float mask (0 = attend, ``finfo(dtype).min`` = blocked, as
``masking_utils.eager_mask`` builds), which ``sdpa`` also accepts as ``attn_mask``; a boolean mask would be added as
0/1 by eager attention and silently mask nothing. Pass ``position_ids`` explicitly with a 4-D mask: the model
cannot infer padding from it, and with a KV cache it would count the cached slots as positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def context_allowed(
    segment_ids: Tensor,
    attention_mask: Tensor,
    *,
    prefix_len: int = 0,
    prefix_mask: Tensor | None = None,
) -> Tensor:
    """BoolTensor[B, T, prefix_len + T]: True where query token t may attend to key slot k.

    The first ``prefix_len`` key slots are extra keys placed before the tokens (e.g. a KV cache of collaborative
    slots); every real query sees all of them, or those where ``prefix_mask`` [B, prefix_len] is nonzero. Among
    the tokens, a segment-0 query sees every earlier-or-equal real token, a segment-s query (s > 0) the
    earlier-or-equal real tokens of segment s. Padded keys (``attention_mask`` 0) are never seen; a padded query
    sees only itself, so its row is never empty. Each token's allowed set is closed: what an allowed token may
    see, the query may see too.
    """
    if segment_ids.dim() != 2 or attention_mask.shape != segment_ids.shape:
        raise ValueError(
            f"segment_ids and attention_mask must both be [B, T], got {tuple(segment_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    if segment_ids.numel() and int(segment_ids.min()) < 0:
        raise ValueError("segment_ids must be >= 0 (0: instruction tokens, s > 0: tokens of history item s)")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    batch, length = segment_ids.shape
    device = segment_ids.device
    real = attention_mask.to(device=device).bool()
    positions = torch.arange(length, device=device)
    causal = positions[:, None] >= positions[None, :]  # [T, T]: key at or before the query
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    context_query = (segment_ids == 0)[:, :, None]
    tokens = causal & (context_query | same_segment) & real[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=device)
    tokens = torch.where(real[:, :, None], tokens, eye)  # a padded query sees itself only
    if prefix_mask is None:
        prefix = real[:, :, None].expand(batch, length, prefix_len)
    else:
        if prefix_mask.shape != (batch, prefix_len):
            raise ValueError(
                f"prefix_mask must be [B, prefix_len] = [{batch}, {prefix_len}], got {tuple(prefix_mask.shape)}"
            )
        prefix = real[:, :, None] & prefix_mask.to(device=device).bool()[:, None, :]
    return torch.cat([prefix, tokens], dim=-1)


def context_attention_mask(
    segment_ids: Tensor,
    attention_mask: Tensor,
    *,
    prefix_len: int = 0,
    prefix_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The additive float mask [B, 1, T, prefix_len + T] of :func:`context_allowed`, ready to pass as a
    transformers decoder's ``attention_mask`` (eager or sdpa): 0 where allowed, ``torch.finfo(dtype).min``
    elsewhere. Pass the model's dtype, as transformers builds its own masks in the input embeddings' dtype; its
    finite minimum (not -inf) keeps the softmax free of NaN, which a float32 mask cast to fp16 would not (-inf)."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (the mask is additive), got {dtype}")
    allowed = context_allowed(segment_ids, attention_mask, prefix_len=prefix_len, prefix_mask=prefix_mask)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def segment_ids_from_spans(spans: Sequence[Sequence[tuple[int, int]]], length: int) -> Tensor:
    """LongTensor[B, length] of segment ids from each row's history-item token spans: ``spans[b][k]`` is the
    half-open token range ``(start, end)`` of row b's k-th item, which gets segment k + 1; all other tokens get 0.
    Spans must lie within ``[0, length)`` and not overlap (a token belongs to one item)."""
    segments = torch.zeros(len(spans), length, dtype=torch.long)
    for row, row_spans in enumerate(spans):
        for k, (start, end) in enumerate(row_spans):
            if not 0 <= start < end <= length:
                raise ValueError(f"row {row}: span {k} = ({start}, {end}) is empty or outside [0, {length})")
            if bool(segments[row, start:end].any()):
                raise ValueError(f"row {row}: span {k} = ({start}, {end}) overlaps an earlier span")
            segments[row, start:end] = k + 1
    return segments
