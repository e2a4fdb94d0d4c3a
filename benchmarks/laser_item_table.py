"""Laser's item table with and without its cache (``Laser.item_table(use_cache=...)``), side by side in one run.

    .venv/bin/python benchmarks/laser_item_table.py --data-dir ../shared/data --items 200 --threads 1
    .venv/bin/python benchmarks/laser_item_table.py --data-dir ../shared/data --items 0   # all 1,682 items

Stage 1 of Laser recomputes the table of every catalogue item after each epoch (and validation ranks against it).
The ml-100k titles of the first ``--items`` items (the catalogue is cut to them), the default backbone (SmolLM2-135M,
fp32) and Laser's default sizes; the M-Former and its BERT4Rec are randomly initialised (their weights do not change
the cost). For each of ``laser`` (the default, prefix on) and ``laser-noprefix`` (the ablation) it times:
  first     the first cached call, which builds the cache (what epoch 1 pays);
  uncached  every item through ``user_embeddings`` in id order (the code before the cache);
  cached    a later cached call (every later refresh),
after moving every trainable parameter (as an epoch of training does) between ``first`` and the other two, and
checks that ``uncached`` and ``cached`` agree. ``uncached`` and ``cached`` run ``--repeats`` times each, in the order
U C C U U C ... (a drift in the machine's load hits both), and the fastest of each is kept. Prints each time, the
tokens the LLM ran, and uncached / cached.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=200, help="the first N items of the catalogue (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ways", default="laser,laser-noprefix")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from recadapt.cf import build_crm
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.backbone import load_backbone
    from recadapt.llm.embedding import HistoryPromptBuilder
    from recadapt.llm.samples import item_titles
    from recadapt.methods.laser import Laser, LaserConfig, suffix_initialisation

    prepared = ensure_prepared(args.dataset, "full-ranking", data_root=args.data_dir)
    n = args.items or prepared.n_items
    titles = item_titles(prepared.items, prepared.n_items)[:n]
    backbone = load_backbone(args.backbone)
    prompts = HistoryPromptBuilder(backbone.tokenizer, titles)
    suffix = suffix_initialisation(backbone.model, backbone.tokenizer)
    lengths = np.array([len(prompts.prompt([i])[0]) for i in range(n)])
    print(
        f"{args.dataset}: first {n} items, backbone {args.backbone} ({backbone.dtype}), "
        f"{torch.get_num_threads()} threads; one-item prompts of {lengths.min()}-{lengths.max()} tokens"
    )
    for way in args.ways.split(","):
        use_prefix = way == "laser"
        torch.manual_seed(0)
        crm = build_crm("bert4rec", n, hidden_size=64, max_len=11)
        model = Laser(backbone.model, crm, prompts, LaserConfig(use_prefix=use_prefix), suffix).eval()
        extra = 1 + (model.config.n_queries if use_prefix else 0)  # suffix (+ prefix) tokens per item
        batch = model.config.item_batch_size
        padded = sum(
            int(lengths[s : s + batch].max()) * len(lengths[s : s + batch]) for s in range(0, n, batch)
        )
        seconds = {}
        start = time.perf_counter()
        model.item_table()
        seconds["first"] = time.perf_counter() - start
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # an epoch of training: every trainable parameter moves
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=generator))
        tables, runs = {}, {"uncached": [], "cached": []}
        for repeat in range(args.repeats):
            order = ("uncached", "cached") if repeat % 2 == 0 else ("cached", "uncached")
            for name in order:
                start = time.perf_counter()
                tables[name] = model.item_table(use_cache=name == "cached")
                runs[name].append(time.perf_counter() - start)
        seconds.update({name: min(times) for name, times in runs.items()})
        cache = model._table_cache
        assert cache is not None
        difference = (tables["cached"] - tables["uncached"]).abs().max().item()
        scale = tables["uncached"].abs().max().item()
        if cache.batches[0].past is not None:
            cached_tokens = n * extra
            holds = (
                f"prompt keys/values {cache.kv_bytes / 2**20:.0f} MiB (+ {cache.shared_len} shared tokens)"
            )
        else:
            cached_tokens = int(lengths.sum()) + n * extra
            holds = "prompt ids and CRM states"
        print(
            f"{way:<15} first {seconds['first']:7.1f} s | uncached {seconds['uncached']:7.1f} s "
            f"({padded + n * extra} tokens, padded) | cached {seconds['cached']:7.1f} s ({cached_tokens} tokens, "
            f"{len(cache.batches)} forwards) | cache: {holds}"
        )
        print(
            f"{way:<15} ratio uncached/cached = {seconds['uncached'] / seconds['cached']:.2f}; "
            f"max |cached - uncached| = {difference:.2e} (max |value| {scale:.1f}); all runs: "
            + ", ".join(f"{name} " + " ".join(f"{t:.1f}" for t in times) for name, times in runs.items())
        )
        del model, cache, tables


if __name__ == "__main__":
    main()
