"""The LLM recipe's training loop and its checkpoints.

One loop for every LLM method: gradient accumulation, linear warm-up then cosine decay, one learning rate for the
adapter and one for LLaRA's projector, length-bucketed batches, mixed precision from ``accelerate``. Several
processes split every micro-batch and average their gradients (:mod:`recadapt.train.distributed`), so a run's
updates do not depend on the process count. Every ``llm.checkpoint_every`` optimizer steps ``RUN_DIR/checkpoint``
is replaced atomically with the adapter, the projector, optimizer and scheduler states, RNG states and the data
position; a run started again continues at the exact micro-batch. Dropout draws are reseeded from (seed, step,
process) at every optimizer step, so a resumed step draws what the uninterrupted step drew whatever ran in between.
With ``llm.valid_every`` the adapter is scored on validation rows every so many steps and the best one kept in
``RUN_DIR/best`` (optionally stopping early after ``llm.patience`` validations without improvement).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from recadapt.adapters.build import (
    FINAL_DIR,
    attach_adapter,
    enable_gradient_checkpointing,
    load_weights,
    save_weights,
)
from recadapt.cf.runs import CondSource
from recadapt.data.samplers import length_bucketed_batches
from recadapt.errors import NonFiniteLossError
from recadapt.io import atomic_directory
from recadapt.llm.encoding import IGNORE_INDEX, EncodedBatch, ItemTokenizer
from recadapt.llm.injection import CurriculumSchedule, HybridSchedule, ItemEmbedder
from recadapt.llm.samples import (
    PromptDataset,
    PromptFactory,
    SampleKey,
    SampleRecord,
    conditioning_inputs,
)
from recadapt.progress import progress_bar
from recadapt.train.config import LLMConfig, RunConfig
from recadapt.train.distributed import average_gradients, global_sum, shard, shard_frozen_layers
from recadapt.train.logger import RunLogger, truncate_log
from recadapt.train.state import add_train_time, load_tensors, read_state, reading_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CHECKPOINT_DIR, BEST_DIR = "checkpoint", "best"
STREAM_STEP = 14  # the random stream of the per-step dropout seeds


@dataclass
class LLMTrainerState:
    """Where training stands; saved as ``state.json`` with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches (global: all processes' shares together) of that epoch consumed
    tokens: int = 0  # tokens trained on, all processes together
    window_loss: float = 0.0  # sums since the last log row
    window_batches: int = 0
    window_tokens: int = 0
    finished: bool = False  # training done (the evaluation may still be pending)
    num_processes: int = 1
    fingerprint: str = ""
    train_seconds: float | None = 0.0  # over every process of the run (None: begun before this was recorded)
    # model selection (llm.valid_every): the best validation metric, the step that reached it, and the
    # validations since it (early stopping)
    best_value: float | None = None
    best_step: int = 0
    bad_validations: int = 0


# scores the current adapter on validation rows (every process calls it: each scores a share); higher is better
Validator = Callable[[nn.Module, nn.Module | None], float]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Accelerator,
    path: Path,
    adapted: nn.Module,
    projector: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LLMTrainerState,
) -> None:
    """Replace ``path`` atomically (main process) with everything a resumed run needs; all processes call this."""
    from accelerate.utils import gather_object

    rng = gather_object([_rng_state()])  # one entry per process, in process order
    if accelerator.is_main_process:
        with atomic_directory(path) as tmp:
            save_weights(tmp, adapted, projector)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()


def read_checkpoint_state(path: Path) -> LLMTrainerState | None:
    if not (path / "state.json").exists():
        return None
    with reading_checkpoint(path):
        return read_state(LLMTrainerState, path / "state.json")


def load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    adapted: nn.Module,
    projector: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    with reading_checkpoint(path):
        load_weights(path, adapted, projector)
        optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
        rng = load_tensors(path / "rng.pt")
        _set_rng_state(rng[accelerator.process_index])


def forward_loss(
    model: nn.Module, batch: EncodedBatch, embedder: ItemEmbedder | None, cond: Tensor | None = None
) -> Tensor:
    """The causal-LM loss on the answer tokens of ``batch`` (hybrid inputs when ``embedder`` is given; ``cond``
    for a personalized adapter): the mean cross-entropy over answer tokens, as the model's own ``labels`` loss.

    Only the positions that predict an answer token go through the output layer (``logits_to_keep`` as a boolean
    mask): the answer is a few tokens of a ~300-token prompt, and the vocabulary projection with its softmax over
    every position (SmolLM2: 49k x 576, a fifth of the model's FLOPs) would otherwise be computed and
    back-propagated for nothing.
    """
    if embedder is not None and batch.item_ids.numel():
        inputs: dict[str, Tensor] = {"inputs_embeds": embedder(batch, cond)}
    else:
        inputs = {"input_ids": batch.input_ids}
    if cond is not None:
        inputs["cond"] = cond.to(batch.input_ids.device)
    return answer_loss(model, batch.labels, attention_mask=batch.attention_mask, **inputs)


def answer_loss(model: nn.Module, labels: Tensor, **inputs: Any) -> Tensor:
    """Mean cross-entropy over the tokens where ``labels`` is not IGNORE_INDEX, running the output layer only at
    the positions that predict them (``inputs``: the model's other arguments)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    logits = model(**inputs, logits_to_keep=keep).logits
    targets = labels[:, 1:][keep[:, :-1]]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets)


def listwise_loss(
    model: nn.Module,
    samples: PromptDataset,
    records: Sequence[SampleRecord],
    embedder: ItemEmbedder | None,
    cond: Tensor | None = None,
    *,
    objective: str = "listwise",
) -> Tensor:
    """``llm.objective`` listwise (or both): cross-entropy of a softmax over the candidates' mean log-likelihoods
    per token, the scores score mode ranks by, with the target candidate as the class.

    The generative loss only raises the target title's likelihood; nothing in it lowers the other candidates',
    so a model can fit it while ranking at chance. Here every candidate is scored after the prompt in one
    packed forward (:func:`recadapt.llm.scoring.candidate_log_likelihoods`, differentiable), so the gradient is
    the one ranking needs. ``both`` adds the target's negative mean log-likelihood per token (the generative
    loss, each sample weighted alike rather than each answer token) from the same forward.
    """
    from recadapt.llm.scoring import PACKED_ATTENTION, candidate_log_likelihoods
    from recadapt.llm.session import _candidate_tensor
    from recadapt.tasks.llm import prompt_inputs

    factory, encoder = samples.factory, samples.encoder
    device = next(model.parameters()).device
    prompts = prompt_inputs(samples.prompt_batch(records).to(device), embedder, grad=True, users=cond)
    candidates = [factory.candidates[r.key.row] for r in records]
    targets = []
    for record, row_candidates in zip(records, candidates, strict=True):
        hits = np.flatnonzero(row_candidates == factory.targets[record.key.row])
        if not len(hits):
            raise ValueError(f"row {record.key.row}: its target is not among its candidates")
        targets.append(int(hits[0]))
    tokens, lengths = _candidate_tensor(
        [[encoder.candidate_token_ids(factory.titles[int(i)]) for i in row] for row in candidates], ()
    )
    packed = getattr(model.config, "_attn_implementation", None) in PACKED_ATTENTION
    totals = candidate_log_likelihoods(model, prompts, tokens, cond=cond, packed=packed)
    scores = totals / lengths.to(totals.device)
    target = torch.tensor(targets, device=scores.device)
    loss = nn.functional.cross_entropy(scores, target)
    if objective == "both":
        loss = loss - scores.gather(1, target[:, None]).mean()
    return loss


def step_seed(seed: int, step: int, process: int) -> int:
    return int(np.random.default_rng([seed, step, process, STREAM_STEP]).integers(2**62))


def train_loop(
    accelerator: Accelerator,
    config: RunConfig,
    llm: LLMConfig,
    backbone_model: nn.Module,
    encoder: ItemTokenizer,
    factory: PromptFactory,
    subset: np.ndarray,
    item_table: Tensor | None,
    projector: nn.Module | None,
    state: LLMTrainerState,
    *,
    cond_source: CondSource | None = None,
    validate: Validator | None = None,
    progress: bool,
) -> tuple[nn.Module, nn.Module | None, LLMTrainerState]:
    """The training loop; returns the adapted (PEFT or AdaptedModel) model, the projector and the final state.
    With ``validate`` (and ``llm.valid_every``) the best adapter is kept in ``RUN_DIR/best``."""
    from transformers import get_cosine_schedule_with_warmup

    from recadapt.llm.retrieval import mixed_view

    seed, run_dir = config.train.seed, config.run_dir
    ckpt_dir = run_dir / CHECKPOINT_DIR
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    adapted = attach_adapter(backbone_model, llm, cond_source.dim if cond_source else 0)
    if llm.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)
    fsdp = llm.fsdp and world > 1
    if fsdp:  # the frozen base weights split across the processes; the adapters stay whole
        layer_types = getattr(backbone_model, "_no_split_modules", None) or []
        if not shard_frozen_layers(adapted, layer_types):
            raise ValueError(
                f"llm.fsdp: no decoder layer of {type(backbone_model).__name__} found to shard (its "
                f"_no_split_modules: {layer_types})"
            )
    groups = adapted.param_groups(llm.lr)  # adapter weights at lr, a gate / conditioner at its own scale
    if projector is not None:
        groups.append(
            {"params": list(projector.parameters()), "lr": llm.projector_lr or llm.lr, "name": "projector"}
        )
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=llm.lr, weight_decay=llm.weight_decay)

    # training entries: one per sample, or (ReiT's "both") one per sample and view
    if llm.history == "both":
        entry_rows = np.concatenate([subset, subset])
        entry_views = np.repeat([False, True], len(subset))
    else:
        entry_rows, entry_views = np.asarray(subset), np.full(len(subset), llm.history == "retrieved")
    samples = PromptDataset(factory, encoder, llm.max_prompt_tokens)
    # token lengths (text prompt, evaluation template, answer) order the samples for bucketing: an estimate made
    # once per run, before each epoch's records (template, prompt kind) are known
    texts = [
        factory.prompt(int(r), retrieved=bool(v)).text + " " + factory.answer(int(r))
        for r, v in zip(entry_rows, entry_views, strict=True)
    ]
    lengths = np.array([len(ids) for ids in encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]])

    def plan_for(epoch: int) -> list[list[int]]:
        """The epoch's global micro-batches, the same in every process (seed and epoch decide them)."""
        return length_bucketed_batches(
            lengths, llm.batch_size, seed=seed, epoch=epoch, chunk_batches=llm.bucket_batches
        )

    steps_per_epoch = math.ceil(len(plan_for(0)) / llm.grad_accum)
    total_steps = llm.max_steps or llm.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(llm.warmup_ratio * total_steps), total_steps
    )
    if state.step > 0 or state.finished:
        load_checkpoint(accelerator, ckpt_dir, adapted, projector, optimizer, scheduler)
        state.window_tokens = 0  # tokens/s restarts with the clock; loss sums carry over
        log.info(
            "resuming %s at step %d (epoch %d, batch %d)",
            run_dir,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
    # accelerate's optimizer wrapper brings fp16's loss scaling; the model stays unwrapped (no DDP: gradients are
    # averaged explicitly, see recadapt.train.distributed) and every forward runs under accelerator.autocast
    optimizer = accelerator.prepare_optimizer(optimizer)
    if main:
        truncate_log(run_dir / "log.csv", state.step)
        truncate_log(run_dir / "valid.csv", state.step)
    logger = RunLogger(run_dir) if main else None
    valid_logger = (
        RunLogger(run_dir, "valid.csv") if main and validate is not None and llm.valid_every else None
    )

    embedder = (
        ItemEmbedder(adapted.get_input_embeddings(), item_table, projector)
        if item_table is not None and projector is not None
        else None
    )
    schedule = HybridSchedule if llm.curriculum == "hybrid" else CurriculumSchedule
    curriculum = schedule(total_steps, seed=seed) if embedder is not None else None
    bar = progress_bar(total=total_steps, initial=state.step, desc=config.run_name, enabled=progress and main)
    window_started = clock = time.time()

    def train_mode() -> None:
        adapted.train()
        if projector is not None:
            projector.train()

    train_mode()
    while state.step < total_steps and not state.finished:
        plan = plan_for(state.epoch)
        if state.batch_in_epoch >= len(plan):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        # an optimizer step takes grad_accum micro-batches (fewer at the end of an epoch); checkpoints and a
        # resumed run fall on step boundaries
        first = state.batch_in_epoch
        step_batches = plan[first : first + llm.grad_accum]
        torch.manual_seed(step_seed(seed, state.step, rank))
        step_loss, step_tokens = 0.0, 0
        for micro, batch_entries in enumerate(step_batches):
            hybrid = curriculum is not None and curriculum.use_hybrid(state.step, micro)
            entries = list(shard(batch_entries, rank, world))
            # under FSDP every forward is collective: an empty share runs the batch's first row, weighted 0
            stand_in = fsdp and not entries
            if stand_in:
                entries = list(batch_entries[:1])
            rows = [int(entry_rows[i]) for i in entries]
            templates = [factory.template(r, seed=seed, epoch=state.epoch) for r in rows]
            if llm.history == "mixed":  # ReiT: each sample draws the recent or the retrieved view per epoch
                views = [mixed_view(r, seed, state.epoch) for r in rows]
            else:
                views = [bool(entry_views[i]) for i in entries]
            keys = [SampleKey(r, t, hybrid, v) for r, t, v in zip(rows, templates, views, strict=True)]
            local_sum, local_count, tokens = 0.0, 0, 0
            loss: Tensor | None = None
            if keys:  # a share may be empty (a batch smaller than the process count): zero gradients
                records = samples.records(keys)
                batch = samples.training_batch(records).to(accelerator.device)
                tokens = int(batch.attention_mask.sum())
                # the CRM's conditioning outside autocast, as evaluation computes it
                cond = cond_source(*conditioning_inputs(records)) if cond_source is not None else None
                with accelerator.autocast():
                    if llm.objective == "generative":
                        loss = forward_loss(adapted, batch, embedder if hybrid else None, cond)
                        local_count = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
                    else:
                        loss = listwise_loss(
                            adapted,
                            samples,
                            records,
                            embedder if hybrid else None,
                            cond,
                            objective=llm.objective,
                        )
                        local_count = len(records)
                if stand_in:
                    local_count, tokens = 0, 0
                local_sum = float(loss.detach()) * local_count
            # the micro-batch's mean over all shares: each share's sum over the global count (x world: the
            # gradient average divides by it again), and the step's mean over its micro-batches
            count = global_sum(local_count, accelerator.device)
            value = global_sum(local_sum, accelerator.device) / max(count, 1)
            if not math.isfinite(value) or (loss is not None and not math.isfinite(float(loss.detach()))):
                raise NonFiniteLossError(
                    f"{run_dir}: loss is {value} at epoch {state.epoch + 1}, step {state.step}; "
                    "lower llm.lr or check the data"
                )
            if loss is not None:
                accelerator.backward(loss * (local_count * world / max(count, 1) / len(step_batches)))
            step_loss += value
            step_tokens += int(global_sum(tokens, accelerator.device))
        average_gradients(trainable)
        if llm.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, llm.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_lr = scheduler.get_last_lr()[0]  # the LoRA learning rate this step used
        scheduler.step()
        state.step += 1
        state.batch_in_epoch += len(step_batches)
        state.tokens += step_tokens
        state.window_loss += step_loss
        state.window_batches += len(step_batches)
        state.window_tokens += step_tokens
        bar.update(1)
        if state.step % llm.log_every == 0 or state.step == total_steps:
            elapsed = max(time.time() - window_started, 1e-9)
            row = {
                "train/loss": state.window_loss / state.window_batches,
                "train/lr": step_lr,
                "train/tokens_per_second": state.window_tokens / elapsed,
                "train/epoch": state.epoch + state.batch_in_epoch / len(plan),
            }
            if curriculum is not None:
                row["train/p_hybrid"] = curriculum.probability(state.step - 1)  # this step's
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_second']:.0f}")
            if logger is not None:
                logger.log(state.step, row)
            state.window_loss, state.window_batches, state.window_tokens = 0.0, 0, 0
            window_started = time.time()
        if state.batch_in_epoch >= len(plan):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if (
            validate is not None
            and llm.valid_every
            and (state.step % llm.valid_every == 0 or state.step >= total_steps)
        ):
            _validation(
                accelerator, llm, run_dir, validate, adapted, projector, state, valid_logger, progress
            )
            train_mode()
        if state.step >= total_steps:
            break
        if state.step % llm.checkpoint_every == 0:
            clock = add_train_time(state, clock)
            save_checkpoint(accelerator, ckpt_dir, adapted, projector, optimizer, scheduler, state)
    bar.close()
    add_train_time(state, clock)
    for open_logger in (logger, valid_logger):
        if open_logger is not None:
            open_logger.close()
    best = run_dir / BEST_DIR
    if validate is not None and llm.valid_every and state.best_value is not None:
        accelerator.wait_for_everyone()  # rank 0 wrote it
        load_weights(best, adapted, projector)  # model selection: the final adapter is the best validated one
    if main:
        with atomic_directory(run_dir / FINAL_DIR) as tmp:
            save_weights(tmp, adapted, projector, base_model=llm.backbone, tokenizer=encoder.tokenizer)
    state.finished = True
    save_checkpoint(accelerator, ckpt_dir, adapted, projector, optimizer, scheduler, state)
    return adapted, projector, state


def _validation(
    accelerator: Accelerator,
    llm: LLMConfig,
    run_dir: Path,
    validate: Validator,
    adapted: nn.Module,
    projector: nn.Module | None,
    state: LLMTrainerState,
    logger: RunLogger | None,
    progress: bool,
) -> None:
    """Score the current adapter on validation rows; keep it in ``RUN_DIR/best`` when it is the best so far, and
    mark the run finished once ``llm.patience`` validations in a row have not improved on the best."""
    value = validate(adapted, projector)
    improved = state.best_value is None or (math.isfinite(value) and value > state.best_value)
    if improved:
        state.best_value, state.best_step, state.bad_validations = value, state.step, 0
        if accelerator.is_main_process:
            with atomic_directory(run_dir / BEST_DIR) as tmp:
                save_weights(tmp, adapted, projector, base_model=llm.backbone)
                (tmp / "valid.json").write_text(
                    json.dumps({"step": state.step, "value": value}, indent=1), encoding="utf-8"
                )
        accelerator.wait_for_everyone()
    else:
        state.bad_validations += 1
    if logger is not None:
        logger.log(state.step, {"valid/metric": value, "valid/best": state.best_value})  # valid.csv
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(
            f"step {state.step}: valid {value:.4f} (best {state.best_value:.4f} at step {state.best_step})"
        )
    if llm.patience and state.bad_validations >= llm.patience:
        log.info(
            "%s: no improvement in %d validations; stopping at step %d", run_dir, llm.patience, state.step
        )
        state.finished = True
