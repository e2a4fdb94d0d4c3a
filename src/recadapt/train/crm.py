"""Training recipe for conventional recommenders (CRMs) under any of the protocols.

Resumable: after every epoch the model, optimizer, trainer state and RNG states are written atomically to
``RUN_DIR/checkpoint``; the best model by the validation metric is kept in ``RUN_DIR/best`` (safetensors + JSON).
Runs on the accelerator when there is one, and in several processes when launched so (``recadapt train
--processes N``): each takes a share of every batch and of every evaluation, gradients are averaged, rank 0 writes
(:mod:`recadapt.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from recadapt.cf import CRM_REGISTRY, build_crm
from recadapt.cf.checkpoint import load_crm, save_crm
from recadapt.data.batching import expand_prefixes, pad_histories
from recadapt.data.prepare import Prepared
from recadapt.data.store import prepared_for
from recadapt.errors import ConfigError, NonFiniteLossError
from recadapt.io import atomic_directory, write_json_atomic
from recadapt.progress import progress_bar
from recadapt.tasks.evaluate import (
    crm_scores,
    evaluate_crm,
    evaluation_rows,
    monitor_metric,
    report_from_scores,
)
from recadapt.tasks.metrics import Estimate
from recadapt.train.config import RunConfig, model_options, save_config
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


@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_value: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    train_seconds: float | None = 0.0  # over every process of the run (None: begun before this was recorded)
    fingerprint: str = (
        ""  # crm_fingerprint of the config that wrote it ("": written before this was recorded)
    )


# fields that change neither the training nor its results: where the run lives, threads, evaluation batching
_NOT_FINGERPRINTED = {"": ("name", "output_dir"), "data": ("data_dir", "prepared_dir"),
                      "train": ("num_threads", "eval_batch_size", "n_boot")}  # fmt: skip


def crm_fingerprint(config: RunConfig) -> str:
    """A hash of every setting that shapes a CRM run's training, so its checkpoint is never resumed (or its
    finished metrics returned) under another config. ``train.n_boot`` only changes the test report, which is
    recomputed when it differs (see ``evaluation`` in ``metrics.json``)."""
    import hashlib

    settings = config.to_dict()
    for section, names in _NOT_FINGERPRINTED.items():
        for name in names:
            (settings[section] if section else settings).pop(name, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_tensors(prepared: Prepared, protocol: str, max_len: int) -> dict[str, torch.Tensor]:
    """All training samples as padded tensors (built once; batches are index slices)."""
    train = prepared.parts["train"]
    pad = prepared.n_items
    if protocol in ("full-ranking", "sampled-ranking"):  # leave-one-out: one training sample per prefix
        history, target, rows = expand_prefixes(
            train["history"], train["target"].to_numpy(), max_len, min_history=1, pad_id=pad, return_rows=True
        )
        users = train["user_id"].to_numpy(np.int64)[rows]
        return {
            k: torch.from_numpy(v) for k, v in (("history", history), ("target", target), ("user_id", users))
        }
    tensors = {
        "history": torch.from_numpy(pad_histories(train["history"], max_len, pad)),
        "target": torch.from_numpy(train["target"].to_numpy(np.int64, copy=True)),
        "user_id": torch.from_numpy(train["user_id"].to_numpy(np.int64, copy=True)),
    }
    if protocol == "ctr":
        tensors["label"] = torch.from_numpy(train["label"].to_numpy(np.float32, copy=True))
    return tensors


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """The model section without its name, coerced to the model config's field types and validated by it; errors
    name the field and where it was set (``FILE:LINE`` or ``<command line>``)."""
    name = config.model_name
    if name not in CRM_REGISTRY:
        raise config.error("model.name", f"unknown model {name!r}; known: {sorted(CRM_REGISTRY)}")
    return model_options(config, CRM_REGISTRY[name].config_class)


def _save_checkpoint(run_dir: Path, model, optimizer, state: TrainerState) -> None:
    """Rank 0 writes; every process's RNG state goes in (``per_process``, in rank order), all processes call it."""
    rng = rng_states()
    if is_main_process():
        with atomic_directory(run_dir / "checkpoint") as tmp:
            save_crm(model, tmp / "model")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")
    barrier()


def _read_checkpoint_state(run_dir: Path) -> TrainerState | None:
    path = run_dir / "checkpoint" / "state.json"
    if not path.exists():
        return None
    with reading_checkpoint(path.parent):
        return read_state(TrainerState, path)


def _load_checkpoint(run_dir: Path, model, optimizer) -> None:
    ckpt = run_dir / "checkpoint"
    with reading_checkpoint(ckpt):
        restored = load_crm(ckpt / "model")
        model.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(load_tensors(ckpt / "optimizer.pt"))
        restore_rng(load_tensors(ckpt / "rng.pt"), ckpt)


def improves(value: float, state: TrainerState) -> bool:
    """Whether this epoch's validation ``value`` is the new best. An undefined value (NaN: e.g. an AUC over a
    validation part with one class) never beats a defined one, but the first epoch is always kept, so a run
    whose validation metric is undefined still has a best model to test (``NaN > x`` is always false)."""
    if state.best_epoch < 0:
        return True
    if math.isnan(value):
        return False
    return math.isnan(state.best_value) or value > state.best_value


def _flat(report: dict[str, Estimate], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v.value for k, v in report.items()}


def train_crm(config: RunConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train, early-stop on validation, evaluate the best model on test; returns the metrics JSON payload.

    The run directory is this process's alone while it works (:func:`~recadapt.train.runlock.run_dir_lock`).
    With ``resume`` an existing checkpoint continues, if it was written under the same config; a finished run
    returns its metrics.
    """
    process_state()  # the process group first (several CPU processes: gloo)
    if not is_main_process():
        return _train_crm(config, resume, progress)
    with run_dir_lock(config.run_dir):
        return _train_crm(config, resume, progress)


def _train_crm(config: RunConfig, resume: bool, progress: bool) -> dict[str, Any]:
    run_dir = config.run_dir
    options = model_kwargs(config)  # before any work: a bad model field fails at once, naming its line
    fingerprint = crm_fingerprint(config)
    state = _read_checkpoint_state(run_dir) if resume else None
    if state is not None and state.fingerprint not in ("", fingerprint):
        raise ConfigError(
            run_dir / "checkpoint",
            None,
            "was written under a different training config (see its config.yaml); run with --restart to start "
            "over, or choose another run name (name=...)",
        )
    main = is_main_process()
    if main:
        save_config(config, run_dir / "config.yaml")  # only after the check: a refused run leaves it alone
    evaluation = {"n_boot": config.train.n_boot}
    if state is not None and state.finished and (run_dir / "metrics.json").exists():
        previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if previous.get("evaluation", evaluation) == evaluation:
            return previous
    if state is None and main:  # a new run: nothing of an earlier one in this directory may mix with it
        for stale in ("metrics.json", "log.csv"):
            (run_dir / stale).unlink(missing_ok=True)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    data, tc, protocol = config.data, config.train, config.data.protocol
    with main_process_first():
        prepared = prepared_for(data)
    rank, world = process_rank_and_count()
    device = process_state().device
    torch.manual_seed(tc.seed)
    model = build_crm(config.model_name, n_items=prepared.n_items, n_users=prepared.n_users, **options)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if state is not None:
        _load_checkpoint(run_dir, model, optimizer)
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
        truncate_log(run_dir / "log.csv", state.epoch)  # rows of an epoch the checkpoint does not hold
        state.fingerprint = fingerprint
    else:
        state = TrainerState(fingerprint=fingerprint)

    tensors = training_tensors(prepared, protocol, tc.max_len)
    n_train = len(tensors["target"])
    monitor = monitor_metric(protocol, tc.monitor)
    logger = RunLogger(run_dir) if main else None
    steps_per_epoch = math.ceil(n_train / tc.batch_size)
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    started = clock = time.time()
    while state.epoch < tc.epochs and not state.finished:
        model.train()
        epoch_started = time.time()
        # the sample order depends only on (seed, epoch), so a resumed run sees the same batches
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(tc.seed * 100_003 + state.epoch)
        )
        total = 0.0
        bar = progress_bar(
            range(steps_per_epoch),
            desc=f"epoch {state.epoch + 1}/{tc.epochs}",
            enabled=progress and main,
            leave=False,
        )
        for i in bar:
            # this process's share of the global batch; its mean loss weighted by its share of the rows, and
            # gradients averaged over processes: the update of one process on the whole batch
            batch_index = order[i * tc.batch_size : (i + 1) * tc.batch_size]
            index = shard(batch_index, rank, world)
            optimizer.zero_grad(set_to_none=True)
            local = 0.0
            if len(index):
                loss = model.loss({k: v[index].to(device) for k, v in tensors.items()})
                local = float(loss.detach())
                (loss * (len(index) * world / len(batch_index))).backward()
            value = global_sum(local * len(index), device) / len(batch_index)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{run_dir}: loss is {value} at epoch {state.epoch + 1}, step {state.step}; "
                    "lower train.lr or check the data"
                )
            average_gradients([p for p in model.parameters() if p.requires_grad])
            optimizer.step()
            state.step += 1
            total += value
            bar.set_postfix(loss=f"{value:.4f}")
        state.epoch += 1
        valid = _evaluate(model, prepared.parts["valid"], protocol, prepared.n_items, tc, n_boot=0)
        value = valid[monitor].value
        if logger is not None:
            logger.log(
                state.epoch,
                {
                    "train/loss": total / steps_per_epoch,
                    "time/epoch_seconds": time.time() - epoch_started,
                    **_flat(valid, "valid"),
                },
            )
        if improves(value, state):
            state.best_value, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            if main:
                with atomic_directory(run_dir / "best") as tmp:
                    save_crm(model, tmp)
        else:
            state.bad_epochs += 1
        if progress and main:
            tqdm.write(
                f"epoch {state.epoch}: loss {total / steps_per_epoch:.4f}  valid {monitor} {value:.4f}"
                f"  (best {state.best_value:.4f} @ {state.best_epoch})"
            )
        if tc.patience and state.bad_epochs >= tc.patience:
            state.finished = True
        clock = add_train_time(state, clock)
        _save_checkpoint(run_dir, model, optimizer, state)
    if logger is not None:
        logger.close()
    train_seconds = time.time() - started

    barrier()  # rank 0 wrote best/
    best = load_crm(run_dir / "best", map_location=device)
    test = _evaluate(best, prepared.parts["test"], protocol, prepared.n_items, tc, n_boot=tc.n_boot)
    payload = {
        "run": config.run_name,
        "model": config.model_name,
        "dataset": data.dataset,
        "protocol": protocol,
        "seed": tc.seed,
        "split_seed": data.split_seed,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "valid_monitor": {monitor: state.best_value},
        "train_samples": n_train,
        "processes": world,
        "test_samples": len(prepared.parts["test"]),
        "train_seconds": rounded_train_seconds(state),
        "train_seconds_this_process": round(train_seconds, 1),
        "evaluation": evaluation,
        "test": {k: v.to_dict() for k, v in test.items()},
    }
    if main:
        write_json_atomic(run_dir / "metrics.json", payload)
    state.finished = True
    _save_checkpoint(run_dir, model, optimizer, state)
    return payload


def _evaluate(model, part, protocol: str, n_items: int, tc, *, n_boot: int) -> dict[str, Estimate]:
    """:func:`~recadapt.tasks.evaluate.evaluate_crm` with each process scoring a share of the rows (gathered in
    order, so every row is scored once)."""
    rank, world = process_rank_and_count()
    share = part.iloc[shard(np.arange(len(part)), rank, world)]
    scores = crm_scores(model, share, protocol, n_items, tc.max_len, tc.eval_batch_size)
    if world > 1:
        scores = gather_rows(scores.reshape(len(share), *scores.shape[1:]))
    return report_from_scores(scores, part, protocol, n_boot=n_boot, seed=tc.seed)


def evaluate_run(
    run_dir: Path,
    part: str = "test",
    n_boot: int | None = None,
    samples: int = 0,
    negatives: dict[str, Any] | None = None,
) -> dict[str, Estimate]:
    """Re-evaluate a finished run's best model on a part of its persisted split (``n_boot``: the run's);
    ``samples`` > 0 keeps the fixed subset an LLM run evaluated with ``llm.eval_samples`` = ``samples``.
    ``negatives`` (sampled-ranking runs: ``negatives``, ``n_negatives``) scores the same model on other
    candidate lists of the same split, e.g. popularity-sampled ones (the training rows do not depend on them)."""
    from recadapt.train.config import load_config

    config = load_config(run_dir / "config.yaml")
    data = config.data
    if negatives:
        if data.protocol != "sampled-ranking":
            raise ValueError(f"{run_dir}: other negatives apply to sampled-ranking runs, not {data.protocol}")
        data = dataclasses.replace(data, **negatives)  # validated again by DataConfig
    prepared = prepared_for(data)
    model = load_crm(run_dir / "best")
    frame = prepared.parts[part]
    frame = frame.iloc[evaluation_rows(len(frame), samples, data.split_seed)].reset_index(drop=True)
    return evaluate_crm(
        model,
        frame,
        data.protocol,
        prepared.n_items,
        config.train.max_len,
        config.train.eval_batch_size,
        n_boot=config.train.n_boot if n_boot is None else n_boot,
        seed=config.train.seed,
    )
