"""Collaborative knowledge injection (DARec): CF vectors (a user embedding, history item embeddings of a trained
CRM such as SASRec) become M extra key/value slots in every decoder layer's attention, the way prefix tuning adds
learned prefixes, so every text token can read the collaborative signal at every depth instead of only through
input embeddings.

:class:`CFKeyValueInjector` maps ``cf`` [B, M, cf_dim] to per-layer keys and values and packs them into a
transformers ``DynamicCache``; :func:`forward_with_cf_prefix` runs a causal LM with that cache as
``past_key_values``. The cache holds the injector's output tensors themselves (``DynamicLayer.update``
concatenates, it does not detach), so the loss's gradient flows through the attention into the injector.

The prefix slots have no position: a Llama-style layer applies its rotary embedding to the new keys *before*
appending them to the cache, so the injected keys are used exactly as the injector produced them, while the
text tokens take positions from 0 (as without injection). The text's positions must therefore be the same in
training and inference; :func:`forward_with_cf_prefix` sets them, since the model would otherwise count the M
cached slots as positions 0..M-1 and start the text at M.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

ACTIVATIONS = ("tanh", "gelu")


class CFKeyValueInjector(nn.Module):
    """cf [B, M, cf_dim] -> keys and values [B, n_kv_heads, M, head_dim] for each of the model's decoder layers.

    A prefix-tuning style reparametrisation: LayerNorm -> Linear(cf_dim -> hidden) -> tanh (or GELU) ->
    Linear(hidden -> n_layers * 2 * n_kv_heads * head_dim); one shared network emits every layer's slots, so
    deep layers do not each need their own. The LayerNorm makes the slots indifferent to the CRM's embedding
    scale (which would otherwise saturate tanh). ``config`` is the LM's config (its text config for multimodal
    ones): ``num_hidden_layers``, ``num_key_value_heads`` (else ``num_attention_heads``) and ``head_dim`` (else
    ``hidden_size / num_attention_heads``). The slots start random, not neutral: like a prefix, they take part
    of the attention from the first step.
    """

    def __init__(self, cf_dim: int, config: Any, *, hidden: int = 512, activation: str = "tanh") -> None:
        super().__init__()
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        if cf_dim < 1 or hidden < 1:
            raise ValueError(f"cf_dim and hidden must be >= 1, got {cf_dim} and {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.cf_dim = cf_dim
        self.n_layers = int(config.num_hidden_layers)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        out = self.n_layers * 2 * self.n_kv_heads * self.head_dim
        self.net = nn.Sequential(
            nn.LayerNorm(cf_dim),
            nn.Linear(cf_dim, hidden),
            nn.Tanh() if activation == "tanh" else nn.GELU(),
            nn.Linear(hidden, out),
        )

    def forward(self, cf: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values, each [n_layers, B, n_kv_heads, M, head_dim], in the injector's dtype (``cf`` is cast
        to it, so an fp32 CRM table feeds a bf16 injector)."""
        if cf.dim() != 3 or cf.size(-1) != self.cf_dim:
            raise ValueError(f"cf must be [B, M, {self.cf_dim}], got shape {tuple(cf.shape)}")
        weight = self.net[1].weight
        batch, slots = cf.shape[:2]
        out = self.net(cf.to(device=weight.device, dtype=weight.dtype))
        out = out.view(batch, slots, self.n_layers, 2, self.n_kv_heads, self.head_dim)
        keys, values = out.permute(3, 2, 0, 4, 1, 5).unbind(0)  # each [L, B, H_kv, M, D]
        return keys, values

    def cache(self, cf: Tensor, *, config: Any = None, dtype: torch.dtype | None = None) -> DynamicCache:
        """A fresh ``DynamicCache`` holding the M slots in every layer (``config``: the LM's, so the cache gets
        its layer types; ``dtype``: the text keys', since the model concatenates its own keys to these). The
        model appends the text's keys to it during the forward, so build one per call."""
        keys, values = self(cf)
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        cache = DynamicCache(config=config)
        for layer in range(self.n_layers):
            cache.update(keys[layer], values[layer], layer)
        return cache


def forward_with_cf_prefix(
    model: nn.Module,
    injector: CFKeyValueInjector,
    cf: Tensor,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    cf_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``model`` (a causal LM, or an :class:`~recadapt.adapters.AdaptedModel`: ``cond=`` passes through
    ``kwargs`` with ``labels`` and the rest) on the text with ``cf``'s M slots in front of it in every layer.

    ``attention_mask`` is either the text's 2-D padding mask [B, T] (default all ones), extended here by
    ``cf_mask`` [B, M] (default all ones; 0 hides a slot, e.g. a padded history item), or a ready 4-D mask
    [B, 1, T, M + T] from :func:`recadapt.llm.masking.context_attention_mask` with ``prefix_len=M`` (hide slots
    through its ``prefix_mask``; ``cf_mask`` is refused). ``position_ids`` default to 0, 1, ... over each row's
    real tokens for a 2-D mask (left padding included) and to 0..T-1 for a 4-D one. The slots are cast to the
    model's dtype (its input embeddings'), which is the text keys' dtype: on a bf16 model a float32 slot would
    fail the attention's dtype check, and under autocast a Llama's keys stay in the residual stream's dtype
    (the rotary embedding multiplies them by cos/sin in that dtype). Returns the model's output;
    its ``past_key_values`` holds the slots plus the text (decoding on from it needs explicit positions).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    text = input_ids if input_ids is not None else inputs_embeds
    assert text is not None
    batch, length, device = text.size(0), text.size(1), text.device
    if cf.dim() != 3 or cf.size(0) != batch:
        raise ValueError(
            f"cf must be [B, M, cf_dim] with B = {batch} (one row per text row; expand it like the text), "
            f"got shape {tuple(cf.shape)}"
        )
    slots = cf.size(1)
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape != (batch, 1, length, slots + length):
            raise ValueError(
                f"a 4-D attention_mask must be [B, 1, T, M + T] = [{batch}, 1, {length}, {slots + length}] "
                f"(context_attention_mask with prefix_len=M), got {tuple(attention_mask.shape)}"
            )
        if cf_mask is not None:
            raise ValueError("with a 4-D attention_mask, hide CF slots through its prefix_mask, not cf_mask")
        full_mask = attention_mask
        if position_ids is None:
            position_ids = torch.arange(length, device=device).expand(batch, -1)
    else:
        text_mask = attention_mask if attention_mask is not None else torch.ones(batch, length, device=device)
        if text_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask must be [B, T] or [B, 1, T, M + T], got {tuple(text_mask.shape)}"
            )
        if cf_mask is None:
            cf_mask = torch.ones(batch, slots, device=device)
        if cf_mask.shape != (batch, slots):
            raise ValueError(f"cf_mask must be [B, M] = [{batch}, {slots}], got {tuple(cf_mask.shape)}")
        text_mask = text_mask.to(device).long()
        full_mask = torch.cat([cf_mask.to(device).long(), text_mask], dim=1)
        if position_ids is None:
            position_ids = (text_mask.cumsum(-1) - 1).clamp(min=0)
    dtype = model.get_input_embeddings().weight.dtype
    cache = injector.cache(cf, config=model.config, dtype=dtype)
    return model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=full_mask,
        position_ids=position_ids,
        past_key_values=cache,
        **kwargs,
    )
