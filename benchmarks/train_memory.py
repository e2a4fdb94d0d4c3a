"""Peak memory and step time of LoRA training with and without gradient checkpointing, side by side in one run.

    .venv/bin/python benchmarks/train_memory.py                  # smollm2-135m, batch 4 x 650 tokens, 2 steps
    .venv/bin/python benchmarks/train_memory.py --seq 128 --steps 1

Each configuration runs in its own child process (a process's peak resident set size cannot be reset): it loads
the backbone, wraps it with the recipe's LoRA (``with_lora``, ``LLMConfig`` defaults), enables
``enable_gradient_checkpointing`` or not, and runs one untimed warm-up step and ``--steps`` timed steps of the
recipe's training step (answer-only loss on the last 8 tokens, backward, clipping, AdamW) on random
``--batch`` x ``--seq`` batches, fp32. The child reports its resident memory after loading and the peak of its resident
set during the steps (sampled every 2 ms by a thread: the process's own ``ru_maxrss`` would include loading); the
difference is what training adds (activations, gradients, optimizer state, allocator slack).
The default length is a LastFM next-item prompt with three tags per item (``llm.item_tags=3``: ~650 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args: argparse.Namespace) -> None:
    """One configuration; prints one JSON line."""
    import torch

    from recadapt.adapters.build import enable_gradient_checkpointing, with_lora
    from recadapt.llm import load_backbone
    from recadapt.llm.encoding import IGNORE_INDEX
    from recadapt.train.config import LLMConfig
    from recadapt.train.llm_loop import answer_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, device="cpu")
    llm = LLMConfig()
    torch.manual_seed(0)
    model = with_lora(backbone.model, llm)
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=llm.lr)
    vocab = int(backbone.model.config.get_text_config().vocab_size)
    loaded = _rss_gib()
    # the process's own peak (ru_maxrss) would include loading the backbone; sample the resident set instead
    peak = [loaded]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_gib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    generator = torch.Generator().manual_seed(0)
    model.train()
    seconds = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -8:] = ids[:, -8:]
        start = time.perf_counter()
        loss = answer_loss(model, labels, input_ids=ids, attention_mask=torch.ones_like(ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, llm.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            seconds.append(time.perf_counter() - start)
    stop.set()
    sampler.join()
    print(json.dumps({"loaded": loaded, "peak": peak[0], "seconds": seconds, "loss": float(loss)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=650)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # the child's switch
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.child:
        child(args)
        return
    common = [
        f"--backbone={args.backbone}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--steps={args.steps}",
        f"--threads={args.threads}",
    ]
    results = {}
    for name, flag in (("no checkpointing", []), ("gradient checkpointing", ["--checkpointing"])):
        done = subprocess.run(
            [sys.executable, __file__, "--child", *common, *flag], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            sys.exit(f"{name}: the child failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"backbone {args.backbone}, LoRA (recipe defaults), fp32, batch {args.batch} x seq {args.seq} tokens, "
        f"{args.steps} timed steps after 1 warm-up, one child process per row"
    )
    print(
        f"{'':<24}{'RSS loaded GiB':>16}{'peak GiB':>10}{'added GiB':>11}{'s/step (median)':>17}{'loss':>8}"
    )
    for name, r in results.items():
        median = sorted(r["seconds"])[len(r["seconds"]) // 2]
        print(
            f"{name:<24}{r['loaded']:>16.2f}{r['peak']:>10.2f}{r['peak'] - r['loaded']:>11.2f}{median:>17.2f}"
            f"{r['loss']:>8.3f}"
        )
    plain, ckpt = results["no checkpointing"], results["gradient checkpointing"]
    added = (ckpt["peak"] - ckpt["loaded"]) / (plain["peak"] - plain["loaded"])
    slower = (
        sorted(ckpt["seconds"])[len(ckpt["seconds"]) // 2]
        / sorted(plain["seconds"])[len(plain["seconds"]) // 2]
    )
    print(f"ratio checkpointing/plain: memory added by training = {added:.2f}, step time = {slower:.2f}")


if __name__ == "__main__":
    main()
