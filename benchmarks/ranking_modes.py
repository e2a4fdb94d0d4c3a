"""Time the three candidate-ranking modes (generate, constrained, score) side by side on the same users.

    .venv/bin/python benchmarks/ranking_modes.py                     # smollm2-135m, 16 LastFM test users
    .venv/bin/python benchmarks/ranking_modes.py --users 8 --backbone gemma3-270m

Samples are the persisted next-item test split (history of up to 10 items, 20 shuffled candidates), written as a
minimal LLaRA-style text prompt inside the backbone's chat template (or ending in "Answer:" without one); each
candidate is its title followed by the end-of-turn token (or a newline). The same users, model and precision (the
backbone's autocast unless --no-autocast) serve all three modes, and each mode first runs once on one user,
untimed, to warm up. Columns: wall seconds, users/s, speed relative to generate, batched model forwards, and
ValidRatio / HitRatio@1 (over a handful of users these are a sanity check, not a measurement). Score mode runs in
both layouts of ``score_candidates``: ``score-packed`` (the 20 candidates after the prompt in one row, under a 4-D
mask; skipped for kernels that take none) and ``score-copied`` (one copy of the prompt's KV cache per candidate).
The layout score_candidates picks by default (packed on a CPU, copied on a GPU) gives the headline score ratio.
Target: constrained and score at least 5x generate's users/s.

All three modes pay the same prompt pass; they differ in what follows it (generate: one forward per generated token;
constrained: one per branching trie node, usually 1-2; score: one over the 20 candidates packed after each
prompt). So the ratios grow with the cost of a decoding step relative to the prompt pass: large on a GPU,
where a step is latency-bound, small on a CPU, where the prompt pass is compute-bound and dominates. On CPUs
without native bf16 (no avx512_bf16/AMX) the backbone's default bf16 autocast is several times slower than fp32:
pass --no-autocast there, and --threads 1 when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from recadapt.data.store import ensure_prepared
from recadapt.llm import load_backbone
from recadapt.llm.decoding import DEFAULT_MAX_NEW_TOKENS, constrained_rank, generate_rank, generated_hits
from recadapt.llm.scoring import (
    DEFAULT_SCORE_BATCH_SIZE,
    PACKED_ATTENTION,
    packs_by_default,
    score_candidates,
)
from recadapt.llm.session import DEFAULT_BATCH_SIZE
from recadapt.tasks.metrics import hit_at_k, ndcg_at_k, target_ranks

VERBS = {"artist": "listened to", "movie": "watched", "game": "played"}
ANSWER_MARK = "\x00ANSWER\x00"


@dataclass
class Samples:
    prompts: list[list[int]]
    titles: list[list[str]]
    candidate_ids: list[list[list[int]]]
    suffix_ids: list[int]
    targets: np.ndarray


def build_samples(tokenizer: Any, dataset: str, n_users: int, data_dir: str | None) -> Samples:
    """The first ``n_users`` test samples as prompt ids, candidate titles and candidate ids (+ answer suffix)."""
    prepared = ensure_prepared(dataset, "next-item", data_root=data_dir)
    title_of = prepared.items.set_index("item_id")["title"].to_dict()
    domain = str(prepared.manifest.get("domain") or "item")
    verb = VERBS.get(domain, "interacted with")
    part = prepared.parts["test"].head(n_users)
    chat = bool(getattr(tokenizer, "chat_template", None))
    suffix_ids = _answer_suffix(tokenizer) if chat else tokenizer("\n", add_special_tokens=False).input_ids
    prompts, titles, candidate_ids, targets = [], [], [], []
    for row in part.itertuples(index=False):
        history = [str(title_of[int(i)]) for i in row.history]
        candidates = [int(i) for i in row.candidates]
        names = [str(title_of[i]) for i in candidates]
        text = (
            f"This user has {verb} {', '.join(history)} in the previous. Please predict the next {domain} this "
            f"user will choose. Choose the answer from the following {len(names)} {domain} titles: "
            f"{', '.join(names)}. Reply with the title only."
        )
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = [tokenizer(name, add_special_tokens=False).input_ids for name in names]
        else:
            rendered = f"{text}\nAnswer:"
            ids = [tokenizer(f" {name}", add_special_tokens=False).input_ids for name in names]
        prompts.append(tokenizer(rendered, add_special_tokens=False).input_ids)
        titles.append(names)
        candidate_ids.append(ids)
        targets.append(candidates.index(int(row.target)))
    return Samples(prompts, titles, candidate_ids, list(suffix_ids), np.array(targets, dtype=np.int64))


def _answer_suffix(tokenizer: Any) -> list[int]:
    """The first token the chat template writes after an assistant answer: its end-of-turn marker."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER_MARK}], tokenize=False
    )
    tail = rendered.split(ANSWER_MARK, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False).input_ids
    if not ids:
        raise SystemExit("the chat template writes nothing after an answer; cannot tell where answers end")
    return ids[:1]


class ForwardCounter:
    """Counts the model's (batched) forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument(
        "--dataset", default="lastfm", help="a dataset with a next-item split (default lastfm)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="raw data root, used if the split is not prepared yet"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="users per forward")
    parser.add_argument("--score-batch-size", type=int, default=DEFAULT_SCORE_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument(
        "--full-generation",
        action="store_true",
        help="generate all max-new-tokens (the papers' cost) instead of stopping after the first line",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-autocast", action="store_true", help="run in the weights' dtype")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(args.backbone, device=args.device)
    model, tokenizer = backbone.model, backbone.tokenizer
    samples = build_samples(tokenizer, args.dataset, args.users, args.data_dir)
    n = len(samples.prompts)
    counter = ForwardCounter(model)
    autocast = nullcontext if args.no_autocast else backbone.autocast

    def score(sl: slice, packed: bool | None) -> torch.Tensor:
        return score_candidates(
            model,
            samples.prompts[sl],
            samples.candidate_ids[sl],
            answer_suffix_ids=samples.suffix_ids,
            batch_size=args.score_batch_size,
            packed=packed,
        )

    modes: dict[str, Callable[[slice], Any]] = {
        "generate": lambda sl: generate_rank(
            model,
            tokenizer,
            samples.prompts[sl],
            samples.titles[sl],
            max_new_tokens=args.max_new_tokens,
            stop_at_newline=not args.full_generation,
            batch_size=args.batch_size,
        ),
        "constrained": lambda sl: constrained_rank(
            model,
            samples.prompts[sl],
            samples.candidate_ids[sl],
            answer_suffix_ids=samples.suffix_ids,
            batch_size=args.batch_size,
        ),
        "score-packed": lambda sl: score(sl, True),
        "score-copied": lambda sl: score(sl, False),
    }
    kernel = model.config._attn_implementation
    if kernel not in PACKED_ATTENTION:  # no 4-D mask: only the copied layout runs
        del modes["score-packed"]
    # the layout score_candidates picks when not told: its row is the headline "score"
    default = "score-packed" if packs_by_default(kernel, backbone.device) else "score-copied"
    timings: dict[str, tuple[float, int]] = {}
    outputs: dict[str, Any] = {}
    for name, run in modes.items():
        with autocast():
            run(slice(0, 1))  # warm-up
            counter.calls = 0
            start = time.perf_counter()
            outputs[name] = run(slice(0, n))
            timings[name] = (time.perf_counter() - start, counter.calls)

    results = outputs["generate"]
    valid = np.array([r.valid for r in results])
    hits = {
        "generate": generated_hits(results, samples.targets),
        "constrained": (outputs["constrained"] == samples.targets).astype(np.float64),
    }
    for name in ("score-packed", "score-copied"):
        if name in outputs:
            hits[name] = hit_at_k(target_ranks(outputs[name].numpy(), samples.targets), 1)
    ranks = target_ranks(outputs[default].numpy(), samples.targets)

    prompt_lengths = np.array([len(p) for p in samples.prompts])
    title_lengths = np.array([len(c) for sample in samples.candidate_ids for c in sample])
    precision = "fp32 (no autocast)" if args.no_autocast else f"autocast {backbone.autocast_dtype}"
    print(
        f"backbone {args.backbone} on {backbone.device} ({backbone.dtype} weights, {precision}), "
        f"{torch.get_num_threads()} torch threads, {kernel} attention; score defaults to {default}"
    )
    print(
        f"{n} {args.dataset} test users; prompts {prompt_lengths.mean():.0f} tokens "
        f"({prompt_lengths.min()}-{prompt_lengths.max()}); 20 candidates of {title_lengths.mean():.1f} tokens "
        f"+ {len(samples.suffix_ids)} suffix token; batch {args.batch_size} users "
        f"(score: {args.score_batch_size}); generation "
        f"{'all' if args.full_generation else 'to the first line, at most'} {args.max_new_tokens} tokens"
    )
    base = n / timings["generate"][0]
    print(
        f"{'mode':<14}{'seconds':>9}{'users/s':>9}{'x gen':>7}{'forwards':>10}{'ValidRatio':>12}{'HR@1':>7}"
    )
    for name, (seconds, forwards) in timings.items():
        speed = n / seconds
        valid_ratio = valid.mean() if name == "generate" else 1.0
        print(
            f"{name:<14}{seconds:>9.2f}{speed:>9.2f}{speed / base:>7.1f}{forwards:>10d}"
            f"{valid_ratio:>12.3f}{hits[name].mean():>7.3f}"
        )
    ratios = (
        f"ratios: constrained/generate = {n / timings['constrained'][0] / base:.1f}x, "
        f"score/generate = {n / timings[default][0] / base:.1f}x ({default}; target >= 5x)"
    )
    if "score-packed" in timings:
        ratios += (
            f"; score-packed/score-copied = {timings['score-copied'][0] / timings['score-packed'][0]:.1f}x"
        )
    print(ratios)
    print(
        f"score: HR@5 {hit_at_k(ranks, 5).mean():.3f}, NDCG@10 {ndcg_at_k(ranks, 10).mean():.3f}; "
        f"constrained picks score's top candidate for "
        f"{int((outputs['constrained'] == outputs[default].numpy().argmax(1)).sum())}/{n} users"
    )
    if "score-packed" in outputs:
        difference = (outputs["score-packed"] - outputs["score-copied"]).abs().max()
        print(f"packed and copied scores differ by at most {difference:.2e}")
    print("generated first lines:", [r.text for r in results[:3]])


if __name__ == "__main__":
    main()
