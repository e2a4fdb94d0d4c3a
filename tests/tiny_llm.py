"""Offline stand-ins for an LLM backbone: a byte-level tokenizer and a tiny random Llama, savable as a local model
folder that :func:`recadapt.llm.load_backbone` loads like a real one. Tests import this module as ``tiny_llm``
(``tests/`` is on ``sys.path`` through its ``conftest.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# A ChatML template like SmolLM2's, without its default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte plus ChatML specials: tiny, offline, and lossless when decoding."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    vocab_size: int, *, hidden_size: int = 32, seed: int = 0, logit_scale: float = 1.0, **config: Any
) -> LlamaForCausalLM:
    """A 2-layer random Llama with the usual projection names (q/k/v/o, gate/up/down) for LoRA to target.

    ``config`` adds or overrides :class:`~transformers.LlamaConfig` fields (``pad_token_id``,
    ``attn_implementation``, ...). ``logit_scale`` multiplies the output layer: with the default init, logits after
    the final norm stay within about +-1, so greedy choices are near-ties and LoRA on the frozen layers could barely
    move the loss of a random model.
    """
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **config}))
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


def save_tiny_backbone(folder: Path, *, chat: bool = True, seed: int = 0, logit_scale: float = 20.0) -> Path:
    """Write a tiny model + tokenizer folder (safetensors) and return it.

    The output layer is scaled up (``logit_scale``, see :func:`tiny_llama`) so that LoRA training moves the loss.
    """
    tokenizer = byte_tokenizer(chat)
    model = tiny_llama(len(tokenizer), seed=seed, logit_scale=logit_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def randomize_lora_b(model: Any, seed: int) -> Any:
    """Give every adapter layer's ``lora_B`` (zero at init) seeded random values, so the update matters in a
    test; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
    return model.eval()
