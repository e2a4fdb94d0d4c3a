"""Laser (Zhang et al., arXiv 2409.01605): a frozen LLM turned into a full-ranking recommender by bi-tuning.

Only two things train: the M-Former, which reads a frozen CRM's per-item outputs and writes L prefix tokens, and
one suffix token ``s``. Input = ``[p_1 .. p_L] + prompt(history titles) + [s]``; the LLM's final hidden state at
``s`` embeds the user. An item is embedded by the same template with a one-item history, so users and items live
in one space and the catalogue is ranked by cosine similarity. Loss: softmax over all items (temperature 0.05)
+ 0.01 x the Switch load-balancing loss of the M-Former's router.

The ablations of the paper are switches of :class:`LaserConfig`: ``use_moe=False`` (one query set),
``use_prefix=False`` (no M-Former: the frozen LLM and the suffix token only) and ``stage1_epochs=0`` (train
against the table of the untrained model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.cf.base import SequentialRecommender
from recadapt.data.batching import pad_histories
from recadapt.llm.embedding import (
    INSTRUCTION,
    TAIL,
    HistoryPromptBuilder,
    append_token,
    decoder_of,
    embed_in_batches,
    hidden_at,
)
from recadapt.llm.mformer import MFormer, MFormerConfig
from recadapt.methods.base import FullRankingModel


@dataclass
class LaserConfig:
    """Laser's ``model`` section. Sizes default to what trains on a 2-core CPU; the paper's are in comments."""

    name: str = "laser"
    n_experts: int = 8  # K query experts (paper: 8)
    n_queries: int = 8  # L prefix tokens (paper: 32)
    n_blocks: int = 2  # M-Former blocks (paper: 12)
    hidden: int = 128  # M-Former width (paper: 768)
    n_heads: int = 4  # (paper: 12)
    dropout: float = 0.1
    use_moe: bool = True  # ablation "without MoE": one query set
    use_prefix: bool = True  # ablation "without prefix": no M-Former at all
    stage1_epochs: int = 2  # item table recomputed at every epoch (paper: 15); 0 = ablation "without stage 1"
    stage2_epochs: int = 1  # against the frozen best table (paper: 5)
    temperature: float = 0.05
    balance_weight: float = 0.01
    instruction: str = INSTRUCTION
    tail: str = TAIL
    item_batch_size: int = 32  # catalogue items per forward
    valid_samples: int = 200  # validation users ranked after every epoch (model selection)

    def __post_init__(self) -> None:
        for name in ("n_experts", "n_queries", "n_blocks", "hidden", "n_heads", "item_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or self.stage1_epochs + self.stage2_epochs < 1:
            raise ValueError("model.stage1_epochs and model.stage2_epochs must be >= 0 and not both 0")
        if self.temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")


class Laser(FullRankingModel):
    """Frozen ``llm`` (a Hugging Face causal LM) and ``crm``; trainable M-Former and suffix token."""

    table_needs_llm = True

    def __init__(
        self,
        llm: nn.Module,
        crm: SequentialRecommender,
        prompts: HistoryPromptBuilder,
        config: LaserConfig,
        suffix_init: Tensor,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm.requires_grad_(False)
        self.crm = crm.requires_grad_(False).eval()
        self.prompts = prompts
        self.n_items = crm.n_items
        hidden_size = int(suffix_init.numel())
        self.mformer = (
            MFormer(
                MFormerConfig(
                    crm_dim=crm.embedding_dim,
                    llm_hidden=hidden_size,
                    n_experts=config.n_experts,
                    n_queries=config.n_queries,
                    n_blocks=config.n_blocks,
                    hidden=config.hidden,
                    n_heads=config.n_heads,
                    dropout=config.dropout,
                    use_moe=config.use_moe,
                    balance_weight=config.balance_weight,
                )
            )
            if config.use_prefix
            else None
        )
        self.suffix = nn.Parameter(suffix_init.detach().float().clone())

    def train(self, mode: bool = True) -> Laser:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout in the backbone or the CRM
        self.crm.eval()
        return self

    def user_embeddings(self, histories: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        device = self.suffix.device
        encoded = self.prompts.encode(histories).to(device)
        embeds = self.llm.get_input_embeddings()(encoded.input_ids)
        mask, lengths = encoded.attention_mask, encoded.lengths
        auxiliary = torch.zeros((), device=device)
        if self.mformer is not None:
            crm_history = torch.from_numpy(
                pad_histories(list(histories), self.crm.config.max_len, self.n_items)
            )
            with torch.no_grad():
                states, real = self.crm.history_states({"history": crm_history.to(device)})
            routed = self.mformer(states.float(), real)
            prefix = routed.prefix.to(embeds.dtype)
            embeds = torch.cat([prefix, embeds], dim=1)
            mask = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1)
            lengths = lengths + prefix.size(1)
            auxiliary = self.config.balance_weight * routed.balance_loss
        embeds, mask, index = append_token(embeds, mask, lengths, self.suffix)
        hidden = decoder_of(self.llm)(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return hidden_at(hidden.last_hidden_state, index), auxiliary

    def item_table(self, progress: bool = False) -> Tensor:
        """Every item through the user template with a one-item history (no gradients)."""
        ids = np.arange(self.n_items)

        def embed(batch: np.ndarray) -> Tensor:
            return self.user_embeddings([np.array([i]) for i in batch])[0]

        return embed_in_batches(embed, ids, self.config.item_batch_size, desc="item table", progress=progress)

    def logits(self, users: Tensor, table: Tensor) -> Tensor:
        table = table.to(users.device)
        return F.normalize(users, dim=-1) @ F.normalize(table, dim=-1).T / self.config.temperature


def suffix_initialisation(llm: nn.Module, tokenizer) -> Tensor:
    """The suffix token starts as the end-of-sequence embedding (the paper's untrained-EOS baseline)."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return llm.get_input_embeddings().weight[int(token)].detach().float().clone()


def build_laser(config, llm, prepared, progress: bool = False) -> tuple[Laser, list]:
    """Laser from a run config: the backbone and the CRM run (``llm.crm_run``, BERT4Rec by default) frozen."""
    from recadapt.methods import frozen_parts, method_config
    from recadapt.methods.base import Stage

    options = method_config(LaserConfig, config.model)
    backbone, crm, titles = frozen_parts(config, llm, prepared)
    prompts = HistoryPromptBuilder(
        backbone.tokenizer, titles, instruction=options.instruction, tail=options.tail
    )
    model = Laser(
        backbone.model, crm, prompts, options, suffix_initialisation(backbone.model, backbone.tokenizer)
    )
    model.to(backbone.device)
    stages = [
        Stage("stage 1", options.stage1_epochs, refresh=True),
        Stage("stage 2", options.stage2_epochs, refresh=False),
    ]
    return model, [s for s in stages if s.epochs > 0]
