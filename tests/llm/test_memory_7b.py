"""benchmarks/memory_7b.py, the 7B memory table of docs/scaling.md: its parameter counts against real models."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import benchmark_module
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def memory_7b():
    with benchmark_module("memory_7b") as module:
        yield module


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_and_lora_counts_match_a_real_llama(memory_7b, tied: bool) -> None:
    shapes = memory_7b.Shapes(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=100, tied=tied)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    assert shapes.params() == sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
    )
    assert shapes.linear_params() == linear
    # LoRA r=8 on q,v: A (r x in) + B (out x r) per matrix and layer; v_proj is narrower (2 KV heads)
    assert shapes.lora_params(8, ("q_proj", "v_proj")) == 3 * (8 * (64 + 64) + 8 * (64 + 32))


def test_llama2_7b_numbers(memory_7b) -> None:
    shapes = memory_7b.LLAMA2_7B
    assert shapes.params() == 6_738_415_616  # Llama-2-7B's published count
    assert shapes.lora_params(8, ("q_proj", "v_proj")) == 2 * 8 * 4096 * 2 * 32 == 4_194_304
    setup = memory_7b.Setup("bf16, 8 GPUs", "bf16", gpus=8, global_batch=4)
    row = memory_7b.estimate(shapes, setup, seq=512, r=8, targets=("q_proj", "v_proj"), answer=32)
    assert row["rows"] == 1  # a global micro-batch of 4 over 8 GPUs: at most one row each
    assert row["weights"] == 2 * 6_738_415_616
    assert row["act"] == 32 * 34 * 512 * 1 * 4096
    assert row["act_eager"] == 32 * (34 * 512 * 4096 + 5 * 32 * 512**2)
