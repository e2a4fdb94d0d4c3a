"""Laser's M-Former (arXiv 2409.01605): a mixture-of-experts querying transformer that turns a frozen CRM's
encoding of the item history into a few soft prefix tokens for the LLM.

``crm_states`` C_u [B, N, d_crm] is the per-item output of a trained, frozen sequential recommender (SASRec /
BERT4Rec, hidden 64). A router Linear(d_crm -> K) scores the K query experts at every real history item; the
logits are averaged over the real items only (padding never votes) and softmaxed, and the top-1 expert's L
learnable query tokens go through a BLIP-2 Q-Former style stack: self-attention in every block,
cross-attention to C_u in blocks 0, 2, 4, ..., then an FFN. Blocks are **pre-LN** (with a final LayerNorm),
which trains stably without warm-up at these small sizes. Linear(d -> H) maps the L outputs to the LLM width.

Top-1 routing keeps the router trainable as Switch does (y = p_i E_i(x)): an expert's output is its query set,
so the chosen queries are multiplied by their routing probability before the blocks. The pre-LN residual
stream carries that scale to the final LayerNorm, so the LM loss reaches the router while the prefix scale
stays fixed. The training loss adds ``balance_weight * balance_loss`` (0.01, as published).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_POSITIVE_INTS = (
    "crm_dim",
    "llm_hidden",
    "n_experts",
    "n_queries",
    "n_blocks",
    "hidden",
    "n_heads",
    "ffn_mult",
)


@dataclass
class MFormerConfig:
    """Defaults are sized for CPU; the paper's values are in the comments. ``use_moe=False`` is the "without
    MoE" ablation: one query set, no router, zero balance loss."""

    crm_dim: int  # d_crm, the CRM's hidden size (paper: 64)
    llm_hidden: int  # H, the LLM's hidden size (paper: 4096, Llama-2-7B)
    n_experts: int = 8  # K (paper: 8)
    n_queries: int = 8  # L prefix tokens (paper: 32)
    n_blocks: int = 2  # transformer blocks (paper: 12)
    hidden: int = 128  # d (paper: 768)
    n_heads: int = 4  # (paper: 12)
    ffn_mult: int = 4  # FFN width = ffn_mult * d (paper: 4, BERT-base)
    dropout: float = 0.1
    use_moe: bool = True
    balance_weight: float = 0.01  # weight of the Switch balance loss in the training loss (paper: 0.01)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MFormerConfig.{name} must be an int >= 1, got {value!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.use_moe, bool):
            raise ValueError(f"use_moe must be a bool, got {self.use_moe!r}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight}")


@dataclass
class MFormerOutput:
    """``prefix`` [B, L, H]; ``router_probs`` [B, K] (K = 1 without MoE); ``expert_index`` [B];
    ``balance_loss`` a scalar, unweighted (multiply by ``config.balance_weight``)."""

    prefix: Tensor
    router_probs: Tensor
    expert_index: Tensor
    balance_loss: Tensor


def switch_balance_loss(router_probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """Switch Transformer's load-balancing loss ``K * sum_k f_k * P_k``: f_k is the fraction of rows routed to
    expert k, P_k the mean router probability of k. 1.0 under perfectly uniform routing, up to K when collapsed;
    only P carries a gradient (f comes from an argmax)."""
    fraction = F.one_hot(expert_index, n_experts).to(router_probs.dtype).mean(0)
    return n_experts * (fraction * router_probs.mean(0)).sum()


class MFormerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention to the CRM states, GELU FFN, each residual."""

    def __init__(self, config: MFormerConfig, cross: bool) -> None:
        super().__init__()
        d, heads, p = config.hidden, config.n_heads, config.dropout
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.cross_norm = nn.LayerNorm(d) if cross else None
        self.cross_attn = (
            nn.MultiheadAttention(
                d, heads, dropout=p, kdim=config.crm_dim, vdim=config.crm_dim, batch_first=True
            )
            if cross
            else None
        )
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_mult * d), nn.GELU(), nn.Linear(config.ffn_mult * d, d), nn.Dropout(p)
        )
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor, has_history: Tensor) -> Tensor:
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h, h, need_weights=False)[0])
        if self.cross_attn is not None and self.cross_norm is not None:
            h = self.cross_norm(x)
            attended = self.cross_attn(
                h, memory, memory, key_padding_mask=key_padding_mask, need_weights=False
            )[0]
            # rows without history attended to unmasked padding (no all -inf softmax, no NaN): drop that read
            x = x + self.dropout(attended) * has_history[:, None, None]
        return x + self.ffn(self.ffn_norm(x))


class MFormer(nn.Module):
    """C_u [B, N, d_crm] + history mask [B, N] -> L prefix tokens [B, L, H] from the top-1 query expert."""

    def __init__(self, config: MFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.n_experts = config.n_experts if config.use_moe else 1
        # Unit-variance queries: scaled by p ~ 1/K before the first pre-LN, BLIP-2's N(0, 0.02) would fall below
        # LayerNorm's epsilon and be damped at the start of training.
        self.queries = nn.Parameter(torch.randn(self.n_experts, config.n_queries, config.hidden))
        self.router = nn.Linear(config.crm_dim, self.n_experts) if config.use_moe else None
        self.memory_norm = nn.LayerNorm(config.crm_dim)  # the frozen CRM's output scale is arbitrary
        self.blocks = nn.ModuleList(MFormerBlock(config, cross=i % 2 == 0) for i in range(config.n_blocks))
        self.final_norm = nn.LayerNorm(config.hidden)
        self.out_proj = nn.Linear(config.hidden, config.llm_hidden)

    def route(self, crm_states: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Router probabilities [B, K] from the per-item logits averaged over real items (an empty history gets
        zero logits, i.e. uniform probabilities) and the top-1 expert [B]."""
        assert self.router is not None
        logits = self.router(crm_states).float()  # [B, N, K]
        logits = torch.where(history_mask[..., None], logits, torch.zeros_like(logits))
        logits = logits.sum(1) / history_mask.sum(1, keepdim=True).clamp(min=1)
        probs = torch.softmax(logits, -1)
        return probs, probs.argmax(-1)

    def forward(self, crm_states: Tensor, history_mask: Tensor) -> MFormerOutput:
        if crm_states.dim() != 3 or crm_states.size(-1) != self.config.crm_dim:
            raise ValueError(
                f"crm_states must be [B, N, {self.config.crm_dim}], got {tuple(crm_states.shape)}"
            )
        if history_mask.dtype != torch.bool or history_mask.shape != crm_states.shape[:2]:
            raise ValueError(
                f"history_mask must be a bool [B, N] = {tuple(crm_states.shape[:2])}, got "
                f"{history_mask.dtype} {tuple(history_mask.shape)}"
            )
        batch = crm_states.size(0)
        crm_states = crm_states.to(self.queries.dtype)
        if self.router is None:
            probs = crm_states.new_ones(batch, 1)
            index = torch.zeros(batch, dtype=torch.long, device=crm_states.device)
            queries = self.queries.expand(batch, -1, -1)
            balance = crm_states.new_zeros(())
        else:
            probs, index = self.route(crm_states, history_mask)
            chosen = probs.gather(1, index[:, None]).to(self.queries.dtype)  # [B, 1]
            queries = self.queries[index] * chosen[..., None]  # Switch: y = p_i E_i(x)
            balance = switch_balance_loss(probs, index, self.n_experts)
        has_history = history_mask.any(1)
        # True = ignore; an empty row keeps all keys visible (its read is zeroed in the block)
        key_padding_mask = ~history_mask & has_history[:, None]
        memory = self.memory_norm(crm_states)
        x = queries
        for block in self.blocks:
            x = block(x, memory, key_padding_mask, has_history.to(x.dtype))
        prefix = self.out_proj(self.final_norm(x))
        return MFormerOutput(prefix=prefix, router_probs=probs, expert_index=index, balance_loss=balance)


def count_parameters(config: MFormerConfig) -> int:
    """Trainable parameters of an M-Former, built on the meta device (no memory).

    Measured: paper sizes (d_crm 64, K 8, L 32, 12 blocks, d 768, 12 heads) give 96,098,440 with H = 4096
    (Llama-2-7B) and 93,391,560 with H = 576 (SmolLM2-135M), about 7.1M per block plus 1.3M per cross-attention;
    the CPU defaults (d_crm 64) give 529,864 at H = 576.
    """
    with torch.device("meta"):
        model = MFormer(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
