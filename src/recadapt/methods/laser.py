"""Laser (Zhang et al., arXiv 2409.01605): a frozen LLM turned into a full-ranking recommender by bi-tuning.

Only two things train: the M-Former, which reads a frozen CRM's per-item outputs and writes L prefix tokens, and
one suffix token ``s``. Input = ``[p_1 .. p_L] + prompt(history titles) + [s]``; the LLM's final hidden state at
``s`` embeds the user. An item is embedded by the same template with a one-item history, so users and items live
in one space and the catalogue is ranked by cosine similarity. Loss: softmax over all items (temperature 0.05)
+ 0.01 x the Switch load-balancing loss of the M-Former's router.

The ablations of the paper are switches of :class:`LaserConfig`: ``use_moe=False`` (one query set),
``use_prefix=False`` (no M-Former: the frozen LLM and the suffix token only) and ``stage1_epochs=0`` (train
against the table of the untrained model).

The item table is cached between calls (:class:`_ItemTableCache`): everything an item's embedding needs that no
trainable parameter reaches is computed once, and only what depends on the M-Former and the suffix is recomputed.
Because the prefix comes *first*, causal attention makes every text state depend on it, so with the prefix the LLM
forward of the whole prompt must run at every refresh; only without it (the ``use_prefix=False`` ablation) can the
prompt's keys and values be cached, leaving one suffix-token step per item.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

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


@dataclass
class _ItemBatch:
    """Catalogue items whose one-item prompts have the same length, so one forward needs no padding and no mask.

    ``items`` [b] item ids; ``input_ids`` [b, T] their prompts; ``crm_states`` [b, N, d] and ``crm_real`` [b, N]
    the frozen CRM's reading of each one-item history (None without the M-Former); ``past`` per LLM layer the
    (keys, values) [b, kv_heads, T - P, head_dim] of the prompt after the shared first P tokens (no-prefix only).
    """

    items: Tensor
    input_ids: Tensor
    crm_states: Tensor | None = None
    crm_real: Tensor | None = None
    past: list[tuple[Tensor, Tensor]] | None = None


@dataclass
class _ItemTableCache:
    """What :meth:`Laser.item_table` reuses between calls, and the state of the frozen parts it was built from.

    Each cached thing is frozen, i.e. no trainable parameter (M-Former, suffix) reaches it:

    * the prompt token ids and the batch layout (items grouped by prompt length): a function of the tokenizer and
      the titles only (``prompts``, built once);
    * ``crm_states`` / ``crm_real``: the CRM's output for each one-item history; the CRM is frozen and in eval
      mode, and the M-Former reads it as input (the M-Former itself reruns at every call);
    * ``past`` and ``shared`` (only when ``use_prefix=False``): the LLM's keys and values of the prompt. Without a
      prefix the prompt is ``instruction + 1. title + tail`` followed by the suffix, so under causal attention no
      prompt position sees the suffix: the prompt's states are a function of the frozen LLM and the token ids. The
      first ``shared_len`` tokens (the instruction and "1.") are the same for every item and stored once.

    Not cached: the LLM forward over ``prefix + prompt + suffix`` when the prefix is on. The prefix is the M-Former's
    output and comes first, so every later position depends on it. Nor the embedding lookup of the prompt tokens:
    it is a gather, microseconds against the forward, and would hold a [tokens, H] copy of the table.

    ``key`` records the frozen parts' tensors (storage, in-place version, dtype, device), the autocast state and
    the batch size; :meth:`Laser.item_table` rebuilds the cache when it differs (an in-place edit of the CRM such
    as ``permute_crm_items``, ``model.to(...)``, a reload of weights).
    """

    key: tuple
    batches: list[_ItemBatch]
    shared: list[tuple[Tensor, Tensor]] | None = None
    shared_len: int = 0
    kv_bytes: int = 0  # memory the cached keys and values take


def _tensor_state(module: nn.Module) -> tuple:
    """Identity of every parameter and buffer of ``module``: changes when one is replaced, moved, cast or edited in
    place (``Tensor._version`` counts in-place writes, ``copy_`` of ``load_state_dict`` included)."""
    return tuple(
        (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
        for t in itertools.chain(module.parameters(), module.buffers())
    )


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    first = rows[0]
    length = min(len(r) for r in rows)
    for row in rows[1:]:
        n = 0
        while n < length and row[n] == first[n]:
            n += 1
        length = n
    return length


class Laser(FullRankingModel):
    """Frozen ``llm`` (a Hugging Face causal LM) and ``crm``; trainable M-Former and suffix token.

    ``kv_cache_max_bytes``: the most memory the no-prefix ablation's cached prompt keys and values may take (about
    1.05 GiB for ml-100k with SmolLM2-135M in fp32); above it only the frozen inputs are cached.
    """

    table_needs_llm = True
    kv_cache_max_bytes: ClassVar[int] = 4 << 30

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
        self._table_cache: _ItemTableCache | None = None

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

    def item_table(self, progress: bool = False, use_cache: bool = True) -> Tensor:
        """Every item through the user template with a one-item history (no gradients), float32 on the CPU.

        ``use_cache``: reuse what the trainable parameters do not reach (:class:`_ItemTableCache`); the values are
        those of ``use_cache=False`` (which runs :meth:`user_embeddings` over the catalogue) to float rounding.
        The frozen LLM and CRM in training mode (never under :meth:`train`) bypass the cache.
        """
        if not use_cache or self.llm.training or self.crm.training:
            return self._item_table_uncached(progress)
        with torch.no_grad():
            cache = self._item_cache()
            return self._cached_item_table(cache, progress)

    def clear_table_cache(self) -> None:
        """Drop the cached item-table inputs (they are rebuilt by the next :meth:`item_table`)."""
        self._table_cache = None

    def _item_table_uncached(self, progress: bool = False) -> Tensor:
        ids = np.arange(self.n_items)

        def embed(batch: np.ndarray) -> Tensor:
            return self.user_embeddings([np.array([i]) for i in batch])[0]

        return embed_in_batches(embed, ids, self.config.item_batch_size, desc="item table", progress=progress)

    # --- the item-table cache ------------------------------------------------------------------------------------

    def _frozen_key(self) -> tuple:
        device = self.suffix.device
        key: tuple = (
            id(self.prompts),
            self.n_items,
            self.config.item_batch_size,
            device,
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )
        if self.mformer is not None:
            key += (_tensor_state(self.crm), self.crm.config.max_len)
        else:  # the cached keys and values are the LLM's
            key += (_tensor_state(self.llm),)
        return key

    def _item_cache(self) -> _ItemTableCache:
        key = self._frozen_key()
        if self._table_cache is None or self._table_cache.key != key:
            self._table_cache = None  # free the stale one before building
            self._table_cache = self._build_item_cache(key)
        return self._table_cache

    def _build_item_cache(self, key: tuple) -> _ItemTableCache:
        device = self.suffix.device
        prompts = [self.prompts.prompt([i])[0] for i in range(self.n_items)]
        lengths = np.array([len(p) for p in prompts])
        batches = []
        for length in np.unique(lengths):
            same = np.flatnonzero(lengths == length)
            for start in range(0, len(same), self.config.item_batch_size):
                items = same[start : start + self.config.item_batch_size]
                batch = _ItemBatch(
                    items=torch.from_numpy(items),
                    input_ids=torch.tensor([prompts[i] for i in items], dtype=torch.long, device=device),
                )
                if self.mformer is not None:
                    history = pad_histories(
                        [np.array([i]) for i in items], self.crm.config.max_len, self.n_items
                    )
                    states, real = self.crm.history_states({"history": torch.from_numpy(history).to(device)})
                    batch.crm_states, batch.crm_real = states.float(), real
                batches.append(batch)
        cache = _ItemTableCache(key=key, batches=batches)
        if self.mformer is None:
            shared_len = min(_common_prefix(prompts), int(lengths.min()) - 1)
            per_token = self._kv_bytes_per_token()
            kv_bytes = None if per_token is None else per_token * int((lengths - shared_len).sum())
            if kv_bytes is not None and kv_bytes <= self.kv_cache_max_bytes:
                self._cache_prompt_states(cache, prompts[0][:shared_len])
        return cache

    def _kv_bytes_per_token(self) -> int | None:
        """Bytes of one token's keys and values in every layer, or None when the LLM's cache is not a plain
        per-layer concatenation (sliding-window or other special layers: those are not cached)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = self.llm.config
        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
            return None
        text = config.get_text_config(decoder=True)
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        # the residual stream's dtype: an upper bound under autocast too (a Llama's keys stay in it there)
        size = self.llm.get_input_embeddings().weight.element_size()
        return int(text.num_hidden_layers) * 2 * heads * head_dim * size

    def _past(self, layers: list[tuple[Tensor, Tensor]] | None, rows: int, cache: _ItemTableCache) -> Any:
        """A fresh ``DynamicCache`` holding the shared prompt states (repeated over ``rows``), then ``layers``. The
        model concatenates onto copies, so the cached tensors are never written."""
        from transformers import DynamicCache

        past = DynamicCache(config=self.llm.config)
        for index in range(len(past.layers)):
            parts = []
            if cache.shared is not None:
                k, v = cache.shared[index]
                parts.append((k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)))
            if layers is not None:
                parts.append(layers[index])
            if parts:
                past.update(torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2), index)
        return past

    def _cache_prompt_states(self, cache: _ItemTableCache, shared_ids: list[int]) -> None:
        """The LLM's keys and values of every item prompt (no prefix: frozen), the shared first tokens once."""
        decoder, embedding = decoder_of(self.llm), self.llm.get_input_embeddings()
        device = self.suffix.device
        cache.shared_len = len(shared_ids)
        if shared_ids:
            ids = torch.tensor([shared_ids], dtype=torch.long, device=device)
            out = decoder(inputs_embeds=embedding(ids), use_cache=True)
            cache.shared = [
                (layer.keys.clone(), layer.values.clone()) for layer in out.past_key_values.layers
            ]
        for batch in cache.batches:
            rows = batch.items.numel()
            tail = batch.input_ids[:, cache.shared_len :]
            out = decoder(
                inputs_embeds=embedding(tail), past_key_values=self._past(None, rows, cache), use_cache=True
            )
            batch.past = [
                (layer.keys[:, :, cache.shared_len :].clone(), layer.values[:, :, cache.shared_len :].clone())
                for layer in out.past_key_values.layers
            ]
        stored = [*(cache.shared or []), *(kv for batch in cache.batches for kv in batch.past or [])]
        cache.kv_bytes = sum(t.numel() * t.element_size() for kv in stored for t in kv)

    def _cached_item_table(self, cache: _ItemTableCache, progress: bool) -> Tensor:
        decoder, embedding = decoder_of(self.llm), self.llm.get_input_embeddings()
        table = torch.empty(self.n_items, self.suffix.numel(), dtype=torch.float32)
        for batch in tqdm(cache.batches, desc="item table", disable=not progress, leave=False):
            rows = batch.items.numel()
            dtype = embedding.weight.dtype
            if batch.past is not None:  # no prefix: the prompt's states are cached, one step for the suffix
                suffix = self.suffix.to(dtype).expand(rows, 1, -1)
                past = self._past(batch.past, rows, cache)
                hidden = decoder(inputs_embeds=suffix, past_key_values=past, use_cache=True).last_hidden_state
            else:
                embeds = embedding(batch.input_ids)
                parts = [embeds, self.suffix.to(embeds.dtype).expand(rows, 1, -1)]
                if self.mformer is not None:
                    assert batch.crm_states is not None and batch.crm_real is not None
                    prefix = self.mformer(batch.crm_states, batch.crm_real).prefix.to(embeds.dtype)
                    parts.insert(0, prefix)
                # equal lengths: no padding, no attention mask (the plain causal path)
                hidden = decoder(inputs_embeds=torch.cat(parts, 1), use_cache=False).last_hidden_state
            table[batch.items] = hidden[:, -1].float().cpu()
        return table

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
