"""Hybrid item representations (LLaRA): CRM item embeddings projected into the LLM's input embedding space.

A hybrid prompt writes each item as ``Title <|item|>`` (:mod:`recadapt.llm.prompts`); the input embedding at each
``<|item|>`` position is replaced by ``ItemProjector(e_item)``, where ``e_item`` is the item's row of a trained,
frozen CRM's :meth:`~recadapt.cf.base.SequentialRecommender.item_embeddings`. LLaRA's curriculum moves from
text-only to hybrid prompts: the probability of a hybrid batch grows linearly with the training step.

Three projectors (``llm.projector``, built by :func:`build_projector`):

- ``mlp``: LLaRA's ``Linear -> GELU -> Linear`` on the raw embeddings. With PyTorch's default initialisation and a
  CRM table of small entries (SASRec: norm ~0.75), the biases dominate and unrelated items come out nearly the same
  vector (cosine 0.80 across genres on synth-cf, against -0.04 in the table), at a quarter of the token embeddings'
  norm (``benchmarks/projector_geometry.py``).
- ``scaled``: the same MLP on standardised embeddings, each output rescaled to the token embeddings' mean norm
  (times a learned gain). The CRM's geometry survives the projection.
- ``vocab``: a softmax mixture of ``K`` of the LLM's own word-token embeddings, with logits linear in the
  standardised embedding. Items close in the CRM become the same few real tokens, which a pretrained LLM already
  matches across a prompt as it matches repeated words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from recadapt.llm.prompts import USER_ITEM_ID

if TYPE_CHECKING:
    from recadapt.llm.encoding import EncodedBatch


class ItemProjector(nn.Module):
    """Linear(d_cf -> H) -> GELU -> Linear(H -> H): maps a CRM item embedding into the LLM hidden size H."""

    def __init__(self, cf_dim: int, hidden_size: int) -> None:
        super().__init__()
        if cf_dim < 1 or hidden_size < 1:
            raise ValueError(f"cf_dim and hidden_size must be >= 1, got {cf_dim} and {hidden_size}")
        self.cf_dim = cf_dim
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(cf_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, item_embeddings: Tensor) -> Tensor:
        """FloatTensor[..., d_cf] -> FloatTensor[..., H]. The input is cast to the projector's own dtype, so an
        fp32 CRM table feeds a bf16 projector without autocast."""
        return self.net(item_embeddings.to(self.net[0].weight.dtype))


PROJECTORS = ("mlp", "scaled", "vocab")
VOCAB_ANCHORS = 512  # real tokens the vocab projector mixes


class _Standardise(nn.Module):
    """``(x - mean) / std`` with the CRM table's per-dimension mean and overall standard deviation, kept as
    buffers (saved with the projector, so a reloaded run does not depend on the table it is given)."""

    def __init__(self, item_table: Tensor) -> None:
        super().__init__()
        table = item_table.detach().float()
        self.register_buffer("mean", table.mean(0))
        self.register_buffer("std", (table - table.mean(0)).std().clamp_min(1e-8).reshape(1))

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(self.mean.dtype) - self.mean) / self.std


class ScaledProjector(nn.Module):
    """LLaRA's MLP on standardised CRM embeddings, each output at ``target_norm`` (the token embeddings' mean
    norm) times a learned gain: the item vectors keep the CRM's geometry and look like tokens in size."""

    def __init__(self, item_table: Tensor, hidden_size: int, target_norm: float) -> None:
        super().__init__()
        if target_norm <= 0:
            raise ValueError(f"target_norm must be > 0, got {target_norm}")
        self.cf_dim, self.hidden_size = int(item_table.shape[1]), hidden_size
        self.standardise = _Standardise(item_table)
        self.net = ItemProjector(self.cf_dim, hidden_size)
        self.register_buffer("target_norm", torch.tensor([float(target_norm)]))
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, item_embeddings: Tensor) -> Tensor:
        z = self.standardise(item_embeddings)
        v = self.net(z)
        norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return v * (self.gain * self.target_norm / norm).to(v.dtype)


class VocabProjector(nn.Module):
    """A CRM embedding as ``softmax(W z) @ anchors``: a mixture of ``K`` real token embeddings (``anchors``, a
    fixed buffer) with logits linear in the standardised embedding ``z``. ``W`` starts at N(0, sharpness^2 / d),
    so the logits have standard deviation ~``sharpness`` and each item starts as a mix of a few tokens; items
    close in the CRM share them."""

    def __init__(self, item_table: Tensor, anchors: Tensor, sharpness: float = 4.0) -> None:
        super().__init__()
        if anchors.dim() != 2 or anchors.size(0) < 2:
            raise ValueError(f"anchors must be [K >= 2, H], got shape {tuple(anchors.shape)}")
        self.cf_dim, self.hidden_size = int(item_table.shape[1]), int(anchors.size(1))
        self.standardise = _Standardise(item_table)
        self.register_buffer("anchors", anchors.detach().float().clone())
        self.logits = nn.Linear(self.cf_dim, anchors.size(0), bias=False)
        nn.init.normal_(self.logits.weight, std=sharpness / self.cf_dim**0.5)

    def forward(self, item_embeddings: Tensor) -> Tensor:
        weights = torch.softmax(self.logits(self.standardise(item_embeddings)).float(), dim=-1)
        return weights @ self.anchors


_WORD = re.compile(r"^ [a-z]{4,}$")


def anchor_token_ids(tokenizer: object, k: int = VOCAB_ANCHORS, seed: int = 0) -> list[int]:
    """``k`` token ids of ordinary lower-case words (decoded as a space and four or more letters), drawn with a
    seeded generator and sorted: the vocabulary the ``vocab`` projector mixes. Falls back to any non-special id
    when the vocabulary has too few such words."""
    vocab_size = len(tokenizer)  # type: ignore[arg-type]
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids = [i for i in range(vocab_size) if i not in special]
    words = [i for i in ids if _WORD.match(tokenizer.decode([i]))]  # type: ignore[attr-defined]
    pool = words if len(words) >= k else ids
    if len(pool) < k:
        raise ValueError(f"the vocabulary has {len(pool)} usable tokens, fewer than k = {k}")
    chosen = np.random.default_rng([seed, 17]).choice(len(pool), size=k, replace=False)
    return sorted(int(pool[i]) for i in chosen)


def build_projector(
    kind: str, item_table: Tensor, embedding: nn.Module, tokenizer: object | None = None
) -> nn.Module:
    """The ``llm.projector`` of that ``kind`` for ``item_table`` [n_items, d_cf] into the space of ``embedding``
    (``model.get_input_embeddings()``, frozen); ``vocab`` also needs the ``tokenizer`` to pick its anchors."""
    weight = embedding.weight.detach()
    hidden = int(weight.shape[1])
    if kind == "mlp":
        return ItemProjector(int(item_table.shape[1]), hidden)
    if kind == "scaled":
        return ScaledProjector(item_table, hidden, float(weight.float().norm(dim=1).mean()))
    if kind == "vocab":
        if tokenizer is None:
            raise ValueError("the vocab projector needs the tokenizer")
        k = min(VOCAB_ANCHORS, len(tokenizer) // 2)  # type: ignore[arg-type]  # a tiny test vocabulary too
        ids = torch.tensor(anchor_token_ids(tokenizer, k), device=weight.device)
        return VocabProjector(item_table, weight[ids].float())
    raise ValueError(f"unknown projector {kind!r}; expected one of {PROJECTORS}")


def inject_item_embeddings(
    input_embeds: Tensor,
    positions: Tensor,
    item_ids: Tensor,
    item_table: Tensor,
    projector: nn.Module,
) -> Tensor:
    """``input_embeds`` [B, T, H] with row ``positions[k]`` replaced by ``projector(item_table[item_ids[k]])``.

    ``positions`` is LongTensor[N, 2] of (batch row, token position) and ``item_ids`` LongTensor[N] (both as
    :class:`recadapt.llm.encoding.EncodedBatch` gives them); ``item_table`` is FloatTensor[n_items, d_cf] without
    the padding row. One gather, one projector call and one out-of-place ``index_put``: no loop over positions,
    and autograd sees the replacement. The table is detached, so gradients reach the projector (and the other
    embeddings) but never the frozen CRM. The projected vectors are cast to ``input_embeds``' dtype, which keeps
    the embeddings' dtype under bf16 autocast.
    """
    if input_embeds.dim() != 3:
        raise ValueError(f"input_embeds must be [B, T, H], got shape {tuple(input_embeds.shape)}")
    if positions.dim() != 2 or positions.size(1) != 2:
        raise ValueError(f"positions must be [N, 2] (row, position), got shape {tuple(positions.shape)}")
    if item_ids.dim() != 1 or item_ids.size(0) != positions.size(0):
        raise ValueError(
            f"item_ids must be [N] with N = {positions.size(0)} placeholders, got shape {tuple(item_ids.shape)}"
        )
    if item_table.dim() != 2:
        raise ValueError(f"item_table must be [n_items, d_cf], got shape {tuple(item_table.shape)}")
    if item_ids.numel() == 0:
        return input_embeds
    n_items = item_table.size(0)
    # one host sync per batch: an out-of-range id would otherwise surface as an opaque device-side assert
    low, high = int(item_ids.min()), int(item_ids.max())
    if low < 0 or high >= n_items:
        raise IndexError(
            f"item ids must be in [0, {n_items}); got [{low}, {high}] (PAD = n_items is not an item)"
        )
    vectors = projector(item_table.detach()[item_ids.to(item_table.device)])
    if vectors.shape[-1] != input_embeds.size(-1):
        raise ValueError(
            f"the projector gives {vectors.shape[-1]}-d vectors; the LLM's hidden size is {input_embeds.size(-1)}"
        )
    vectors = vectors.to(device=input_embeds.device, dtype=input_embeds.dtype)
    rows, cols = positions.to(input_embeds.device).unbind(1)
    return input_embeds.index_put((rows, cols), vectors)


def embed_with_items(
    embedding: nn.Module,
    input_ids: Tensor,
    positions: Tensor,
    item_ids: Tensor,
    item_table: Tensor,
    projector: nn.Module,
) -> Tensor:
    """The LLM input embeddings of ``input_ids`` (``embedding`` = ``model.get_input_embeddings()``) with the
    placeholders replaced: pass the result as ``inputs_embeds`` to the model's forward or ``generate``."""
    return inject_item_embeddings(embedding(input_ids), positions, item_ids, item_table, projector)


class CurriculumSchedule:
    """LLaRA's curriculum: at global step ``step`` a batch uses the hybrid prompt with probability
    ``step / total_steps`` (clipped to [0, 1]), else the text-only prompt.

    The step is passed in explicitly (the trainer's optimizer step), never counted here: LLaRA's counter lived in
    each data-loader worker and restarted every epoch. Each decision is drawn from a generator seeded by
    (seed, step, sub_step), so it does not depend on call order, workers or restarts, and a resumed run makes
    the same decisions. ``sub_step`` (e.g. the micro-batch within a gradient-accumulation step) gives independent
    draws within one step; by default the whole step shares one decision.
    """

    def __init__(self, total_steps: int, seed: int = 0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.total_steps = total_steps
        self.seed = seed

    def probability(self, step: int) -> float:
        """p(hybrid) at ``step``: 0 at the first step, rising linearly, 1 from ``total_steps`` on."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(step / self.total_steps, 1.0)

    def use_hybrid(self, step: int, sub_step: int = 0) -> bool:
        """Whether the batch at ``step`` uses the hybrid prompt (deterministic in seed, step and sub_step)."""
        if sub_step < 0:
            raise ValueError(f"sub_step must be >= 0, got {sub_step}")
        p = self.probability(step)
        return bool(np.random.default_rng([self.seed, step, sub_step]).random() < p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(total_steps={self.total_steps}, seed={self.seed})"


class HybridSchedule(CurriculumSchedule):
    """No curriculum (``llm.curriculum: hybrid``): every batch uses the hybrid prompt from the first step."""

    def probability(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return 1.0


@dataclass
class ItemEmbedder:
    """LLaRA's hybrid inputs: token embeddings with ``projector(CRM item embedding)`` at every placeholder.

    ``users`` [B, d_cf]: each row's CRM user vector, for the user-token placeholders (id
    :data:`~recadapt.llm.prompts.USER_ITEM_ID`, ``llm.user_token``). They go through the same projector as the
    items: a SASRec-style user vector lives in the CRM's item space (its scores are ``u . e_item``)."""

    embedding: nn.Module
    item_table: Tensor
    projector: nn.Module

    def __call__(self, batch: EncodedBatch, users: Tensor | None = None) -> Tensor:
        table, ids = self.item_table, batch.item_ids
        is_user = ids == USER_ITEM_ID
        if bool(is_user.any()):
            if users is None or users.size(0) != batch.input_ids.size(0):
                raise ValueError(
                    "these prompts hold user-token placeholders: pass one CRM user vector per row as users="
                )
            n_items = table.size(0)
            table = torch.cat([table, users.to(table.device, table.dtype)])
            ids = torch.where(is_user, n_items + batch.item_positions[:, 0].to(ids.device), ids)
        return embed_with_items(
            self.embedding, batch.input_ids, batch.item_positions, ids, table, self.projector
        )
