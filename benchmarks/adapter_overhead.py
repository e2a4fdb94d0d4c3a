"""Training-step cost of the personalized adapters against plain LoRA at the same total rank.

    .venv/bin/python benchmarks/adapter_overhead.py                                    # SmolLM2-135M shapes
    .venv/bin/python benchmarks/adapter_overhead.py --layers 2 --batch 2 --seq 64 --threads 1   # quick

The backbone has SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 heads, 3 KV heads, vocabulary 49,152,
tied embeddings; 30 layers unless --layers) with random weights, so nothing is downloaded. Every kind adapts
q, k, v, o, gate, up and down of every layer at total rank r = 8, alpha 16, no dropout:
  lora           rank 8;
  moe-lora       K = 4 experts of rank 2 (iLoRA's split; the same parameters as lora), the CNN gate;
  personal-lora  N_m = 4 meta-LoRAs of rank 8 each: a user's mixed LoRA (A_u, B_u) has rank 8, the rank the
                 LLM's layers see, while the bank holds 4x lora's parameters (RecLoRA mixes full-rank members);
  cf-lora        r = 8 with an 8 x 8 G per instance, A and B trainable.
The conditioned kinds get a random cond [batch, 64] (a SASRec-sized representation).

A step is forward + backward (causal LM loss over all tokens) + AdamW step over the trainable parameters. All
kinds share the frozen base weights and run in one process: one warm-up step each, then --repeats rounds of one
step per kind, the order rotating every round, so drift in the machine's load hits every kind alike. Columns:
the median over rounds of the step-time ratio to lora in the same round, median seconds per step (CPU seconds
with --clock cpu), and the matmul GFLOP of one step (counted during the warm-up step, so machine-independent).
Target: ratio <= 1.05 for every kind. On a shared CPU pass --threads 1 (and expect noise of a few percent).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from recadapt.adapters import AdaptedModel, attach_adapters, make_config

COND_DIM = 64
KINDS: dict[str, dict[str, Any]] = {
    "lora": {},
    "moe-lora": {"n_experts": 4, "cond_dim": COND_DIM},
    "personal-lora": {"n_members": 4, "cond_dim": COND_DIM},
    "cf-lora": {"cond_dim": COND_DIM},
}


def smollm2_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    )


def build_models(layers: int, device: torch.device) -> dict[str, AdaptedModel]:
    """One adapted model per kind, all on the same frozen base weights (shared tensors, one copy in memory)."""
    torch.manual_seed(0)
    config = smollm2_config(layers)
    shared = LlamaForCausalLM(config).to(device).state_dict()
    models = {}
    for kind, values in KINDS.items():
        base = LlamaForCausalLM(config).to(device)
        base.load_state_dict(shared, assign=True)  # drop the fresh weights, reuse the shared ones
        torch.manual_seed(1)
        models[kind] = attach_adapters(base, make_config(kind, r=8, alpha=16.0, **values)).train()
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one step per kind each)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (GPUs, CPUs with native bf16)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (all threads), which other jobs "
        "time-slicing a shared CPU do not inflate (CPU devices only)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU devices only")
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    models = build_models(args.layers, device)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 49152, (args.batch, args.seq), generator=generator).to(device)
    cond = torch.randn(args.batch, COND_DIM, generator=generator).to(device)
    optimizers = {kind: torch.optim.AdamW(m.param_groups(lr=1e-4)) for kind, m in models.items()}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.autocast else nullcontext

    def step(kind: str) -> float:
        model, optimizer = models[kind], optimizers[kind]
        start = clock()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=input_ids, labels=input_ids, cond=None if kind == "lora" else cond).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    kinds = list(models)
    flops = {}
    for kind in kinds:
        with FlopCounterMode(display=False) as counter:
            step(kind)  # warm-up
        flops[kind] = counter.get_total_flops()
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(args.repeats):
        shift = round_ % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            seconds[kind].append(step(kind))

    precision = "bf16 autocast" if args.autocast else "fp32"
    print(
        f"SmolLM2-135M shapes, {args.layers} layers, random weights, on {device} ({precision}, "
        f"{torch.get_num_threads()} torch threads, {args.clock} clock); batch {args.batch} x {args.seq} tokens; "
        f"{args.repeats} rounds after 1 warm-up step per kind; total rank 8 on q,k,v,o,gate,up,down"
    )
    for kind in kinds:
        ratios = [s / base for s, base in zip(seconds[kind], seconds["lora"], strict=True)]
        trainable = sum(p.numel() for group in models[kind].param_groups(1.0) for p in group["params"])
        print(
            f"ratio {kind}/lora = {statistics.median(ratios):.2f}   "
            f"median {statistics.median(seconds[kind]):.3f} s/step "
            f"(min {min(seconds[kind]):.3f}, max {max(seconds[kind]):.3f}); "
            f"{flops[kind] / 1e9:.1f} GFLOP ({flops[kind] / flops['lora']:.4f} x lora); "
            f"{trainable / 1e6:.2f}M trainable"
        )
    print("target: ratio <= 1.05 for every kind")


if __name__ == "__main__":
    main()
