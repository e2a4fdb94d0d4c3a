"""Does DARec's collaborative knowledge injection reach its user vector? (issue 17's measurement for KV slots)

For a DARec run (its best weights, or ``--init`` for the freshly built model) and ``--users`` test users, prints
per decoder layer the RMS of the injected CF keys and values against the text's own keys and values, and then how
much the user vector moves when the CF slots are taken from another user of the batch (relative change of the
``[SEQ]`` user embedding, and the cosine between the two). A vector that does not move cannot carry the CRM's
signal, whatever the slots hold. On a synthetic dataset it also reads the users' and items' genres back from the
user vectors and from the item table (nearest centroid; ``recadapt.data.synth.centroid_accuracy``)::

    .venv/bin/python benchmarks/darec_slots.py --run runs/learnability/runs/darec-itemcf-cf --users 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from recadapt.data.synth import SynthSpec, centroid_accuracy, generate
from recadapt.tasks.fullrank import history_arrays, subset
from recadapt.train.config import load_config
from recadapt.train.fullrank import BEST_DIR, build_run, load_trainable


def slot_and_text_rms(model, histories) -> list[tuple[float, float, float, float]]:
    """Per layer: (slot key RMS, text key RMS, slot value RMS, text value RMS) for one batch of histories."""
    captured = {}
    original = model.injector.cache

    def cache(cf, **kwargs):
        built = original(cf, **kwargs)
        captured["cache"] = built
        captured["slots"] = cf.size(1)
        return built

    model.injector.cache = cache
    try:
        model.user_embeddings(histories)
    finally:
        model.injector.cache = original
    m, rows = captured["slots"], []
    for layer in captured["cache"].layers:
        keys, values = layer.keys.float(), layer.values.float()
        rms = [
            t.pow(2).mean().sqrt().item()
            for t in (keys[:, :, :m], keys[:, :, m:], values[:, :, :m], values[:, :, m:])
        ]
        rows.append(tuple(rms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="a DARec run directory (config.yaml, best/)")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--init", action="store_true", help="the freshly built model, not the run's weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.run / "config.yaml")
    model, prepared, _ = build_run(config, progress=False)
    if not args.init:
        load_trainable(model, args.run / BEST_DIR)
    model.eval()
    if model.injector is None:
        raise SystemExit("this run has model.cf_injection=false: nothing is injected")
    rows = subset(prepared.parts["test"], args.users, config.data.split_seed)
    histories = history_arrays(rows["history"], config.train.max_len)
    with torch.no_grad():
        print("| layer | CF key RMS | text key RMS | CF value RMS | text value RMS |\n|---|---|---|---|---|")
        for i, r in enumerate(slot_and_text_rms(model, histories[:16])):
            print(f"| {i} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} |")
        users, _ = model.user_embeddings(histories)
        # the same prompts, each reading the CF slots of the next user in the batch
        rolled = [histories[(i + 1) % len(histories)] for i in range(len(histories))]
        original = model._cf_slots
        other_users_slots = original(*model.crm_inputs(rolled))
        model._cf_slots = lambda *_: other_users_slots
        try:
            swapped, _ = model.user_embeddings(histories)
        finally:
            model._cf_slots = original
    change = ((swapped - users).norm(dim=1) / users.norm(dim=1)).mean().item()
    cosine = torch.nn.functional.cosine_similarity(swapped, users, dim=1).mean().item()
    spread = torch.nn.functional.cosine_similarity(users[:, None], users[None], dim=-1)
    off = ~torch.eye(len(users), dtype=torch.bool)
    print(f"\nuser vectors, CF slots of another user: relative change {change:.4f}, cosine {cosine:.4f}")
    print(f"user vectors across users: mean pairwise cosine {spread[off].mean().item():.4f}")
    spec_file = Path(config.data.dataset.removeprefix("recbole:")).parent / "spec.json"
    if spec_file.exists():  # a synthetic dataset: can the genre be read back from each side?
        truth = generate(SynthSpec(**json.loads(spec_file.read_text(encoding="utf-8"))))
        raw_users = prepared.users.set_index("user_id").raw_id
        user_genre = np.array([truth.user_genre[int(raw_users[u][1:])] for u in rows.user_id])
        raw_items = prepared.items.sort_values("item_id").raw_id
        item_genre = np.array([truth.item_genre[int(r[1:])] for r in raw_items])
        with torch.no_grad():
            table = model.item_table().float().numpy()
        order = np.random.default_rng(0).permutation(len(item_genre))  # items come in genre blocks
        print(
            f"genre from the user vectors, nearest centroid: {centroid_accuracy(users.numpy(), user_genre):.3f}"
        )
        print(
            f"genre from the item table, nearest centroid: {centroid_accuracy(table[order], item_genre[order]):.3f}"
        )
        print(f"chance: {1 / (int(item_genre.max()) + 1):.3f}")


if __name__ == "__main__":
    main()
