"""DARec (Liu et al., arXiv 2408.07427), as reconstructed in ``specs/laser-darec.md`` from its abstract: an LLM
adapted layer by layer for full-ranking next-item recommendation.

- The prompt lists the history items as text segments and ends with a trainable ``[SEQ]`` token; its final hidden
  state, through a user projection, is scored (cosine / temperature) against an *item projection* of every item's text
  vector (the backbone's mean-pooled title states, PCA-reduced and cached, as ReLLa's SUBR computes them), with
  softmax cross-entropy over the whole catalogue.
- **Context masking** (``context_masking``): a 4-D attention mask under which each history item's tokens attend
  only within the item, while ``[SEQ]`` and the instruction see everything before them.
- **Collaborative knowledge injection** (``cf_injection``): a trained SASRec's user vector and its embeddings of
  the ``cf_items`` most recent history items become extra key/value slots in every layer's attention.
- **Item side** (``item_cf``, recadapt's addition, off by default): the item table also projects each item's CRM
  embedding (standardised to the text vectors' scale), so items are placed collaboratively and not only by
  their titles.
- **Dynamic adaption** (``adapter_plan``): each decoder layer gets its own adapter kind and rank (``none``,
  ``lora``, ``moe-lora`` gated by the SASRec user vector, ``bottleneck``), chosen by
  :mod:`recadapt.train.search` with Optuna; a single entry (``lora:8``) is the uniform-LoRA ablation.
Every part is a switch, so each ablation is a one-line override.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.cf.base import SequentialRecommender
from recadapt.data.batching import pad_histories
from recadapt.llm.embedding import TAIL, HistoryPromptBuilder, append_token, hidden_at
from recadapt.llm.kv_injection import CFKeyValueInjector, forward_with_cf_prefix
from recadapt.llm.masking import context_attention_mask
from recadapt.methods.base import FullRankingModel

PLAN_KINDS = ("none", "lora", "moe-lora", "bottleneck")
INSTRUCTION = "Predict the next item for a user who interacted with, oldest first:"


def _default_kinds() -> list[str]:
    return list(PLAN_KINDS)


def _default_ranks() -> list[int]:
    return [4, 8, 16]


@dataclass
class DARecConfig:
    """DARec's ``model`` section (a reconstruction; every part switchable) and its adapter-search settings."""

    name: str = "darec"
    # one entry for every decoder layer, or one per layer: none | <kind>:<rank>, e.g. "lora:8" or
    # "none,lora:4,moe-lora:8,..." (the search writes the per-layer form)
    adapter_plan: str = "lora:8"
    n_experts: int = 4  # experts of moe-lora layers (rank / n_experts each)
    context_masking: bool = True
    cf_injection: bool = True
    cf_items: int = 4  # CF slots: the user vector + this many most recent history items
    # recadapt's addition (off = the reconstruction): the item side also reads the CRM, each item's table row
    # = item projection of its text vector + a projection of its CRM embedding. Without it an item whose title
    # says nothing about it (synth-cf) can only be placed by the few steps that see it as a target.
    item_cf: bool = False
    injector_hidden: int = 256
    out_dim: int = 256  # width of the user and item projections
    temperature: float = 0.05  # of the cosine scores (as Laser's)
    text_dim: int = 512  # PCA dimension of the item text vectors
    valid_samples: int = 200
    instruction: str = INSTRUCTION
    tail: str = TAIL
    # the search (recadapt search): layers are grouped into search_groups contiguous blocks sharing one choice
    search_kinds: list[str] = field(default_factory=_default_kinds)
    search_ranks: list[int] = field(default_factory=_default_ranks)
    search_groups: int = 6
    search_train_samples: int = 128
    search_valid_samples: int = 100
    search_epochs: int = 1
    search_sampler: str = "tpe"
    search_storage: str = ""  # empty: sqlite:///RUN_DIR/search.db
    search_study: str = ""  # empty: the run name
    search_heartbeat: int = 60  # seconds; a trial silent for 2 heartbeats is failed and retried

    def __post_init__(self) -> None:
        for name in ("n_experts", "cf_items", "injector_hidden", "out_dim", "text_dim", "valid_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.search_kinds) - set(PLAN_KINDS))
        if unknown or not self.search_kinds:
            raise ValueError(f"model.search_kinds must be among {PLAN_KINDS}, got {self.search_kinds}")
        if not self.search_ranks or min(self.search_ranks) < 1:
            raise ValueError(f"model.search_ranks must be positive ranks, got {self.search_ranks}")
        if self.search_groups < 1:
            raise ValueError(f"model.search_groups must be >= 1, got {self.search_groups}")
        parse_plan(self.adapter_plan, None)


def parse_plan(text: str, n_layers: int | None) -> list[tuple[str, int] | None]:
    """``adapter_plan`` as one (kind, rank) or None per layer; a single entry applies to every layer."""
    entries = [e.strip() for e in str(text).split(",") if e.strip()]
    if not entries:
        raise ValueError("model.adapter_plan is empty; write e.g. lora:8 or none")
    parsed: list[tuple[str, int] | None] = []
    for entry in entries:
        if entry == "none":
            parsed.append(None)
            continue
        kind, _, rank = entry.partition(":")
        if kind not in PLAN_KINDS[1:] or not rank.isdigit() or int(rank) < 1:
            raise ValueError(
                f"model.adapter_plan entry {entry!r}: expected none or <kind>:<rank>, kinds {PLAN_KINDS[1:]}"
            )
        parsed.append((kind, int(rank)))
    if n_layers is None:
        return parsed
    if len(parsed) == 1:
        return parsed * n_layers
    if len(parsed) != n_layers:
        raise ValueError(
            f"model.adapter_plan has {len(parsed)} entries; the backbone has {n_layers} layers (or give one)"
        )
    return parsed


def n_decoder_layers(backbone: str) -> int:
    from recadapt.llm.backbone import load_backbone

    config = load_backbone(backbone).model.config
    return int(config.get_text_config(decoder=True).num_hidden_layers)


class DARec(FullRankingModel):
    """An (adapted) causal LM with ``[SEQ]``, user and item projections, and optional CF slots and context mask."""

    def __init__(
        self,
        llm: nn.Module,
        crm: SequentialRecommender,
        prompts: HistoryPromptBuilder,
        config: DARecConfig,
        item_text: Tensor,
        seq_init: Tensor,
        conditioned: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.crm = crm.requires_grad_(False).eval()
        self.prompts = prompts
        self.conditioned = conditioned
        hidden = int(seq_init.numel())
        self.seq_token = nn.Parameter(seq_init.detach().float().clone())
        self.register_buffer("item_text", item_text.float(), persistent=False)
        self.user_proj = nn.Linear(hidden, config.out_dim)
        self.item_proj = nn.Linear(item_text.size(1), config.out_dim)
        self.item_cf_proj = nn.Linear(crm.embedding_dim, config.out_dim) if config.item_cf else None
        if config.item_cf:
            self._balance_item_sources(crm)
        self.injector = (
            CFKeyValueInjector(crm.embedding_dim, llm.config, hidden=config.injector_hidden)
            if config.cf_injection
            else None
        )

    def _balance_item_sources(self, crm: SequentialRecommender) -> None:
        """Standardise the CRM item table (per feature) to the text vectors' per-feature RMS, so the two item
        projections start at the same scale. Raw, the text vectors (PCA of hidden states, norm ~9.5 on SmolLM2)
        swamp the CRM embeddings (norm ~0.6): on synth-cf the table then told genres apart no better than chance
        and DARec ranked at most-popular although its user vectors carried the genre (benchmarks/darec_slots.py).
        The statistics are buffers of the frozen CRM's table, taken once at build time."""
        table = crm.item_embedding.weight[: crm.n_items].detach().float()
        text_rms = self.item_text.pow(2).mean().sqrt()
        self.register_buffer("item_cf_mean", table.mean(0), persistent=False)
        self.register_buffer("item_cf_scale", text_rms / table.std(0).clamp_min(1e-6), persistent=False)

    def train(self, mode: bool = True) -> DARec:
        super().train(mode)
        self.crm.eval()
        return self

    def _cf_slots(self, crm_history: Tensor, user: Tensor) -> tuple[Tensor, Tensor]:
        recent = crm_history[:, -self.config.cf_items :]
        items = self.crm.item_embedding(recent)  # PAD rows are zero, and masked below
        slots = torch.cat([user[:, None], items], dim=1)
        mask = torch.cat([torch.ones_like(recent[:, :1]), (recent != self.crm.pad_id).long()], dim=1)
        return slots, mask

    def crm_inputs(self, histories: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """(the padded CRM history ids [B, max_len], the frozen CRM's user vectors [B, d]) of ``histories``."""
        crm_history = torch.from_numpy(
            pad_histories(list(histories), self.crm.config.max_len, self.crm.n_items)
        ).to(self.seq_token.device)
        with torch.no_grad():
            user = self.crm.user_representation({"history": crm_history}).float()
        return crm_history, user

    def user_embeddings(self, histories: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        device = self.seq_token.device
        encoded = self.prompts.encode(histories).to(device)
        embeds = self.llm.get_input_embeddings()(encoded.input_ids)
        embeds, mask, index = append_token(embeds, encoded.attention_mask, encoded.lengths, self.seq_token)
        segments = F.pad(encoded.segment_ids, (0, 1))  # [SEQ] reads everything before it
        crm_history, user = self.crm_inputs(histories)
        extra = {"cond": user} if self.conditioned else {}
        extra.update(output_hidden_states=True, logits_to_keep=1, use_cache=False)
        if self.injector is not None:
            slots, slot_mask = self._cf_slots(crm_history, user)
            if self.config.context_masking:
                attention = context_attention_mask(
                    segments, mask, prefix_len=slots.size(1), prefix_mask=slot_mask, dtype=embeds.dtype
                )
                out = forward_with_cf_prefix(
                    self.llm, self.injector, slots, inputs_embeds=embeds, attention_mask=attention, **extra
                )
            else:
                out = forward_with_cf_prefix(
                    self.llm, self.injector, slots, inputs_embeds=embeds, attention_mask=mask, cf_mask=slot_mask,
                    **extra,
                )  # fmt: skip
        elif self.config.context_masking:
            attention = context_attention_mask(segments, mask, dtype=embeds.dtype)
            positions = torch.arange(embeds.size(1), device=device).expand(embeds.size(0), -1)
            out = self.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, **extra)
        else:
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, **extra)
        users = self.user_proj(hidden_at(out.hidden_states[-1], index).float())
        return users, torch.zeros((), device=device)

    def item_table(self, progress: bool = False) -> Tensor:
        table = self.item_proj(self.item_text)
        if self.item_cf_proj is not None:
            with (
                torch.no_grad()
            ):  # the input table, as the CF slots read it (and the shuffled probe permutes)
                collaborative = self.crm.item_embedding.weight[: self.crm.n_items].float()
            collaborative = (collaborative.to(table.device) - self.item_cf_mean) * self.item_cf_scale
            table = table + self.item_cf_proj(collaborative)
        return table

    def logits(self, users: Tensor, table: Tensor) -> Tensor:
        """Cosine over ``temperature``: a raw dot product of freshly initialised projections starts the softmax
        over 1,682 items at a loss near 35 instead of ln(1682) = 7.4, and training spends its few steps on scale."""
        table = table.to(users.device, users.dtype)
        return F.normalize(users, dim=-1) @ F.normalize(table, dim=-1).T / self.config.temperature

    def trainable_state_dict(self) -> dict[str, Tensor]:
        state = super().trainable_state_dict()
        return {k: v for k, v in state.items() if not k.startswith("crm.")}


def adapter_configs(plan: list[tuple[str, int] | None], llm, options: DARecConfig, cond_dim: int) -> dict:
    """Per-layer typed adapter configs; LoRA-like kinds keep ``llm.lora_alpha / llm.lora_r`` as their scaling."""
    from recadapt.adapters import make_config

    configs = {}
    for layer, entry in enumerate(plan):
        if entry is None:
            configs[layer] = None
            continue
        kind, rank = entry
        values = {
            "r": rank,
            "alpha": llm.lora_alpha * rank / llm.lora_r,
            "dropout": llm.lora_dropout,
            "target_modules": list(llm.lora_target_modules),
        }
        if kind == "moe-lora":
            values.update(n_experts=min(options.n_experts, rank), cond_dim=cond_dim)
        configs[layer] = make_config(kind, **values)
    return configs


def build_darec(config, llm, prepared, progress: bool = False) -> tuple[DARec, list]:
    """DARec from a run config: backbone with the plan's adapters, the SASRec run ``llm.crm_run`` frozen."""
    from recadapt.adapters import attach_layerwise
    from recadapt.adapters.base import ConditionedConfig
    from recadapt.llm.retrieval import backbone_item_vectors
    from recadapt.methods import frozen_parts, method_config
    from recadapt.methods.base import Stage
    from recadapt.methods.laser import suffix_initialisation

    options = method_config(DARecConfig, config.model)
    backbone, crm, titles = frozen_parts(config, llm, prepared)
    item_text = backbone_item_vectors(
        backbone, config.data.dataset, titles, dim=options.text_dim, progress=progress
    )  # computed before any adapter is attached: the frozen backbone's view of each title
    seq_init = suffix_initialisation(backbone.model, backbone.tokenizer)
    n_layers = int(backbone.model.config.get_text_config(decoder=True).num_hidden_layers)
    plan = adapter_configs(parse_plan(options.adapter_plan, n_layers), llm, options, crm.embedding_dim)
    llm_model: nn.Module = backbone.model.requires_grad_(False)
    conditioned = any(isinstance(c, ConditionedConfig) for c in plan.values())
    if any(c is not None for c in plan.values()):
        llm_model = attach_layerwise(backbone.model, plan)
    prompts = HistoryPromptBuilder(
        backbone.tokenizer, titles, instruction=options.instruction, tail=options.tail
    )
    model = DARec(llm_model, crm, prompts, options, torch.from_numpy(item_text), seq_init, conditioned)
    model.to(backbone.device)
    return model, [Stage("train", llm.epochs)]
