"""Items per second for embedding a whole catalogue with the default backbone (SmolLM2-135M), as full-ranking
LLM recommenders must at every epoch (Laser's stage 1) and at evaluation.

    .venv/bin/python benchmarks/catalogue_embedding.py --data-dir ../shared/data            # ml-100k, 1,682 items
    .venv/bin/python benchmarks/catalogue_embedding.py --data-dir ../shared/data --items 256 # quick

Three ways, side by side on the same items and model in one run:
  laser         Laser's item prompt (M-Former prefix of L tokens + one-item template + suffix token), last state;
  laser-noprefix the same prompt without the prefix (the "without prefix" ablation);
  text-mean     the title alone, mean of the final hidden states (SUBR / DARec's item text vectors).
The M-Former and the CRM (a BERT4Rec) are randomly initialised: their weights do not change the cost.
Prints items/s and prompt tokens/s for each, and each way's time relative to text-mean.
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
    parser.add_argument("--items", type=int, default=0, help="embed only the first N items (0: all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from recadapt.cf import build_crm
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.backbone import load_backbone
    from recadapt.llm.embedding import HistoryPromptBuilder, embed_in_batches
    from recadapt.llm.retrieval import embed_item_texts
    from recadapt.llm.samples import item_titles
    from recadapt.methods.laser import Laser, LaserConfig, suffix_initialisation

    prepared = ensure_prepared(args.dataset, "full-ranking", data_root=args.data_dir)
    titles = item_titles(prepared.items, prepared.n_items)
    n = args.items or prepared.n_items
    backbone = load_backbone(args.backbone)
    prompts = HistoryPromptBuilder(backbone.tokenizer, titles)
    torch.manual_seed(0)
    crm = build_crm("bert4rec", prepared.n_items, hidden_size=64, max_len=11)
    suffix = suffix_initialisation(backbone.model, backbone.tokenizer)
    ways = {}
    for name, use_prefix in (("laser", True), ("laser-noprefix", False)):
        model = Laser(backbone.model, crm, prompts, LaserConfig(use_prefix=use_prefix), suffix).eval()
        ids = np.arange(n)
        prompt_tokens = sum(len(prompts.prompt([i])[0]) + 1 for i in ids) + (
            model.config.n_queries * n if use_prefix else 0
        )

        def embed(batch: np.ndarray, model: Laser = model) -> torch.Tensor:
            return model.user_embeddings([np.array([i]) for i in batch])[0]

        ways[name] = (lambda embed=embed, ids=ids: embed_in_batches(embed, ids, args.batch), prompt_tokens)
    title_tokens = sum(len(backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in titles[:n])
    ways["text-mean"] = (
        lambda: torch.from_numpy(
            embed_item_texts(backbone.model, backbone.tokenizer, titles[:n], batch_size=args.batch)
        ),
        title_tokens,
    )

    print(
        f"{args.dataset}: {n} items, backbone {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    seconds = {}
    for name, (run, tokens) in ways.items():
        run_once = run
        with torch.no_grad():
            torch.manual_seed(0)
            start = time.perf_counter()
            table = run_once()
            seconds[name] = time.perf_counter() - start
        assert table.shape[0] == n and torch.isfinite(table).all()
        print(
            f"{name:<15} {n / seconds[name]:8.1f} items/s  {tokens / seconds[name]:8.1f} prompt tokens/s  "
            f"({seconds[name]:.1f} s for the catalogue, {tokens / n:.1f} tokens per item)"
        )
    for name in ("laser", "laser-noprefix"):
        print(f"ratio {name}/text-mean time = {seconds[name] / seconds['text-mean']:.2f}")


if __name__ == "__main__":
    main()
