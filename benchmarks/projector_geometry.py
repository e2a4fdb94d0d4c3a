"""What each ``llm.projector`` does to a CRM's item geometry before any training (issue 17's measured cause).

On a synthetic dataset whose items have known genres, prints for the CRM table and for each projector's output
at initialisation: the mean vector norm and the mean cosine between items of the same genre and of different
genres, beside the LLM's token-embedding norm. A projector that maps unrelated items onto nearly one vector
hands the LLM nothing to tell them apart::

    .venv/bin/python benchmarks/projector_geometry.py --run runs/learnability/runs/sasrec-cf \\
        --dataset runs/learnability/data/synth-cf-s0/synth-cf-s0 --prepared runs/learnability/prepared
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from recadapt.cf.checkpoint import load_crm
from recadapt.data.store import ensure_prepared
from recadapt.data.synth import SynthSpec, generate
from recadapt.llm.backbone import load_backbone
from recadapt.llm.encoding import ItemTokenizer
from recadapt.llm.injection import PROJECTORS, build_projector


def geometry(vectors: torch.Tensor, genre: np.ndarray) -> tuple[float, float, float]:
    """(mean norm, mean cosine within a genre, mean cosine across genres)."""
    v = vectors.detach().float()
    unit = v / v.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).numpy()
    same = genre[:, None] == genre[None, :]
    off = ~np.eye(len(genre), dtype=bool)
    return float(v.norm(dim=1).mean()), float(cos[same & off].mean()), float(cos[~same].mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a CRM run on the synthetic dataset")
    parser.add_argument("--dataset", required=True, help="the RecBole path NAME of the synthetic dataset")
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--backbone", default="smollm2-135m")
    args = parser.parse_args()
    spec = SynthSpec(**json.loads((Path(args.dataset).parent / "spec.json").read_text(encoding="utf-8")))
    truth = generate(spec)
    prepared = ensure_prepared(f"recbole:{args.dataset}", "next-item", data_root=None, out_root=args.prepared)
    raw_ids = prepared.items.sort_values("item_id").raw_id
    genre = np.array([truth.item_genre[int(r[1:])] for r in raw_ids])
    table = load_crm(Path(args.run) / "best").item_embeddings().detach().float()
    backbone = load_backbone(args.backbone)
    ItemTokenizer(backbone.tokenizer, model=backbone.model)  # adds the placeholder token, as a run does
    embedding = backbone.model.get_input_embeddings()
    print(f"token embeddings: mean norm {embedding.weight.detach().norm(dim=1).mean():.2f}")
    print("| vectors | mean norm | cosine within a genre | cosine across genres |\n|---|---|---|---|")
    print("| CRM table | {:.2f} | {:.3f} | {:.3f} |".format(*geometry(table, genre)))
    for kind in PROJECTORS:
        torch.manual_seed(0)  # as a run with train.seed 0
        projector = build_projector(kind, table, embedding, backbone.tokenizer)
        with torch.no_grad():
            print(
                "| {} (initial) | {:.2f} | {:.3f} | {:.3f} |".format(kind, *geometry(projector(table), genre))
            )


if __name__ == "__main__":
    main()
