"""Command line: ``recadapt data fetch|synth|stats|prepare``, ``train``, ``eval``, ``search``, ``report``,
``recommend`` and ``serve``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from recadapt.data.fetch import FETCHABLE, FetchError
from recadapt.errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DataFormatError,
    NonFiniteLossError,
    RunDirBusyError,
)
from recadapt.methods.registry import PROTOCOLS
from recadapt.progress import quiet_third_party_bars, stderr_is_terminal
from recadapt.train.sections import NEGATIVE_SAMPLERS


def _cmd_fetch(args: argparse.Namespace) -> int:
    from recadapt.data.fetch import fetch_dataset
    from recadapt.paths import data_dir

    path = fetch_dataset(args.name, data_dir(args.data_dir), url=args.url)
    print(f"{args.name}: ready at {path}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from recadapt.data.synth import SynthSpec, write_recbole

    spec = SynthSpec(
        variant=args.variant,
        n_users=args.users,
        n_genres=args.genres,
        items_per_genre=args.items_per_genre,
        seed=args.seed,
        titles=args.titles,
    )
    path = write_recbole(spec, Path(args.out))
    print(f"{spec.name}: written to {path.parent}; train with --dataset recbole:{path}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    import dataclasses

    from recadapt.data.filters import dataset_stats, format_stats, kcore
    from recadapt.data.registry import load_dataset
    from recadapt.paths import data_dir

    ds = load_dataset(args.dataset, data_dir(args.data_dir), verify=not args.no_verify)
    # statistics only: a published split (which a k-core would invalidate) does not matter here
    stats = dataset_stats(kcore(dataclasses.replace(ds, presplit={}), args.kcore))
    if args.kcore > 1:
        stats["dataset"] = f"{args.dataset} ({args.kcore}-core)"
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from recadapt.data.store import ensure_prepared, prepared_root

    sampled = {"n_negatives": args.n_negatives, "negatives": args.negatives}
    sampled = {k: v for k, v in sampled.items() if v is not None}
    if sampled and "sampled-ranking" not in args.protocol:
        raise SystemExit("--n-negatives and --negatives apply to --protocol sampled-ranking only")
    for protocol in args.protocol:
        prepared = ensure_prepared(
            args.dataset,
            protocol,
            data_root=args.data_dir,
            out_root=args.out,
            seed=args.seed,
            force=args.force,
            params=sampled if protocol == "sampled-ranking" else None,
            kcore=args.kcore,
        )
        rows = ", ".join(f"{k} {len(v):,}" for k, v in prepared.parts.items())
        print(
            f"{args.dataset} / {protocol}: {rows} rows; {prepared.n_users:,} users, {prepared.n_items:,} items "
            f"-> {prepared_root(args.out)}"
        )
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from recadapt.methods.registry import method
    from recadapt.train.config import load_config
    from recadapt.train.distributed import launched_processes, relaunch

    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1 and launched_processes() == 1:  # start the processes; each runs this command
        return relaunch(_without_option(args.argv, "--processes"), args.processes)
    if args.processes > 1 and launched_processes() != args.processes:
        raise ValueError(
            f"--processes {args.processes} inside a launcher that started {launched_processes()} processes: "
            "give the number to one of them"
        )

    overrides = list(args.overrides)
    for option, key in (
        ("data_dir", "data.data_dir"),
        ("dataset", "data.dataset"),
        ("protocol", "data.protocol"),
    ):
        if getattr(args, option):
            overrides.append(f"{key}={getattr(args, option)}")
    config = load_config(args.config, overrides)
    recipe = method(config.model_name).recipe
    main_process = int(os.environ.get("RANK", "0")) == 0  # one summary from a run of several processes
    say = print if main_process else (lambda *_args, **_kwargs: None)
    if recipe == "fullrank":
        from recadapt.train.fullrank import train_fullrank

        payload = train_fullrank(config, resume=not args.restart, progress=not args.quiet)
        say(f"run {config.run_dir}: {payload['optimizer_steps']} optimizer steps, best {payload['best']}")
    elif recipe == "llm":
        from recadapt.train.llm import train_llm

        payload = train_llm(config, resume=not args.restart, progress=not args.quiet)
        mode = f", ranking mode {payload['ranking_mode']}" if payload.get("ranking_mode") else ""
        say(f"run {config.run_dir}: {payload['optimizer_steps']} optimizer steps{mode}")
    else:
        from recadapt.train.crm import train_crm

        payload = train_crm(config, resume=not args.restart, progress=not args.quiet)
        say(f"run {config.run_dir}: best epoch {payload['best_epoch']}")
    _print_test(payload["test"], say)
    return 0


def _print_test(test: dict[str, dict], say: Callable[[str], None] = print) -> None:
    from recadapt.tasks.metrics import Estimate

    for name, est in test.items():
        say(f"  test {name:<10} {Estimate(**est)}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from recadapt.methods.registry import method
    from recadapt.train.config import load_config

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    recipe = method(load_config(run_dir / "config.yaml").model_name).recipe
    if recipe != "crm" and (args.negatives or args.n_negatives):
        raise ValueError(
            "--negatives and --n-negatives apply to conventional recommenders' sampled-ranking runs"
        )
    if recipe == "fullrank":
        from recadapt.train.fullrank import evaluate_fullrank_run

        if args.mode:
            raise ValueError("--mode applies to LLM runs; a full-ranking run scores the whole catalogue")
        reports = {
            "": evaluate_fullrank_run(
                run_dir,
                part=args.part,
                n_boot=args.n_boot,
                samples=args.samples,
                shuffle_crm=args.shuffle_crm,
            )
        }
    elif recipe == "llm":
        from recadapt.train.llm import evaluate_llm_run

        if args.samples is not None:
            raise ValueError("--samples applies to CRM runs; an LLM run evaluates its own llm.eval_samples")
        reports = evaluate_llm_run(
            run_dir,
            part=args.part,
            modes=args.mode,
            n_boot=args.n_boot,
            progress=not args.quiet,
            shuffle_crm=args.shuffle_crm,
        )
    else:
        from recadapt.train.crm import evaluate_run

        if args.mode or args.shuffle_crm:
            raise ValueError(
                "--mode and --shuffle-crm apply to LLM runs; a conventional recommender scores every candidate"
            )
        negatives = {"negatives": args.negatives, "n_negatives": args.n_negatives}
        negatives = {k: v for k, v in negatives.items() if v is not None}
        reports = {
            "": evaluate_run(
                run_dir, part=args.part, n_boot=args.n_boot, samples=args.samples or 0, negatives=negatives
            )
        }
    for mode, report in reports.items():
        label = f"{args.part} {mode}".strip() if mode and mode != "ctr" else args.part
        for name, est in report.items():
            print(f"{label} {name:<10} {est}")
    if args.json:
        payload = {m: {k: v.to_dict() for k, v in r.items()} for m, r in reports.items()}
        print(json.dumps(payload[""] if list(payload) == [""] else payload))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from recadapt.train.config import load_config
    from recadapt.train.search import search

    overrides = list(args.overrides)
    for option, key in (("data_dir", "data.data_dir"), ("dataset", "data.dataset")):
        if getattr(args, option):
            overrides.append(f"{key}={getattr(args, option)}")
    config = load_config(args.config, overrides)
    result = search(config, args.trials, final=not args.no_final, progress=not args.quiet)
    print(f"study {config.run_dir}: {len(result['trials'])} finished trials")
    print(f"  best plan {result['best_plan']}  valid NDCG@10 {result['best_value']:.4f}")
    if result["final"] is not None:
        _print_test(result["final"]["test"])
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from recadapt.report import write_report

    write_report(
        [Path(p) for p in args.runs], Path(args.out), title=args.title, label_by_name=args.label_by_name
    )
    print(f"wrote {args.out}")
    return 0


def _item_list(text: str | None) -> list[str] | None:
    """A comma-separated list of item ids or titles (a title with a comma: use the id)."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _load_recommender(args: argparse.Namespace):
    from recadapt.serving import load

    return load(args.run, retriever=args.retriever, n_candidates=args.n_candidates)


# a request's field -> the option of `recadapt recommend` that set it
RECOMMEND_FLAGS = {
    "history": "--history",
    "k": "-k",
    "candidates": "--candidates",
    "items": "--score",
    "user": "--user",
}


def _cmd_recommend(args: argparse.Namespace) -> int:
    from recadapt.serving import RequestError

    recommender = _load_recommender(args)
    history = _item_list(args.history) or []
    try:
        if args.score:
            results = recommender.score(history, _item_list(args.score) or [], user=args.user)
        else:
            results = recommender.recommend(
                history, args.k, _item_list(args.candidates), not args.include_seen, user=args.user
            )
    except RequestError as err:
        flag = RECOMMEND_FLAGS.get(err.field.split("[")[0], err.field)
        raise ValueError(f"{flag}: {err.message}") from None
    if args.json:
        print(json.dumps({"items": [r.to_dict() for r in results]}))
        return 0
    label = "score" if args.score else "top"
    print(
        f"{recommender.config.model_name} ({recommender.run_dir}), {label} for a history of {len(history)}:"
    )
    for rank, r in enumerate(results, start=1):
        print(f"  {rank:>3}. {r.title}  [item {r.item}]  score {r.score:.4f}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from recadapt.serving.http import ServeSettings, serve

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    serve(_load_recommender(args), host=args.host, port=args.port, settings=settings)
    return 0


def _add_loading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="a trained run directory, or a pipeline YAML (ranker, retriever, candidates)"
    )
    parser.add_argument(
        "--retriever", help="LLM rankers: a run ranking the catalogue whose top-N are the candidates"
    )
    parser.add_argument(
        "--n-candidates", type=int, help="the retriever's top-N (default: the run's protocol's)"
    )


NO_VERIFY_HELP = "read a published dataset whose files differ from the recorded SHA-256 (a modified copy)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recadapt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output (results and errors still print)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch and prepare datasets").add_subparsers(
        dest="data_command", required=True
    )
    fetch = data.add_parser("fetch", help="download a dataset from its original distributor and verify it")
    fetch.add_argument("name", choices=list(FETCHABLE))
    fetch.add_argument("--data-dir", help="data root (default: $RECADAPT_DATA or ~/.cache/recadapt/data)")
    fetch.add_argument("--url", help="override the download URL (mirrors, tests)")
    fetch.set_defaults(func=_cmd_fetch)

    synth = data.add_parser(
        "synth",
        help="write a seeded synthetic dataset whose signal is known (RecBole files): the learnability suite",
    )
    synth.add_argument("--variant", required=True, choices=["text", "cf", "long", "ctr"])
    synth.add_argument(
        "--out",
        required=True,
        help="folder; the dataset goes to OUT/synth-VARIANT-sSEED/ "
        "(OUT/synth-VARIANT-STYLE-titles-sSEED/ with a --titles other than the variant's own; sizes other "
        "than the defaults are named too: OUT/synth-cf-4000u-20x230-s0/)",
    )
    synth.add_argument("--users", type=int, default=1000)
    synth.add_argument("--genres", type=int, default=20)
    synth.add_argument("--items-per-genre", type=int, default=25)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--titles",
        default="auto",
        choices=["auto", "genre", "random"],
        help="genre: titles name the genre (opera tune 02); random: syllables; auto: genre for text only",
    )
    synth.set_defaults(func=_cmd_synth)

    stats = data.add_parser("stats", help="users, items, interactions, density, activity distribution")
    stats.add_argument("--dataset", required=True, help="ml-100k, lastfm, ml-1m, ... or recbole:PATH/NAME")
    stats.add_argument("--data-dir")
    stats.add_argument("--kcore", type=int, default=0, help="statistics of the k-core (users and items >= k)")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    stats.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    stats.set_defaults(func=_cmd_stats)

    prep = data.add_parser("prepare", help="build and persist a protocol split (deterministic)")
    prep.add_argument(
        "--dataset",
        required=True,
        help="ml-100k, lastfm, ml-1m, ml-25m, ... recbole:PATH/NAME or amazon2018:PATH/CATEGORY",
    )
    prep.add_argument("--protocol", nargs="+", default=["next-item"], choices=PROTOCOLS)
    prep.add_argument("--n-negatives", type=int, help="sampled-ranking: negatives per target (default 19)")
    prep.add_argument(
        "--negatives", choices=NEGATIVE_SAMPLERS, help="sampled-ranking: uniform (default) or popularity"
    )
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--kcore", type=int, default=0, help="keep the k-core first (users and items >= k)")
    prep.add_argument("--data-dir")
    prep.add_argument("--out", help="prepared root (default ~/.cache/recadapt/prepared)")
    prep.add_argument("--force", action="store_true", help="prepare again even if a matching split exists")
    prep.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    prep.set_defaults(func=_cmd_prepare)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True)
    train.add_argument("--data-dir", help="data root (default: $RECADAPT_DATA or ~/.cache/recadapt/data)")
    train.add_argument("--dataset", help="shorthand for data.dataset=..., e.g. lastfm or recbole:PATH/NAME")
    train.add_argument("--protocol", choices=PROTOCOLS, help="shorthand for data.protocol")
    train.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoint in the run directory"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the run's checkpoint (the default)"
    )
    train.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. train.seed=1 data.dataset=lastfm"
    )
    train.add_argument(
        "--processes",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torchrun; CPU: gloo, GPUs: one each); see docs/scaling.md",
    )
    train.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a finished run")
    ev.add_argument("run_dir")
    ev.add_argument("--part", default="test", choices=["valid", "test"])
    ev.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: the run's)")
    ev.add_argument(
        "--samples",
        type=int,
        help="CRM runs: evaluate on the fixed subset of N rows an LLM run uses with llm.eval_samples=N",
    )
    ev.add_argument(
        "--negatives",
        choices=NEGATIVE_SAMPLERS,
        help="sampled-ranking CRM runs: score on these negatives instead (e.g. popularity)",
    )
    ev.add_argument("--n-negatives", type=int, help="sampled-ranking CRM runs: this many negatives instead")
    ev.add_argument(
        "--mode",
        nargs="+",
        choices=["generate", "constrained", "score"],
        help="LLM runs: ranking modes to evaluate (default: the run's llm.eval_modes)",
    )
    ev.add_argument(
        "--shuffle-crm",
        action="store_true",
        help="runs that read a CRM (LLM and full-ranking): permute item ids on the CRM's side (its item table, "
        "the histories it reads); "
        "a method that uses its collaborative input must score worse",
    )
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    srch = sub.add_parser(
        "search", help="DARec: choose layer-wise adapters with Optuna (resumable), then train the best plan"
    )
    srch.add_argument("--config", required=True)
    srch.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    srch.add_argument("--data-dir", help="data root (default: $RECADAPT_DATA or ~/.cache/recadapt/data)")
    srch.add_argument("--dataset", help="shorthand for data.dataset=...")
    srch.add_argument("--no-final", action="store_true", help="stop after the trials (no full training)")
    srch.add_argument("overrides", nargs="*", help="section.key=value")
    srch.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    srch.set_defaults(func=_cmd_search)

    rep = sub.add_parser("report", help="tabulate finished runs (mean +- std over seeds) with a plot")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--out", required=True, help="Markdown file; a .csv and a .png are written beside it")
    rep.add_argument("--title", default="Results")
    rep.add_argument(
        "--label-by-name",
        action="store_true",
        help="one row per run name without its -s<seed> suffix (ablations of one model), not per model",
    )
    rep.set_defaults(func=_cmd_report)
    rec = sub.add_parser("recommend", help="top-k items for one history from a trained run")
    _add_loading_options(rec)
    rec.add_argument("--history", required=True, help="comma-separated item ids or titles, oldest first")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument(
        "--candidates", help="rank only these (comma-separated); LLM rankers default to the retriever's"
    )
    rec.add_argument("--score", help="instead: score these items (comma-separated), in their order")
    rec.add_argument(
        "--user", help="the dataset's user id (CTR prompts show the profile; user-embedding CRMs)"
    )
    rec.add_argument("--include-seen", action="store_true", help="history items may be recommended again")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=_cmd_recommend)

    srv = sub.add_parser(
        "serve", help="serve a trained run over HTTP (POST /recommend /score, GET /health /info)"
    )
    _add_loading_options(srv)
    srv.add_argument(
        "--host", default="127.0.0.1", help="bind address (default loopback: there is no authentication)"
    )
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=32, help="requests answered by one batched forward")
    srv.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch"
    )
    srv.add_argument(
        "--max-queue", type=int, default=1024, help="waiting requests beyond which the answer is 503"
    )
    srv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # section.key=value overrides may stand on either side of options (argparse takes one run of positionals)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv  # what a relaunch in several processes runs again
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if getattr(args, "no_verify", False):  # reaches every load_dataset this command makes
        from recadapt.data.registry import NO_VERIFY_ENV

        os.environ[NO_VERIFY_ENV] = "1"
    if args.quiet or not stderr_is_terminal():
        quiet_third_party_bars()  # transformers' loading bars would be \r updates in a log file
    try:
        return args.func(args)
    except (
        FetchError,
        DataFormatError,
        ConfigError,
        ValueError,
        FileNotFoundError,
        NonFiniteLossError,
        BackboneError,
        CheckpointError,
        RunDirBusyError,
    ) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}  (run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
