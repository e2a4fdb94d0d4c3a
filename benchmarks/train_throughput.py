"""Training throughput of an LLM backbone against the matmul peak of the same machine, measured in one run.

    .venv/bin/python benchmarks/train_throughput.py                  # smollm2-135m, batch 4 x 256 tokens, 3 rounds
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --batch 1 --seq 32 --steps 1 --matmul-size 512

Measured in the same process with the same torch thread count:

1. The matmul peak: a square ``--matmul-size`` matmul (2 n^3 FLOPs), best of ``--repeats`` timed runs after a
   warm-up (fewer once they have taken 10 s), in bf16 (the issue's reference) and in fp32. On a CPU without
   avx512_bf16/AMX bf16 is emulated and fp32 is the fast path, so both are printed and the training rate is
   compared with each; there the bf16 ratio is far above 1 and says nothing about the training loop.
2. Training tokens/s of the backbone with the LLM recipe's settings (:mod:`recadapt.train.llm`): the same PEFT
   LoRA (``with_lora`` with ``LLMConfig`` defaults: r=8, alpha=32, dropout 0.1 on q,k,v,o,gate,up,down, the
   dropout a :class:`~recadapt.adapters.dropout.FastDropout`), AdamW over the LoRA weights, gradient clipping,
   forward + backward + optimizer step on random token batches of ``--batch`` x ``--seq`` (no padding), under
   the precision the recipe picks (``select_precision``: bf16 autocast only where the device runs bf16 natively,
   else fp32) or the one forced with ``--precision``. Three configurations of the same model:
   - the recipe's (only the last ``--answer-tokens`` tokens are labels, and ``answer_loss`` runs the vocabulary
     projection at those positions only);
   - plain LM training (every token a label, the full projection and softmax);
   - the recipe's with PEFT's own ``nn.Dropout`` in place of ``FastDropout`` (what the cheaper mask buys).
   One untimed warm-up round, then ``--steps`` rounds; each round times one fp32 reference matmul and then one
   step of each configuration in turn, so a slow spell of a shared machine falls on all of them alike. The
   ratio to the matmuls timed between the steps (medians of both) is the one that cancels such drift.

Model FLOP/s is counted as the issue asks: 6 x N x tokens/s, N = all parameters of the backbone (embeddings
included; tied embeddings counted once, as the output projection's matmul). This is an upper bound on the work
done: with LoRA the frozen weights still need the forward (2N) and the activation-gradient backward (2N) but no
weight-gradient backward, so the real count is about 4 x N per token (plus the small LoRA terms), and attention's
sequence-length-dependent FLOPs are not counted at all. Both are printed; the ratio uses the 6 x N count.
Target: train/bf16-matmul >= 0.8.

The backbone's matmuls are narrow (SmolLM2-135M: hidden 576, MLP 1536), so they run below a large square matmul's
rate even before the non-matmul work (norms, softmax, optimizer, autograd bookkeeping) is added. Timings are only
comparable on an otherwise idle machine; pass --threads 1 when another job shares the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn

from recadapt.adapters.build import with_lora
from recadapt.adapters.dropout import FastDropout, set_lora_dropout
from recadapt.llm import load_backbone
from recadapt.llm.encoding import IGNORE_INDEX
from recadapt.train.config import LLMConfig
from recadapt.train.llm_loop import answer_loss
from recadapt.train.precision import select_precision

MATMUL_BUDGET_S = 10.0  # timed seconds per reference matmul after which repeats stop
PRECISION_CHOICES = {"auto": "auto", "fp32": "no", "bf16": "bf16"}  # --precision -> llm.precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(
    size: int, dtype: torch.dtype, repeats: int, device: torch.device, budget_s: float = MATMUL_BUDGET_S
) -> tuple[float, float, int]:
    """Best and median FLOP/s of a ``size`` x ``size`` matmul in ``dtype``, and how many runs they come from.

    One warm-up run, then up to ``repeats`` timed runs, stopping early once they have taken ``budget_s``. A
    warm-up slower than the budget (emulated bf16 on an AVX2 CPU: over a minute at n = 2048) is itself the only sample.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    _sync(device)
    start = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    warm_up = time.perf_counter() - start
    seconds = [warm_up] if warm_up > budget_s else []
    while len(seconds) < repeats and sum(seconds) < budget_s:
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return flops / min(seconds), flops / statistics.median(seconds), len(seconds)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    input_ids: Tensor,
    *,
    autocast: AbstractContextManager[Any] | None,
    max_grad_norm: float,
    device: torch.device,
    answer_tokens: int = 0,
) -> tuple[float, float]:
    """Seconds of one training step (forward, backward, clipping, optimizer) on ``input_ids``, and its loss.

    ``answer_tokens`` 0: every position is a label (plain LM training, the model's own loss); N > 0: only the last
    N tokens of each row are labels and the recipe's :func:`~recadapt.train.llm_loop.answer_loss` runs the output
    layer at those positions only, as recommendation training does (a short answer after a long prompt).
    """
    model.train()
    attention_mask = torch.ones_like(input_ids)
    _sync(device)
    start = time.perf_counter()
    with autocast if autocast is not None else nullcontext():
        if answer_tokens:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[:, -answer_tokens:] = input_ids[:, -answer_tokens:]
            loss = answer_loss(model, labels, input_ids=input_ids, attention_mask=attention_mask)
        else:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = float(loss.detach())  # also waits for the device
    return time.perf_counter() - start, loss_value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="smollm2-135m", help="any name load_backbone accepts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed rounds (after 1 warm-up round): one step of each configuration per round",
    )
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISION_CHOICES),
        default="auto",
        help="auto: as the recipe picks (bf16 autocast only where native), fp32, or bf16 autocast",
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n reference matmul")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help=f"timed repeats of each reference matmul (fewer once they take {MATMUL_BUDGET_S:.0f} s)",
    )
    parser.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=8,
        help="labelled tokens per row in the recipe's step (a next-item answer: a title and end of turn)",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps", "matmul_size", "repeats", "answer_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # before this process adds its own

    backbone = load_backbone(args.backbone, device=args.device)
    device = backbone.device
    precision, why = select_precision(device, PRECISION_CHOICES[args.precision])
    if args.precision != "auto":
        why = "forced with --precision"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    )

    # 1. the reference matmuls
    matmul = {
        label: matmul_flops(args.matmul_size, dtype, args.repeats, device)
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }

    # 2. training with the recipe's LoRA, optimizer and clipping
    llm = LLMConfig()
    n_params = sum(p.numel() for p in backbone.model.parameters())
    torch.manual_seed(0)
    model = with_lora(backbone.model, llm)  # the recipe's own LoRA construction
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=llm.lr, weight_decay=llm.weight_decay)
    vocab_size = int(backbone.model.config.get_text_config().vocab_size)
    # the fp32 reference once more between the training steps: the rate this shared machine gives right then
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(args.matmul_size, args.matmul_size, generator=generator, device=device) for _ in "ab")
    interleaved: list[float] = []

    def probe() -> None:
        """One warm-up matmul (the training step has just evicted its operands from the caches), then the
        best of two timed ones."""
        torch.mm(a, b)
        seconds = []
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            seconds.append(time.perf_counter() - start)
        interleaved.append(2.0 * args.matmul_size**3 / min(seconds))

    configurations = {  # name: (answer tokens, LoRA dropout)
        f"recipe: loss on the last {args.answer_tokens} tokens": (args.answer_tokens, FastDropout),
        "every position labelled": (0, FastDropout),
        "recipe, but torch's nn.Dropout (PEFT's own)": (args.answer_tokens, nn.Dropout),
    }
    runs: dict[str, tuple[list[float], float]] = {name: ([], float("nan")) for name in configurations}
    batches = torch.Generator().manual_seed(0)
    # round 0 warms every configuration up untimed; then each round times one step of each, in turn, after one
    # reference matmul, so a slow spell of this shared machine falls on all of them alike
    for round_index in range(args.steps + 1):
        if round_index > 0:
            probe()
        for name, (answer_tokens, dropout) in configurations.items():
            set_lora_dropout(model, dropout)
            input_ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=batches).to(device)
            seconds, loss = train_step(
                model,
                optimizer,
                trainable,
                input_ids,
                autocast=autocast,
                max_grad_norm=llm.max_grad_norm,
                device=device,
                answer_tokens=answer_tokens,
            )
            if round_index > 0:
                runs[name] = ([*runs[name][0], seconds], loss)

    tokens_per_step = args.batch * args.seq
    n_trainable = sum(p.numel() for p in trainable)
    label = "fp32" if autocast_dtype is None else f"{autocast_dtype} autocast"
    print(
        f"backbone {args.backbone} on {device} ({backbone.dtype} weights), training precision {label} "
        f"({why}); {torch.get_num_threads()} torch threads"
    )
    if device.type == "cpu" and load > 0.5:
        print(
            f"note: load average {load:.2f} at start: other jobs share the {os.cpu_count()} cores, so both rates "
            "are depressed (unevenly; with more threads than free cores training suffers most)"
        )
    print(
        f"{n_params:,} parameters, {n_trainable:,} trainable (LoRA r={llm.lora_r} alpha={llm.lora_alpha} "
        f"dropout {llm.lora_dropout} on {','.join(llm.lora_target_modules)}); AdamW; "
        f"batch {args.batch} x seq {args.seq} = {tokens_per_step:,} tokens/step"
    )
    print(f"{'reference':<34}{'best TFLOP/s':>14}{'median TFLOP/s':>16}")
    for dtype_label, (best, median, repeats) in matmul.items():
        name = (
            f"matmul {args.matmul_size}x{args.matmul_size} {dtype_label} ({repeats} run{'s' * (repeats > 1)})"
        )
        print(f"{name:<34}{best / 1e12:>14.4f}{median / 1e12:>16.4f}")
    median_interleaved = statistics.median(interleaved)
    print(
        f"{f'matmul fp32 between the steps ({len(interleaved)} runs)':<34}{max(interleaved) / 1e12:>14.4f}"
        f"{median_interleaved / 1e12:>16.4f}"
    )
    for name, (seconds, loss) in runs.items():
        tokens_per_second = tokens_per_step * len(seconds) / sum(seconds)
        model_flops = 6.0 * n_params * tokens_per_second
        print(
            f"train, {name}: {len(seconds)} timed steps (after 1 warm-up), seconds/step "
            f"{' '.join(f'{s:.2f}' for s in seconds)}, last loss {loss:.3f}"
        )
        print(f"  train tokens/s = {tokens_per_second:,.1f}")
        print(
            f"  model TFLOP/s (6 x N x tokens/s) = {model_flops / 1e12:.4f} "
            f"(LoRA's frozen weights need about 4 x N: {4.0 * n_params * tokens_per_second / 1e12:.4f})"
        )
        print(f"  ratio train/bf16-matmul = {model_flops / matmul['bf16'][0]:.2f}   (target >= 0.8)")
        print(f"  ratio train/fp32-matmul = {model_flops / matmul['fp32'][0]:.2f}")
        median_step_flops = 6.0 * n_params * tokens_per_step / statistics.median(seconds)
        print(
            f"  ratio train/fp32-matmul, medians of steps and of the matmuls between them = "
            f"{median_step_flops / median_interleaved:.2f}"
        )
    (recipe, _), (full, _), (torch_dropout, _) = runs.values()
    print(f"recipe / every-position tokens/s = {sum(full) / sum(recipe):.2f}")
    print(f"FastDropout / nn.Dropout tokens/s = {sum(torch_dropout) / sum(recipe):.2f}")


if __name__ == "__main__":
    main()
