"""Training recipe of the full-ranking LLM recommenders (``laser``, ``darec``): one loop for every
:class:`~recadapt.methods.base.FullRankingModel`.

Samples are the prefixes of the leave-one-out training sequences (``llm.train_samples`` of them, a fixed random
subset, when the budget is smaller than the data). Training runs in *stages*: Laser's stage 1 recomputes the item
table with the LLM at every epoch and stage 2 trains against the frozen best table; DARec, whose item table is a
cheap projection, has one stage and recomputes it at every step with gradients. After every epoch a fixed subset of
validation users (``model.valid_samples``) is ranked over the whole catalogue; the best epoch's weights (and table)
are kept in ``RUN_DIR/best`` and score the test part.

Resumable: ``RUN_DIR/checkpoint`` is replaced atomically every ``llm.checkpoint_every`` optimizer steps and at the
end of every epoch (trainable weights, optimizer, scheduler, RNG, data position and the current item table), and a
run started again continues from it. The sample order of an epoch depends only on (seed, stage, epoch).

Several processes (``recadapt train --processes N``) split every micro-batch and average their gradients, and
each ranks a share of the validation and test users (:mod:`recadapt.train.distributed`); rank 0 writes. Each
process computes the whole item table (Laser's stage 1 encodes every item with the LLM: not yet split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from recadapt.data.batching import expand_prefixes
from recadapt.data.prepare import Prepared
from recadapt.data.store import prepared_for
from recadapt.errors import ConfigError, NonFiniteLossError
from recadapt.io import atomic_directory, write_json_atomic
from recadapt.methods.base import FullRankingModel, Stage
from recadapt.methods.registry import method, methods_of
from recadapt.progress import progress_bar
from recadapt.tasks.fullrank import catalogue_scores, rank_part, ranking_metrics, subset
from recadapt.tasks.metrics import Estimate
from recadapt.train.config import LLMConfig, RunConfig, run_fingerprints, save_config
from recadapt.train.distributed import (
    average_gradients,
    barrier,
    gather_rows,
    global_sum,
    is_main_process,
    main_process_first,
    process_rank_and_count,
    process_state,
    restore_rng,
    rng_states,
    shard,
)
from recadapt.train.logger import RunLogger, truncate_log
from recadapt.train.runlock import run_dir_lock
from recadapt.train.state import (
    add_train_time,
    load_tensors,
    read_state,
    reading_checkpoint,
    rounded_train_seconds,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR, BEST_DIR = "checkpoint", "best"
WEIGHTS, TABLE = "trainable.safetensors", "item_table.safetensors"
_STREAM_SUBSET, _STREAM_ORDER = 21, 22
# llm fields these methods read; the others must stay at their defaults (they would silently do nothing)
LLM_FIELDS_USED = (
    "backbone", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lr", "weight_decay",
    "warmup_ratio", "max_grad_norm", "epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every",
    "train_samples", "crm_run", "eval_samples", "eval_batch_size",
)  # fmt: skip
# llm fields that change evaluation or logging only: they never enter the checkpoint fingerprint
EVAL_ONLY_FIELDS = ("eval_samples", "eval_batch_size", "log_every", "checkpoint_every")


@dataclass
class FullRankState:
    """Where training stands; ``state.json`` of every checkpoint."""

    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # micro-batches of that epoch consumed
    step: int = 0  # optimizer steps in total
    tokens: int = 0  # prompt tokens trained on
    best_metric: float = -math.inf
    best_label: str = ""
    finished: bool = False
    fingerprint: str = ""
    train_seconds: float | None = 0.0  # over every process of the run (None: begun before this was recorded)


# --- configuration ------------------------------------------------------------------------------------------------


def check_config(config: RunConfig) -> LLMConfig:
    """The llm section, after checking that the run asks only for what these methods do."""
    if method(config.model_name).recipe != "fullrank":
        raise config.error("model.name", f"{config.model_name!r} is not one of {methods_of('fullrank')}")
    if config.data.protocol not in method(config.model_name).protocols:
        raise ConfigError(
            "config",
            "data.protocol",
            f"{config.model_name} ranks the whole catalogue or sampled candidates: use full-ranking or "
            f"sampled-ranking, not {config.data.protocol}",
        )
    llm = config.llm or LLMConfig()
    defaults = LLMConfig()
    for f in dataclasses.fields(LLMConfig):
        if f.name not in LLM_FIELDS_USED and getattr(llm, f.name) != getattr(defaults, f.name):
            raise ConfigError("config", f"llm.{f.name}", f"has no effect on {config.model_name} runs")
    if not llm.crm_run:
        raise ConfigError("config", "llm.crm_run", f"{config.model_name} needs a trained CRM run directory")
    return llm


# --- data ---------------------------------------------------------------------------------------------------------


def training_samples(
    prepared: Prepared, max_len: int, n: int, split_seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every prefix of the training sequences with at least one history item (or a fixed random ``n`` of them)."""
    train = prepared.parts["train"]
    padded, targets = expand_prefixes(
        train["history"], train["target"].to_numpy(), max_len, 1, pad_id=prepared.n_items
    )
    rows = np.arange(len(targets))
    if 0 < n < len(rows):
        rows = np.sort(
            np.random.default_rng([split_seed, _STREAM_SUBSET]).choice(len(rows), n, replace=False)
        )
    histories = [row[row != prepared.n_items] for row in padded[rows]]
    return histories, targets[rows]


# --- checkpoints --------------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, model, optimizer, scheduler, state: FullRankState, table: Tensor | None
) -> None:
    """Rank 0 writes (every process's RNG state in ``per_process``); all processes call it."""
    rng = rng_states()
    if is_main_process():
        _write_checkpoint(path, model, optimizer, scheduler, state, table, rng)
    barrier()


def _write_checkpoint(
    path: Path, model, optimizer, scheduler, state: FullRankState, table: Tensor | None, rng: dict[str, Any]
) -> None:
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()},
                  str(tmp / WEIGHTS))  # fmt: skip
        if table is not None:
            save_file({"table": table.detach().cpu().contiguous()}, str(tmp / TABLE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")


def _read_state(path: Path) -> FullRankState | None:
    if not (path / "state.json").exists():
        return None
    with reading_checkpoint(path):
        return read_state(FullRankState, path / "state.json")


def load_trainable(model: FullRankingModel, folder: Path) -> Tensor | None:
    """Load ``folder``'s trainable weights into ``model``; return its item table if it holds one."""
    state = load_file(str(folder / WEIGHTS))
    missing = set(model.trainable_state_dict()) - set(state)
    if missing:
        raise ConfigError(folder, WEIGHTS, f"lacks weights the model trains: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return load_file(str(folder / TABLE))["table"] if (folder / TABLE).exists() else None


def _save_best(path: Path, model: FullRankingModel, table: Tensor | None, report: dict[str, Any]) -> None:
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()},
                  str(tmp / WEIGHTS))  # fmt: skip
        if table is not None:
            save_file({"table": table.detach().cpu().contiguous()}, str(tmp / TABLE))
        (tmp / "valid.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


# --- the recipe ---------------------------------------------------------------------------------------------------


def _lr_lambda(total: int, warmup_ratio: float):
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def build_run(config: RunConfig, progress: bool = True) -> tuple[FullRankingModel, Prepared, list[Stage]]:
    """The model (frozen parts loaded, trainable parts initialised from ``train.seed``), data and stages."""
    from recadapt.methods import build_full_ranking

    llm = check_config(config)
    data = config.data
    prepared = prepared_for(data)
    torch.manual_seed(config.train.seed)
    model, stages = build_full_ranking(config, llm, prepared, progress=progress)
    return model, prepared, stages


def train_fullrank(
    config: RunConfig, resume: bool = True, progress: bool = True, evaluate_test: bool = True
) -> dict[str, Any]:
    """Train and test a Laser or DARec run; returns (and writes) ``metrics.json``'s payload.

    ``evaluate_test=False`` (the adapter search's proxy runs) stops after model selection on validation. The
    run directory is this process's alone while it works (:func:`~recadapt.train.runlock.run_dir_lock`).
    """
    process_state()  # the process group first (several CPU processes: gloo; GPUs: one each)
    if not is_main_process():
        return _train_fullrank(config, resume, progress, evaluate_test)
    with run_dir_lock(config.run_dir):
        return _train_fullrank(config, resume, progress, evaluate_test)


def _train_fullrank(config: RunConfig, resume: bool, progress: bool, evaluate_test: bool) -> dict[str, Any]:
    llm = check_config(config)
    tc = config.train
    run_dir = config.run_dir
    ckpt = run_dir / CHECKPOINT_DIR
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    print_fn = tqdm.write if progress else log.info
    fingerprints = run_fingerprints(config, llm, ignore=EVAL_ONLY_FIELDS)
    digest = fingerprints[0]
    state = _read_state(ckpt) if resume else None
    if state is not None and state.fingerprint not in fingerprints:
        raise ConfigError(
            ckpt, None, "was written under a different config; run with --restart to start over"
        )
    main = is_main_process()
    rank, world = process_rank_and_count()
    progress = progress and main
    if main:  # only after the check: a refused run leaves config.yaml alone
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if state is not None and state.finished and (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if state is None and main:
        for stale in (
            run_dir / "metrics.json",
            run_dir / "log.csv",
            run_dir / "valid.csv",
            run_dir / BEST_DIR,
            ckpt,
        ):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    barrier()
    state = state or FullRankState(fingerprint=digest)

    with main_process_first():
        model, prepared, stages = build_run(config, progress)
    histories, targets = training_samples(prepared, tc.max_len, llm.train_samples, config.data.split_seed)
    valid = subset(
        prepared.parts["valid"], int(config.model.get("valid_samples", 200)), config.data.split_seed
    )
    per_epoch = math.ceil(len(targets) / llm.batch_size)
    steps_per_epoch = math.ceil(per_epoch / llm.grad_accum)
    total_steps = steps_per_epoch * sum(s.epochs for s in stages)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=llm.lr, weight_decay=llm.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, llm.warmup_ratio))
    table: Tensor | None = None
    if (ckpt / "state.json").exists():
        with reading_checkpoint(ckpt):
            table = load_trainable(model, ckpt)
            optimizer.load_state_dict(load_tensors(ckpt / "optimizer.pt"))
            scheduler.load_state_dict(load_tensors(ckpt / "scheduler.pt"))
            restore_rng(load_tensors(ckpt / "rng.pt"), ckpt)
        if main:
            truncate_log(run_dir / "log.csv", state.step)
            truncate_log(run_dir / "valid.csv", state.step)
        print_fn(
            f"{config.run_name}: resuming at stage {state.stage} epoch {state.epoch} batch {state.batch}"
        )
    logger = RunLogger(run_dir) if main else None
    valid_logger = RunLogger(run_dir, "valid.csv") if main else None
    started = time.time()
    n_trainable = sum(p.numel() for p in params)
    if main:
        print_fn(
            f"{config.run_name}: {len(targets)} training samples, {total_steps} optimizer steps, "
            f"{n_trainable:,} trainable parameters"
        )

    window = {"loss": 0.0, "aux": 0.0, "batches": 0, "tokens": 0, "time": time.time()}
    clock = time.time()
    while state.stage < len(stages):
        stage = stages[state.stage]
        while state.epoch < stage.epochs:
            label = f"{stage.name} epoch {state.epoch + 1}/{stage.epochs}"
            if model.table_needs_llm and table is None:
                if stage.refresh or not (run_dir / BEST_DIR / WEIGHTS).exists():
                    model.eval()  # stage 1, or a stage 2 with no stage 1 before it: the current model's table
                    table = model.item_table(progress=progress)
                else:
                    table = load_trainable(model, run_dir / BEST_DIR)
            order = np.random.default_rng([tc.seed, _STREAM_ORDER, state.stage, state.epoch]).permutation(
                len(targets)
            )
            model.train()
            bar = progress_bar(
                total=per_epoch, initial=state.batch, desc=label, enabled=progress, leave=False
            )
            while state.batch < per_epoch:
                # this process's share of the global micro-batch, its mean loss weighted by its share of the
                # rows; the gradients are averaged over processes before the step
                global_rows = order[state.batch * llm.batch_size : (state.batch + 1) * llm.batch_size]
                rows = shard(global_rows, rank, world)
                step_table = table if model.table_needs_llm else model.item_table()
                local_loss = local_aux = 0.0
                tokens = 0
                if len(rows):
                    loss, aux = model.loss(
                        [histories[r] for r in rows], torch.from_numpy(targets[rows]), step_table
                    )
                    local_loss, local_aux = float(loss.detach()), float(aux.detach())
                    (loss * (len(rows) * world / len(global_rows)) / llm.grad_accum).backward()
                    tokens = model.prompt_tokens([histories[r] for r in rows])
                value = global_sum(local_loss * len(rows)) / len(global_rows)
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{config.run_name}: loss {value} at {label}, optimizer step {state.step}"
                    )
                state.batch += 1
                tokens = int(global_sum(tokens))
                window["loss"] += value
                window["aux"] += global_sum(local_aux * len(rows)) / len(global_rows)
                window["batches"] += 1
                window["tokens"] += tokens
                state.tokens += tokens
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if state.batch % llm.grad_accum == 0 or state.batch == per_epoch:
                    average_gradients(params)
                    if llm.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, llm.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    if state.step % llm.log_every == 0 and logger is not None:
                        elapsed = time.time() - window["time"]
                        logger.log(
                            state.step,
                            {
                                "train/loss": window["loss"] / window["batches"],
                                "train/aux_loss": window["aux"] / window["batches"],
                                "train/lr": scheduler.get_last_lr()[0],
                                "train/tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                            },
                        )
                        window = {"loss": 0.0, "aux": 0.0, "batches": 0, "tokens": 0, "time": time.time()}
                    if state.step % llm.checkpoint_every == 0 and state.batch < per_epoch:
                        clock = add_train_time(state, clock)
                        _save_checkpoint(ckpt, model, optimizer, scheduler, state, table)
            bar.close()
            # end of epoch: the table of the updated model (also next epoch's), validation, best, checkpoint
            if model.table_needs_llm and stage.refresh:
                model.eval()
                table = model.item_table(progress=progress)
            with torch.no_grad():
                eval_table = table if model.table_needs_llm else model.item_table()
            report = _rank_shared(
                model, valid, eval_table, tc.max_len, llm.eval_batch_size, 0, progress=progress, desc="valid"
            )
            metric = report["NDCG@10"].value
            if valid_logger is not None:
                valid_logger.log(state.step, {f"valid/{k}": v.value for k, v in report.items()})
                print_fn(
                    f"{config.run_name}: {label}: valid NDCG@10 {metric:.4f}, HR@10 {report['HR@10'].value:.4f}"
                )
            if metric > state.best_metric:
                state.best_metric, state.best_label = metric, label
                if main:
                    _save_best(run_dir / BEST_DIR, model, eval_table if model.table_needs_llm else None,
                               {"label": label, **{k: v.to_dict() for k, v in report.items()}})  # fmt: skip
            state.epoch, state.batch = state.epoch + 1, 0
            clock = add_train_time(state, clock)
            _save_checkpoint(ckpt, model, optimizer, scheduler, state, table)
        state.stage, state.epoch = state.stage + 1, 0
        table = None  # the next stage starts from its own table (stage 2: the best one)
    train_seconds = time.time() - started
    for open_logger in (logger, valid_logger):
        if open_logger is not None:
            open_logger.close()

    test, report = pd.DataFrame(), {}
    barrier()  # rank 0 wrote best/
    if evaluate_test:
        best_table = load_trainable(model, run_dir / BEST_DIR)
        test = subset(prepared.parts["test"], llm.eval_samples, config.data.split_seed)
        with torch.no_grad():
            if best_table is None:
                best_table = model.item_table()
        report = _rank_shared(
            model,
            test,
            best_table,
            tc.max_len,
            llm.eval_batch_size,
            tc.n_boot,
            progress=progress,
            desc="test",
        )
    payload = {
        "run": config.run_name,
        "model": config.model_name,
        "dataset": config.data.dataset,
        "protocol": config.data.protocol,
        "seed": tc.seed,
        "split_seed": config.data.split_seed,
        "backbone": llm.backbone,
        "optimizer_steps": state.step,
        "train_samples": len(targets),
        "train_tokens": state.tokens,  # prompt tokens (without Laser's prefix)
        "test_samples": len(test),
        "valid_samples": len(valid),
        "best": state.best_label,
        "best_valid_NDCG@10": state.best_metric,
        "train_seconds": rounded_train_seconds(state),
        "train_seconds_this_process": round(train_seconds, 1),
        "trainable_parameters": n_trainable,
        "processes": world,
        "test": {k: v.to_dict() for k, v in report.items()},
    }
    if main:
        write_json_atomic(run_dir / "metrics.json", payload)
    state.finished = True
    _save_checkpoint(ckpt, model, optimizer, scheduler, state, None)
    return payload


def _rank_shared(
    model: FullRankingModel,
    part: pd.DataFrame,
    table: Tensor,
    max_len: int,
    batch_size: int,
    n_boot: int,
    *,
    progress: bool = False,
    desc: str = "ranking",
) -> dict[str, Estimate]:
    """:func:`~recadapt.tasks.fullrank.rank_part` with each process ranking a share of the users (gathered in
    order: every user ranked once)."""
    rank, world = process_rank_and_count()
    if world == 1:
        return rank_part(model, part, table, max_len, batch_size, n_boot, progress=progress, desc=desc)
    share = part.iloc[shard(np.arange(len(part)), rank, world)]
    scores = catalogue_scores(model, share, table, max_len, batch_size, progress=progress, desc=desc)
    return ranking_metrics(gather_rows(scores), part, n_boot)


def evaluate_fullrank_run(run_dir: Path, part: str = "test", n_boot: int | None = None,
                          samples: int | None = None, shuffle_crm: bool = False) -> dict[str, Estimate]:  # fmt: skip
    """Rank ``part`` with a finished run's best weights (and item table).

    ``shuffle_crm``: the probe of whether the method uses its CRM. The frozen CRM reads every item as another
    (:func:`~recadapt.cf.runs.permute_crm_items`, the same permutation as the LLM methods' probe) and the item
    table is recomputed under it, so histories, one-item prompts and injected slots all carry wrong
    collaborative embeddings while titles and targets stay. A method that uses its CRM must rank worse."""
    from recadapt.cf.runs import permute_crm_items, shuffled_item_map
    from recadapt.train.config import load_config

    config = load_config(run_dir / "config.yaml")
    llm = check_config(config)
    model, prepared, _ = build_run(config, progress=False)
    table = load_trainable(model, run_dir / BEST_DIR)
    if shuffle_crm:
        permute_crm_items(model.crm, shuffled_item_map(prepared.n_items, config.data.split_seed))
        table = None
    if table is None:
        with torch.no_grad():
            table = model.item_table()
    rows = subset(
        prepared.parts[part], llm.eval_samples if samples is None else samples, config.data.split_seed
    )
    boot = config.train.n_boot if n_boot is None else n_boot
    return rank_part(model, rows, table, config.train.max_len, llm.eval_batch_size, boot)
