"""DIN: Deep Interest Network (Zhou et al., KDD 2018, arXiv 1706.06978).

DIN scores a (history, target) pair, not a history alone: an activation unit weighs each history item by its
relevance to the target, the weighted sum is the user's interest in that target, and an MLP over
``[interest, target embedding, (user embedding)]`` gives the logit. As in the paper the weights are not
softmax-normalised, so the interest's magnitude keeps how strongly the history relates to the target.

Consequences for the CRM contract:

- :meth:`DIN.score_candidates` runs DIN once per candidate, vectorised over [B, C];
  :meth:`DIN.score_all` does so over the catalogue in chunks of ``chunk_size`` items to bound memory.
- :meth:`DIN.sequence_representation` has no target to attend from, so it is the mean of the history item
  embeddings (zero for an empty history): a target-free summary for conditioning, not what DIN scores with.
- A full-catalogue next-item loss would need one DIN pass per item; instead the loss is a sampled softmax:
  cross-entropy over the target and ``n_negatives`` items drawn uniformly from the rest of the catalogue.
  CTR batches use the base BCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender


class PReLU(nn.Module):
    """PReLU with one slope per feature of the last dimension (``nn.PReLU`` puts features on dimension 1)."""

    def __init__(self, n_features: int, init: float = 0.25) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n_features,), init))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class Dice(nn.Module):
    """DIN's data-adaptive activation ``p(s) * s + (1 - p(s)) * alpha * s`` with ``p = sigmoid(BN(s))``.

    A PReLU whose rectification point follows the batch statistics of its input (running statistics in eval).
    """

    def __init__(self, n_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n_features, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(n_features))

    def forward(self, x: Tensor) -> Tensor:
        p = torch.sigmoid(self.norm(x.reshape(-1, x.size(-1))).reshape(x.shape))
        return p * x + (1 - p) * self.alpha * x


def _activation(kind: str, n_features: int) -> nn.Module:
    return Dice(n_features) if kind == "dice" else PReLU(n_features)


@dataclass
class DINConfig(CRMConfig):
    """DIN hyper-parameters.

    Attributes:
        attention_hidden: hidden widths of the activation unit (paper code: 36).
        mlp_hidden: hidden widths of the prediction MLP (paper: 200-80).
        activation: "prelu" or "dice" for all hidden layers.
        use_user: add a user embedding to the MLP input when the model has users (only users seen in
            training get trained embeddings: disable it when evaluation users are new).
        chunk_size: candidates scored per pass; the largest activation is [B, chunk_size, max_len, width].
        n_negatives: uniformly sampled negatives per target in the sampled-softmax next-item loss.
    """

    dropout: float = 0.1
    attention_hidden: tuple[int, ...] = (36,)
    mlp_hidden: tuple[int, ...] = (200, 80)
    activation: str = "prelu"
    use_user: bool = True
    chunk_size: int = 128
    n_negatives: int = 99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.attention_hidden or min(self.attention_hidden) < 1:
            raise ValueError(f"attention_hidden needs positive widths, got {self.attention_hidden}")
        if min(self.mlp_hidden, default=1) < 1:
            raise ValueError(f"mlp_hidden widths must be positive, got {self.mlp_hidden}")
        if self.activation not in ("prelu", "dice"):
            raise ValueError(f"activation must be 'prelu' or 'dice', got {self.activation!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {self.n_negatives}")


class DIN(SequentialRecommender):
    """Target attention over the history followed by an MLP; scores each (history, candidate) pair."""

    name: ClassVar[str] = "din"
    target_aware: ClassVar[bool] = True
    config_class: ClassVar[type[CRMConfig]] = DINConfig
    config: DINConfig

    def __init__(self, n_items: int, n_users: int = 0, config: DINConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        d, act = self.config.hidden_size, self.config.activation
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=self.pad_id)
        self.use_user = self.config.use_user and n_users > 0
        self.user_embedding = nn.Embedding(n_users, d) if self.use_user else None

        # Activation unit: MLP on [e_h, e_t, e_h - e_t, e_h * e_t] -> one weight per history item.
        widths = self.config.attention_hidden
        self.attention_input = nn.Linear(4 * d, widths[0])
        layers: list[nn.Module] = [_activation(act, widths[0])]
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), _activation(act, width_out)]
        self.attention_rest = nn.Sequential(*layers, nn.Linear(widths[-1], 1))

        # Prediction MLP on [interest, e_t, (e_user)] -> logit.
        mlp: list[nn.Module] = []
        width_in = (3 if self.use_user else 2) * d
        for width_out in self.config.mlp_hidden:
            mlp += [
                nn.Linear(width_in, width_out),
                _activation(act, width_out),
                nn.Dropout(self.config.dropout),
            ]
            width_in = width_out
        self.mlp = nn.Sequential(*mlp, nn.Linear(width_in, 1))

        # Unit-scale embeddings: with BERT-style std 0.02, the activation unit's e_h * e_t term starts near 0.
        for table in (self.item_embedding, self.user_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    def _recent(self, batch: Batch) -> Tensor:
        """The last ``max_len`` history columns, without padding up to ``max_len``.

        DIN has no positional parameters and masks padding, so unlike the models using :meth:`fit_history` it
        need not pad; its cost grows with the history width actually passed.
        """
        history = batch["history"]
        if history.dim() != 2:
            raise ValueError(f"history must be a [B, L] tensor, got shape {tuple(history.shape)}")
        return history[:, -self.config.max_len :]

    def sequence_representation(self, batch: Batch) -> Tensor:
        """Mean of the history item embeddings (DIN has no target-free representation of its own)."""
        history = self._recent(batch)
        is_item = (history != self.pad_id).unsqueeze(-1)
        total = (self.item_embedding(history) * is_item).sum(dim=1)
        return total / is_item.sum(dim=1).clamp(min=1)

    def score_candidates(self, batch: Batch, candidates: Tensor) -> Tensor:
        history = self._recent(batch)
        user = self.user_embedding(self.user_ids(batch)) if self.user_embedding is not None else None
        chunks = candidates.split(self.config.chunk_size, dim=1)
        return torch.cat([self._score(history, chunk, user) for chunk in chunks], dim=1)

    def score_all(self, batch: Batch) -> Tensor:
        items = torch.arange(self.n_items, device=batch["history"].device)
        return self.score_candidates(batch, items.expand(batch["history"].size(0), -1))

    @property
    def target_representation_dim(self) -> int:
        return self.mlp[-1].in_features

    def target_representation(self, batch: Batch, target: Tensor) -> Tensor:
        """FloatTensor[B, h]: the prediction MLP's last hidden layer for (history, ``target`` LongTensor[B]).

        DIN's logit is a linear readout of it, so it carries what the model knows about this user and this
        target (RecLoRA's CRM, SIM, is target-aware the same way)."""
        history = self._recent(batch)
        user = self.user_embedding(self.user_ids(batch)) if self.user_embedding is not None else None
        return self.mlp[:-1](self._mlp_input(history, target[:, None], user))[:, 0]

    def _score(self, history: Tensor, candidates: Tensor, user: Tensor | None) -> Tensor:
        """Logits FloatTensor[B, C] for history LongTensor[B, L] and candidates LongTensor[B, C]."""
        return self.mlp(self._mlp_input(history, candidates, user)).squeeze(-1)

    def _mlp_input(self, history: Tensor, candidates: Tensor, user: Tensor | None) -> Tensor:
        """The prediction MLP's input FloatTensor[B, C, k]: [interest, e_t, (e_user)] per candidate."""
        hist = self.item_embedding(history)  # [B, L, d]
        cand = self.item_embedding(candidates)  # [B, C, d]

        # The activation unit's first layer on [e_h, e_t, e_h - e_t, e_h * e_t], without materialising that
        # [B, C, L, 4d] input: W [e_h; e_t; e_h - e_t; e_h * e_t] = (W_h + W_d) e_h + (W_t - W_d) e_t
        # + W_p (e_h * e_t), and the last term contracts over d directly.
        w_hist, w_cand, w_diff, w_prod = self.attention_input.weight.chunk(4, dim=1)  # [A, d] each
        pre_activation = (
            (hist @ (w_hist + w_diff).T)[:, None]  # [B, 1, L, A]
            + (cand @ (w_cand - w_diff).T)[:, :, None]  # [B, C, 1, A]
            + torch.einsum("bcd,blad->bcla", cand, hist[:, :, None, :] * w_prod)  # [B, C, L, A]
            + self.attention_input.bias
        )
        weights = self.attention_rest(pre_activation).squeeze(-1)  # [B, C, L], unnormalised
        weights = weights.masked_fill((history == self.pad_id)[:, None, :], 0.0)
        interest = torch.einsum("bcl,bld->bcd", weights, hist)  # [B, C, d]

        features = [interest, cand]
        if user is not None:
            features.append(user[:, None, :].expand_as(cand))
        return torch.cat(features, dim=-1)

    def loss(self, batch: Batch) -> Tensor:
        """BCE for CTR batches; otherwise sampled softmax over the target and ``n_negatives`` other items."""
        if "label" in batch:
            return self.ctr_loss(batch)
        target = batch["target"]
        if self.n_items < 2:
            raise ValueError("the sampled-softmax loss needs at least 2 items")
        # Uniform over the n_items - 1 items other than the target: draw from [0, n_items - 1), then shift
        # draws at or above the target up by one.
        shape = (target.size(0), self.config.n_negatives)
        negatives = torch.randint(0, self.n_items - 1, shape, device=target.device)
        negatives = negatives + (negatives >= target[:, None]).long()
        logits = self.score_candidates(batch, torch.cat([target[:, None], negatives], dim=1))
        return F.cross_entropy(logits, torch.zeros_like(target))
