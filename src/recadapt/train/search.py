"""DARec's dynamic adaption: choose each decoder layer's adapter (kind and rank) by Bayesian optimisation.

Every trial proposes a layer-wise plan (``none``, or a kind with a rank), trains a short proxy DARec run with it
and returns the best validation NDCG@10; Optuna's TPE sampler (GP or random on request) proposes the next plan.
The study lives in an Optuna storage: a SQLite file in the run directory by default, or any RDB URL
(``model.search_storage``), so several machines can run trials of one study. Running the command again resumes
the study: finished trials are kept, and ``--trials N`` means N finished trials in total.

A trial's proxy run lives in ``RUN_DIR/trials/<plan hash>``: a trial killed mid-training is failed by Optuna's
heartbeat and retried with the same plan, which resumes the same checkpoint. Once the study has its trials, the
best plan is trained on the full budget in ``RUN_DIR`` itself, and the search history is written as CSV and PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

from recadapt.errors import ConfigError
from recadapt.io import write_text_atomic
from recadapt.train.config import LLMConfig, RunConfig

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "random")


def plan_hash(plan: str) -> str:
    return hashlib.sha256(plan.encode()).hexdigest()[:12]


def suggest_plan(trial: Any, n_layers: int, kinds: list[str], ranks: list[int], groups: int) -> str:
    """One entry per layer, ``none`` or ``<kind>:<rank>`` (the ``model.adapter_plan`` syntax). The layers form
    ``groups`` contiguous blocks that share one choice, which keeps the space small enough for a few trials
    (one choice per layer of a 30-layer model is 30 categorical parameters)."""
    groups = min(groups, n_layers)
    choices = []
    for group in range(groups):
        kind = trial.suggest_categorical(f"group{group:02d}.kind", kinds)
        if kind == "none":
            choices.append("none")
        else:
            choices.append(f"{kind}:{trial.suggest_categorical(f'group{group:02d}.rank', ranks)}")
    return ",".join(choices[layer * groups // n_layers] for layer in range(n_layers))


def proxy_config(config: RunConfig, plan: str) -> RunConfig:
    """The short training run that scores ``plan`` (``model.search_*`` budget), in ``RUN_DIR/trials/<hash>``."""
    model = dict(config.model)
    llm = config.llm or LLMConfig()
    proxy_llm = dataclasses.replace(
        llm,
        train_samples=int(model.get("search_train_samples", 128)),
        epochs=int(model.get("search_epochs", 1)),
    )
    model.update(adapter_plan=plan, valid_samples=int(model.get("search_valid_samples", 100)))
    return dataclasses.replace(
        config,
        output_dir=str(config.run_dir / "trials"),  # a run name is one directory, not a path
        name=plan_hash(plan),
        model=model,
        llm=proxy_llm,
    )


def open_study(config: RunConfig, *, heartbeat_s: int | None = None) -> Any:
    """The run's Optuna study, created or loaded (``load_if_exists``), with a heartbeat that fails and retries
    trials whose process died."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    model = config.model
    heartbeat_s = heartbeat_s or int(model.get("search_heartbeat", 60))
    url = str(model.get("search_storage") or f"sqlite:///{(config.run_dir / 'search.db').resolve()}")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with (
        warnings.catch_warnings()
    ):  # heartbeat_interval is flagged experimental; it is what resumes dead trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            url,
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    name = str(model.get("search_sampler", "tpe"))
    if name not in SAMPLERS:
        raise ConfigError("config", "model.search_sampler", f"must be one of {SAMPLERS}, got {name!r}")
    seed = config.train.seed
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=4),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[name]()
    return optuna.create_study(
        study_name=str(model.get("search_study") or config.run_name),
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )


def search(
    config: RunConfig,
    trials: int,
    *,
    final: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study until it holds ``trials`` finished trials, then (``final``) train the best plan fully.

    Returns ``{"best_plan", "best_value", "trials": [...], "final": metrics payload or None}``.
    """
    import optuna

    from recadapt.methods import method_config
    from recadapt.methods.darec import DARecConfig, n_decoder_layers
    from recadapt.train.fullrank import check_config, train_fullrank

    if config.model_name != "darec":
        raise ConfigError("config", "model.name", "the adapter search is DARec's; use configs/darec.yaml")
    llm = check_config(config)
    options = method_config(DARecConfig, config.model)
    n_layers = n_decoder_layers(llm.backbone)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config)

    def objective(trial: optuna.Trial) -> float:
        plan = suggest_plan(
            trial, n_layers, list(options.search_kinds), list(options.search_ranks), options.search_groups
        )
        trial.set_user_attr("plan", plan)
        payload = train_fullrank(proxy_config(config, plan), progress=progress, evaluate_test=False)
        return float(payload["best_valid_NDCG@10"])

    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = max(0, trials - len(finished))
    if progress and finished:
        print(f"{config.run_name}: study has {len(finished)} finished trials; running {remaining} more")
    if remaining:
        study.optimize(objective, n_trials=remaining, catch=())
    history = write_history(study, config.run_dir)
    best = study.best_trial
    write_text_atomic(config.run_dir / "best_plan.txt", best.user_attrs["plan"] + "\n")
    result: dict[str, Any] = {
        "best_plan": best.user_attrs["plan"],
        "best_value": best.value,
        "trials": history,
        "final": None,
    }
    if final:
        full = dataclasses.replace(config, model={**config.model, "adapter_plan": best.user_attrs["plan"]})
        result["final"] = train_fullrank(full, progress=progress)
    return result


def write_history(study: Any, run_dir: Path) -> list[dict[str, Any]]:
    """``search_history.csv`` and ``search_history.png``: each finished trial's value and the best so far."""
    import optuna

    rows, best = [], float("-inf")
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        best = max(best, t.value)
        rows.append(
            {"trial": t.number, "valid_NDCG@10": t.value, "best_so_far": best, "plan": t.user_attrs["plan"]}
        )
    lines = ["trial,valid_NDCG@10,best_so_far,plan"] + [
        f'{r["trial"]},{r["valid_NDCG@10"]:.6f},{r["best_so_far"]:.6f},"{r["plan"]}"' for r in rows
    ]
    write_text_atomic(run_dir / "search_history.csv", "\n".join(lines) + "\n")
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.scatter([r["trial"] for r in rows], [r["valid_NDCG@10"] for r in rows], label="trial")
        ax.step(
            [r["trial"] for r in rows], [r["best_so_far"] for r in rows], where="post", label="best so far"
        )
        ax.set_xlabel("trial")
        ax.set_ylabel("validation NDCG@10 (proxy run)")
        ax.set_title("DARec adapter search")
        ax.legend()
        fig.tight_layout()
        tmp = run_dir / "search_history.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(run_dir / "search_history.png")
    return rows
