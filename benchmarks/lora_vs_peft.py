"""Training-step time of recadapt's own ``lora`` kind against PEFT's LoRA, side by side in one run.

    .venv/bin/python benchmarks/lora_vs_peft.py                          # smollm2-135m, 4 x 256 tokens, 3 + 5 steps
    .venv/bin/python benchmarks/lora_vs_peft.py --random --layers 2 --seq 32 --warmup 1 --steps 2   # quick

Before ``lora`` moves from PEFT (the LLM recipe's ``with_lora``) to :func:`recadapt.adapters.attach_adapters`, this
checks that the move costs no step time. Both models get the recipe's LoRA: r 8, alpha 32, dropout 0.1 on
q,k,v,o,gate,up,down, the dropout a :class:`~recadapt.adapters.dropout.FastDropout` (PEFT's swapped in by
``set_lora_dropout``, exactly as ``with_lora`` does; recadapt's layers use it natively). The backbone is
SmolLM2-135M as ``load_backbone("smollm2-135m")`` gives it (``--random``, or when it cannot be loaded offline: a
random Llama of its shapes), one deep copy per model. recadapt's A is copied from PEFT's, so both models hold the
same weights.

A step is forward with labels (causal LM loss at every position), backward and an AdamW step, fp32. The two
models alternate (PEFT, recadapt, PEFT, ...) on the same batch per round, with the RNG reseeded before each step,
so both draw the same dropout masks: their losses must agree at every step (the first one exactly, B = 0), which
the run checks. ``--warmup`` untimed rounds, then ``--steps`` timed ones; the ratio is the median over rounds of
recadapt / PEFT in the same round. Memory: the resident set sampled every 2 ms by a thread, peak during a step
minus the resident set at its start (what the step's activations add; allocator reuse makes this approximate).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from adapter_overhead import smollm2_config  # benchmarks/ is on sys.path when run as a script
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from recadapt.adapters import AdaptedModel, LoRAConfig, attach_adapters
from recadapt.adapters.dropout import FastDropout, set_lora_dropout

warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # PEFT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 8, 32, 0.1


def _rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def smollm2_shaped(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(smollm2_config(layers))


def backbone(random: bool, layers: int) -> tuple[nn.Module, str]:
    """The real SmolLM2-135M when it loads offline (and not ``random``), else a random model of its shapes."""
    if not random:
        try:
            from recadapt.llm.backbone import load_backbone

            return load_backbone("smollm2-135m", device="cpu", dtype=torch.float32).model, "SmolLM2-135M"
        except Exception as err:  # noqa: BLE001 - any loading failure falls back to the random model
            print(f"load_backbone('smollm2-135m') failed ({type(err).__name__}: {err}); using random weights")
    return smollm2_shaped(layers), f"random SmolLM2-135M-shaped Llama, {layers} layers"


def build(base: nn.Module) -> tuple[nn.Module, AdaptedModel]:
    """PEFT's LoRA (with ``with_lora``'s FastDropout) and recadapt's on copies of ``base``, with equal A."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    replaced = set_lora_dropout(peft_model)
    ours = attach_adapters(
        copy.deepcopy(base), LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS)
    )
    assert replaced == len(ours.adapter_layers), (replaced, len(ours.adapter_layers))
    assert all(isinstance(layer.dropout, FastDropout) for layer in ours.adapter_layers.values())
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in ours.adapter_layers.items():
            layer.lora_A.copy_(peft_modules[name].lora_A["default"].weight)
            assert torch.equal(layer.lora_B, peft_modules[name].lora_B["default"].weight)  # zeros
    return peft_model, ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--random", action="store_true", help="random SmolLM2-shaped weights, not the real model"
    )
    parser.add_argument(
        "--layers", type=int, default=30, help="decoder layers of the random model (SmolLM2: 30)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (one step per model each)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step per model each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, what = backbone(args.random, args.layers)
    base.requires_grad_(False)
    peft_model, ours = build(base)
    del base
    models: dict[str, nn.Module] = {"peft": peft_model.train(), "recadapt": ours.train()}
    trainable = {name: [p for p in m.parameters() if p.requires_grad] for name, m in models.items()}
    assert sum(p.numel() for p in trainable["peft"]) == sum(p.numel() for p in trainable["recadapt"])
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4) for name, params in trainable.items()}
    vocab = int(ours.config.vocab_size)

    with torch.no_grad():  # B = 0: both are the base model, exactly
        probe = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        eval_loss = {name: float(m.eval()(input_ids=probe, labels=probe).loss) for name, m in models.items()}
    for model in models.values():
        model.train()

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_gib())

    threading.Thread(target=sample, daemon=True).start()

    def step(name: str, input_ids: Tensor, seed: int) -> tuple[float, float, float]:
        """Seconds, loss, and GiB the step added to the resident set at its peak."""
        model, optimizer = models[name], optimizers[name]
        torch.manual_seed(seed)  # the same dropout masks for both models
        start_rss = peak[0] = _rss_gib()
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        return seconds, float(loss.detach()), peak[0] - start_rss

    generator = torch.Generator().manual_seed(2)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    added: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.warmup + args.steps):
        input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        for name in models:  # A, B, A, B, ...
            s, loss, gib = step(name, input_ids, seed=100 + round_)
            losses[name].append(loss)
            if round_ >= args.warmup:
                seconds[name].append(s)
                added[name].append(gib)
    stop.set()

    print(
        f"{what}, fp32 on CPU, {torch.get_num_threads()} torch threads; batch {args.batch} x {args.seq} tokens, "
        f"LoRA r={R} alpha={ALPHA} dropout {DROPOUT} (FastDropout) on {','.join(t.split('_')[0] for t in TARGETS)}; "
        f"{sum(p.numel() for p in trainable['peft']) / 1e6:.2f}M trainable; "
        f"{args.warmup} warm-up + {args.steps} timed rounds, PEFT then recadapt in each"
    )
    print(
        f"initial loss (eval, B = 0): peft {eval_loss['peft']:.6f}, recadapt {eval_loss['recadapt']:.6f}, "
        f"equal: {eval_loss['peft'] == eval_loss['recadapt']}; first training step: peft {losses['peft'][0]:.6f}, "
        f"recadapt {losses['recadapt'][0]:.6f}, equal: {losses['peft'][0] == losses['recadapt'][0]}"
    )
    diff = max(abs(a - b) for a, b in zip(losses["peft"], losses["recadapt"], strict=True))
    print(
        f"max |loss difference| over all {len(losses['peft'])} steps (same masks, same batches): {diff:.2e}"
    )
    for name in models:
        print(
            f"{name:9s} median {statistics.median(seconds[name]):.3f} s/step "
            f"(min {min(seconds[name]):.3f}, max {max(seconds[name]):.3f}); "
            f"resident set added during a step: median {statistics.median(added[name]):.2f} GiB"
        )
    ratios = [b / a for a, b in zip(seconds["peft"], seconds["recadapt"], strict=True)]
    print(
        f"ratio recadapt/peft s/step = {statistics.median(ratios):.3f} (median of per-round ratios; "
        f"per round: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"process peak RSS (ru_maxrss, both models): {peak_gib:.2f} GiB")
    if losses["peft"][0] != losses["recadapt"][0] or eval_loss["peft"] != eval_loss["recadapt"]:
        raise SystemExit("the initial losses differ: the two LoRAs do not start from the same model")


if __name__ == "__main__":
    main()
