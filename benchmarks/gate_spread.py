"""Does a gated adapter's gate tell users apart? (issue 17's measurement for RecLoRA's and iLoRA's gates)

For a trained run on a synthetic dataset (``recadapt data synth``: every user has one genre), reads the gate
(conditioner) of its saved adapter, feeds it the CRM user vectors of the test rows (one per user; on ctr one per
sample), as training did (with ``llm.cond=crm-target``, the CRM's representation of each sample's history and
target), and prints:
how peaked the weights are (mean normalised entropy, 1 = uniform), how far two rows' weights are apart (mean
total-variation distance), and how well the user's genre can be read back from the weights and from the CRM
vector itself (nearest-centroid accuracy, centroids from the first half of the rows, scored on the second;
chance 1 / genres). A gate whose weights do not separate genres hands the LoRA nothing to personalise with,
however good the CRM vector is. For ``personal-lora`` it also prints how far the trained members' B matrices are
apart (``member_spread``: 0 = every member the same LoRA): they start at 0 and, with near-uniform weights, get
the same gradient up to the weight, so a bank whose gate does not spread stays one LoRA. On ``ctr`` it also reads
the label (does this user like this item) from the weights and from the CRM vector::

    .venv/bin/python benchmarks/gate_spread.py --run runs/learnability/runs/reclora-hybrid-long-1024x128
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from recadapt.adapters import adapter_kind
from recadapt.adapters.model import CONDITIONER_PREFIX
from recadapt.adapters.storage import ADAPTER_WEIGHTS, read_adapter_config
from recadapt.cf.runs import CondSource, load_crm_run
from recadapt.data.store import prepared_for
from recadapt.data.synth import SynthSpec, centroid_accuracy, generate
from recadapt.train.config import load_config


def member_spread(state: dict[str, torch.Tensor]) -> float:
    """Mean over adapted layers of ``||B_k - mean B|| / (sqrt(N) ||mean B||)``: the members' B matrices' RMS
    distance from their mean, relative to the mean (0: all members equal)."""
    spreads = []
    for key, b in state.items():
        if key.endswith("lora_B") and b.dim() == 3:
            b = b.float()
            mean = b.mean(0, keepdim=True)
            spreads.append(float((b - mean).norm() / (mean.norm().clamp_min(1e-12) * b.size(0) ** 0.5)))
    return float(np.mean(spreads)) if spreads else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--part", default="test")
    parser.add_argument(
        "--weights", default="final", help="the run's folder holding adapter/ (final or best)"
    )
    parser.add_argument(
        "--init", action="store_true", help="a freshly initialised gate (seed 0), not the run's"
    )
    parser.add_argument("--temperature", type=float, help="with --init: this temperature, not the run's")
    args = parser.parse_args()
    config = load_config(args.run / "config.yaml")
    llm = config.llm
    assert llm is not None
    dataset_file = Path(config.data.dataset.removeprefix("recbole:"))
    spec = SynthSpec(**json.loads((dataset_file.parent / "spec.json").read_text(encoding="utf-8")))
    truth = generate(spec)
    prepared = prepared_for(config.data)
    rows = prepared.parts[args.part]
    raw_users = prepared.users.set_index("user_id").raw_id
    genre = np.array([truth.user_genre[int(raw_users[u][1:])] for u in rows.user_id])

    folder = args.run / args.weights / "adapter"
    adapter = read_adapter_config(folder)
    if args.init:
        torch.manual_seed(0)
        if args.temperature is not None:
            adapter = replace(adapter, temperature=args.temperature)
        gate = adapter_kind(adapter.kind).conditioner(adapter)
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    if not args.init:
        gate = adapter_kind(adapter.kind).conditioner(adapter)
        prefix = CONDITIONER_PREFIX
        gate.load_state_dict({k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)})
    gate.eval()
    crm, crm_len = load_crm_run(llm.crm_run, prepared, config.data.dataset, torch.device("cpu"))
    target_aware = llm.cond == "crm-target"  # ctr: the CRM's representation of (history, target)
    source = CondSource(
        kind="crm-target" if target_aware else "crm",
        dim=crm.target_representation_dim if target_aware else crm.embedding_dim,
        history_len=llm.cond_history_len or crm_len or 10,
        crm=crm,
    )
    histories = [np.asarray(h, dtype=np.int64) for h in rows.history]
    query_items = rows.target.to_numpy() if target_aware else None
    with torch.no_grad():
        users = source(rows.user_id.to_numpy(), histories, query_items)
        weights = gate(users).float()
    if weights.dim() != 2:
        raise SystemExit(f"the gate gives weights of shape {tuple(weights.shape)}; expected [users, members]")
    n = weights.size(1)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(1) / np.log(n)
    tv = 0.5 * (weights[:, None] - weights[None]).abs().sum(-1)
    off = ~torch.eye(len(weights), dtype=torch.bool)
    w, u = weights.numpy(), users.numpy()
    state = "a fresh gate" if args.init else f"{args.weights}/"
    print(
        f"run {args.run}, {state} ({adapter.kind}, {n} members), {len(rows)} {args.part} rows, {spec.n_genres} genres"
    )
    print("| measure | value |\n|---|---|")
    print(f"| mean normalised entropy of the weights (1 = uniform) | {entropy.mean():.4f} |")
    print(f"| mean largest weight (uniform: {1 / n:.3f}) | {weights.max(1).values.mean():.4f} |")
    print(f"| mean total-variation distance between two users' weights | {tv[off].mean():.4f} |")
    print(f"| genre from the gate weights, nearest centroid | {centroid_accuracy(w, genre):.3f} |")
    print(f"| genre from the CRM user vector, nearest centroid | {centroid_accuracy(u, genre):.3f} |")
    print(f"| chance | {1 / spec.n_genres:.3f} |")
    if "label" in rows:  # ctr: does the gate route by whether this user likes this item?
        label = rows.label.to_numpy()
        print(
            f"| ctr label from the gate weights, nearest centroid (chance 0.5) | {centroid_accuracy(w, label):.3f} |"
        )
        print(f"| ctr label from the CRM vector, nearest centroid | {centroid_accuracy(u, label):.3f} |")
    if adapter.kind == "personal-lora" and not args.init:
        print(
            f"| member_spread: members' B apart, relative to their mean (0: one LoRA) | {member_spread(saved):.4f} |"
        )


if __name__ == "__main__":
    main()
