"""GPU memory of LoRA fine-tuning a 7B Llama-2-style backbone, estimated by arithmetic (no model is loaded).

    .venv/bin/python benchmarks/memory_7b.py                 # the table in docs/scaling.md
    .venv/bin/python benchmarks/memory_7b.py --batch 8 --seq 1024 --rank 16
    .venv/bin/python benchmarks/memory_7b.py --measure       # also check the counts on SmolLM2-135M (CPU, ~1 min)

An estimate, not a measurement: the formulas are printed with the table. Weights are counted exactly from the
shapes (Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000, untied output layer: 6.74B).

- bf16 weights: 2 bytes per parameter.
- 4-bit NF4 (bitsandbytes, ``llm.quantization=4bit``): the decoder layers' linear weights at 4 bits plus the
  quantization constants, 0.127 bits per parameter with double quantization (QLoRA, Dettmers et al. 2023: 8-bit
  absmax per 64-weight block, 32-bit constant per 256 blocks: 8/64 + 32/(64*256)). Embeddings, output layer and
  norms stay bf16 (transformers does not quantize the output layer). Plus, transiently, one dequantized weight.
- LoRA: A (r x in) and B (out x r) per adapted matrix; 16 bytes per LoRA parameter: the fp32 weight (recadapt
  keeps adapters in fp32: it is the master copy; autocast runs their matmuls in bf16), its fp32 gradient and
  AdamW's two fp32 moments. Several processes add one fp32 gradient buffer for the all-reduce.
- Activations, 16-bit, per decoder layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 1 without parallelism): 34*s*b*h + 5*a*s^2*b bytes (s tokens, b rows, h hidden, a
  heads). Its 5*a*s^2*b term is the attention matrix (scores, softmax, dropout mask), which fused attention
  (PyTorch SDPA, transformers' default for Llama; FlashAttention) never stores: the table shows 34*s*b*h per layer
  (SDPA) and the full formula (eager attention, an upper estimate). The 34 assumes a 4h GELU MLP with dropout;
  Llama's SwiGLU MLP without dropout, under LoRA (frozen weights need no saved input for their own gradient),
  saved 2% less than 34*s*b*h on SmolLM2-135M with bf16 weights under bf16 autocast (``--measure``).
- With gradient checkpointing (``llm.gradient_checkpointing``): each layer keeps only its 16-bit input, 2*s*b*h
  bytes, and one layer's activations (34*s*b*h) exist again while it is recomputed in the backward pass.
- Logits: only at the answer positions (recadapt's loss runs the output layer there only), bf16 plus the fp32 copy
  the loss takes and its gradient: b * answer_tokens * V * (2 + 4 + 4) bytes.

Not counted: the CUDA context, cuBLAS/NCCL workspaces and allocator slack (add roughly 1-3 GiB per GPU), and the
evaluation's generation cache. Data parallel (``recadapt train --processes 8``, torchrun, accelerate's multi-gpu
config): every process holds the whole model and its own LoRA states; ``llm.batch_size`` is the global
micro-batch, split across the processes, so a GPU computes ceil(batch / processes) rows.

``--measure`` loads SmolLM2-135M on the CPU (``load_backbone``) and compares what the formulas predict for its shapes
with what is there: its parameter count, the LoRA parameters ``with_lora`` adds, and the bytes of the tensors autograd
saves in one forward (a saved-tensors hook, each storage counted once) with fp32 weights, and with bf16
weights under bf16 autocast (the CUDA default). About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 2**30


@dataclass(frozen=True)
class Shapes:
    """A Llama-style decoder: the sizes that fix its parameter count and activation memory."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        f = self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear weights (what 4-bit quantizes)."""
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, output layer (unless tied) and RMSNorm weights (kept in 16-bit under 4-bit)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return embeddings + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """r * (in + out) per adapted matrix (A: r x in, B: out x r), in every layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


LLAMA2_7B = Shapes(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, tied=False)
SMOLLM2_135M = Shapes(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True)

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + double-quantized block constants: 4.127 bits
LORA_BYTES = 4 + 4 + 4 + 4  # fp32 weight (the master copy), fp32 gradient, AdamW exp_avg and exp_avg_sq


def layer_activation_bytes(s: int, b: int, h: int, a: int) -> int:
    """Korthikanti et al. 2022, 16-bit activations of one transformer layer: 34*s*b*h + 5*a*s^2*b."""
    return 34 * s * b * h + 5 * a * s * s * b


def fused_layer_activation_bytes(s: int, b: int, h: int) -> int:
    """The same without the attention matrix, which fused attention (SDPA, transformers' default) never stores:
    34*s*b*h (SmolLM2-135M in bf16 saved 2% less: ``--measure``)."""
    return 34 * s * b * h


def checkpoint_bytes(s: int, b: int, h: int) -> int:
    """What a checkpointed layer keeps: its 16-bit input, 2*s*b*h."""
    return 2 * s * b * h


@dataclass(frozen=True)
class Setup:
    title: str
    weight_bits: str  # "bf16" or "nf4"
    gpus: int
    global_batch: int
    fsdp: bool = False  # llm.fsdp: the frozen decoder-layer weights split over the GPUs


def estimate(
    shapes: Shapes, setup: Setup, *, seq: int, r: int, targets: tuple[str, ...], answer: int
) -> dict[str, float]:
    """Bytes per GPU, item by item."""
    rows = math.ceil(setup.global_batch / setup.gpus)  # rows one GPU computes of each global micro-batch
    if setup.weight_bits == "nf4":
        weights = shapes.linear_params() * NF4_BITS / 8 + shapes.other_params() * 2
        largest = max(i * o for i, o in shapes.linear_shapes().values())
        transient = largest * 2  # one weight dequantized to bf16 for its matmul
    elif setup.fsdp:
        # each GPU keeps 1/N of the decoder linear weights, the rest (embeddings, output layer, norms) whole, and
        # gathers one layer at a time (two with the next one prefetched) in the forward and the backward
        weights = shapes.linear_params() * 2 / setup.gpus + shapes.other_params() * 2
        transient = 2 * (shapes.linear_params() // shapes.layers) * 2
    else:
        weights = shapes.params() * 2
        transient = 0
    lora = shapes.lora_params(r, targets)
    lora_bytes = lora * LORA_BYTES + (lora * 4 if setup.gpus > 1 else 0)
    eager = shapes.layers * layer_activation_bytes(seq, rows, shapes.hidden, shapes.heads)
    fused = shapes.layers * fused_layer_activation_bytes(seq, rows, shapes.hidden)
    ckpt = shapes.layers * checkpoint_bytes(seq, rows, shapes.hidden) + fused_layer_activation_bytes(
        seq, rows, shapes.hidden
    )
    logits = rows * answer * shapes.vocab * (2 + 4 + 4)
    fixed = weights + transient + lora_bytes + logits
    return {
        "rows": rows,
        "weights": weights + transient,
        "lora": lora_bytes,
        "act_eager": eager,
        "act": fused,
        "act_ckpt": ckpt,
        "logits": logits,
        "total_eager": fixed + eager,
        "total": fixed + fused,
        "total_ckpt": fixed + ckpt,
    }


def table(args: argparse.Namespace) -> str:
    shapes = LLAMA2_7B
    targets = tuple(args.targets.split(","))
    setups = [
        Setup("bf16 LoRA, 1 GPU", "bf16", 1, args.batch),
        Setup("4-bit QLoRA, 1 GPU", "nf4", 1, args.batch),
        Setup(f"bf16 LoRA, 8 GPUs, batch {args.batch}", "bf16", 8, args.batch),
        Setup(f"bf16 LoRA, 8 GPUs, batch {8 * args.batch}", "bf16", 8, 8 * args.batch),
        Setup(f"4-bit QLoRA, 8 GPUs, batch {8 * args.batch}", "nf4", 8, 8 * args.batch),
        Setup(f"bf16 LoRA + llm.fsdp, 8 GPUs, batch {8 * args.batch}", "bf16", 8, 8 * args.batch, fsdp=True),
    ]
    rows = [
        estimate(shapes, s, seq=args.seq, r=args.rank, targets=targets, answer=args.answer) for s in setups
    ]
    lora = shapes.lora_params(args.rank, targets)
    per_matrix = {t: args.rank * sum(shapes.linear_shapes()[t]) for t in targets}
    s, h, a = args.seq, shapes.hidden, shapes.heads
    lines = [
        f"Llama-2-7B-style: hidden {h}, {shapes.layers} layers, {a} heads, MLP {shapes.intermediate}, vocabulary "
        f"{shapes.vocab}: {shapes.params():,} parameters ({shapes.linear_params():,} in decoder linear layers).",
        f"LoRA r={args.rank} on {','.join(targets)}: "
        + " + ".join(f"{t} {n:,}" for t, n in per_matrix.items())
        + f" per layer x {shapes.layers} layers = {lora:,} parameters (r*(in+out) = 2*r*4096 for a 4096x4096).",
        f"Micro-batch: llm.batch_size rows (all GPUs together) x {s} tokens; {args.answer} answer tokens per row.",
        "",
        "| GiB per GPU | formula | " + " | ".join(x.title for x in setups) + " |",
        "|---|---|" + "---:|" * len(setups),
        "| rows per GPU | ceil(batch / GPUs) | " + " | ".join(str(r["rows"]) for r in rows) + " |",
    ]

    def line(name: str, formula: str, key: str) -> None:
        lines.append(f"| {name} | {formula} | " + " | ".join(f"{r[key] / GIB:.2f}" for r in rows) + " |")

    line(
        "base weights",
        "bf16: 2 B x 6.74e9; nf4: 4.127 bit x linear + 2 B x rest + 1 weight; fsdp: 2 B x linear / N + 2 B x "
        "rest + 2 layers gathered",
        "weights",
    )
    line("LoRA weight, grad, AdamW", f"{LORA_BYTES} B x {lora:,} (+4 B all-reduce buffer on 8 GPUs)", "lora")
    line("logits (answer only)", f"rows x {args.answer} x V x (2+4+4) B", "logits")
    line("activations, SDPA attention", "L x 34sbh B", "act")
    line("activations, eager attention", "L x (34sbh + 5as^2b) B", "act_eager")
    line("activations, checkpointing", "L x 2sbh + 34sbh B", "act_ckpt")
    line("**total**", "SDPA, no checkpointing", "total")
    line("**total, eager attention**", "upper estimate", "total_eager")
    line("**total, checkpointing**", "llm.gradient_checkpointing=true", "total_ckpt")
    lines += ["", "Not counted: CUDA context, cuBLAS/NCCL workspaces, allocator slack (~1-3 GiB per GPU)."]
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> str:
    """Compare the formulas with SmolLM2-135M on the CPU: parameters, LoRA parameters, saved activations."""
    import torch

    from recadapt.adapters.build import with_lora
    from recadapt.llm import load_backbone
    from recadapt.train.config import LLMConfig

    shapes = SMOLLM2_135M
    targets = ("q_proj", "v_proj")
    llm = LLMConfig(lora_r=args.rank, lora_target_modules=list(targets), lora_dropout=0.0)
    b, s = args.measure_batch, args.measure_seq
    formula = shapes.layers * layer_activation_bytes(s, b, shapes.hidden, shapes.heads)
    fused = shapes.layers * 34 * s * b * shapes.hidden
    out = [
        f"formula for SmolLM2-135M, {b} x {s} tokens: L x (34sbh + 5as^2b) = {formula / GIB:.3f} GiB, "
        f"without the attention matrix L x 34sbh = {fused / GIB:.3f} GiB"
    ]
    # fp32 weights without autocast (halved: the formula counts 16 bits), and the CUDA default: bf16 weights
    # under bf16 autocast (the LoRA adapters stay fp32)
    for dtype, label in (("float32", "fp32 weights, no autocast"), ("bf16", "bf16 weights, bf16 autocast")):
        backbone = load_backbone("smollm2-135m", device="cpu", dtype=dtype)
        total = sum(p.numel() for p in backbone.model.parameters())
        torch.manual_seed(0)
        adapted = with_lora(backbone.model, llm)
        if dtype == "float32":
            lora = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
            out.append(f"parameters: counted {total:,}, formula {shapes.params():,}")
            lora_formula = shapes.lora_params(args.rank, targets)
            out.append(f"LoRA r={args.rank} on q_proj,v_proj: trainable {lora:,}, formula {lora_formula:,}")
        ids = torch.randint(0, shapes.vocab, (b, s))
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        context = backbone.autocast() if dtype == "bf16" else nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            adapted(input_ids=ids, logits_to_keep=1).logits.float().sum().backward()
        params = {p.untyped_storage().data_ptr() for p in adapted.parameters()}
        got = sum(n for ptr, n in seen.items() if ptr not in params)
        scale = 2 if dtype == "float32" else 1
        out.append(
            f"saved activations, {label}: {got / GIB:.3f} GiB"
            + (f" (= {got / scale / GIB:.3f} GiB at 16 bits)" if scale != 1 else "")
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="llm.batch_size on one GPU (default 4)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA r (default 8)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="adapted matrices (default q_proj,v_proj)")
    parser.add_argument("--answer", type=int, default=32, help="answer tokens per row (default 32)")
    parser.add_argument(
        "--measure", action="store_true", help="also check the formulas on SmolLM2-135M (CPU)"
    )
    parser.add_argument("--measure-batch", type=int, default=4)
    parser.add_argument("--measure-seq", type=int, default=512)
    args = parser.parse_args()
    print(table(args))
    if args.measure:
        print()
        print(measure(args))


if __name__ == "__main__":
    main()
