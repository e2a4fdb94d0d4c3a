"""The LLM recipe's training loop and its checkpoints.

One loop on Hugging Face ``accelerate``: gradient accumulation, linear warm-up then cosine decay, one learning
rate for the adapter and one for LLaRA's projector, length-bucketed batches. Every ``llm.checkpoint_every``
optimizer steps ``RUN_DIR/checkpoint`` is replaced atomically with the adapter, the projector, optimizer and
scheduler states, RNG states and the data position; a run started again continues at the exact micro-batch.
Dropout draws are reseeded from (seed, step, process) at every optimizer step, so a resumed step draws what the
uninterrupted step drew whatever ran in between.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
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
from recadapt.data.samplers import PlannedBatches, collate_indices, length_bucketed_batches
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
from recadapt.train.logger import RunLogger, truncate_log
from recadapt.train.state import add_train_time, load_tensors, read_state, reading_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STREAM_STEP = 14  # the random stream of the per-step dropout seeds


@dataclass
class LLMTrainerState:
    """Where training stands; saved as ``state.json`` with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches of that epoch this process has consumed
    tokens: int = 0  # tokens this process has trained on
    window_loss: float = 0.0  # sums since the last log row
    window_batches: int = 0
    window_tokens: int = 0
    finished: bool = False  # training done (the evaluation may still be pending)
    num_processes: int = 1
    fingerprint: str = ""
    train_seconds: float | None = 0.0  # over every process of the run (None: begun before this was recorded)


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
        inputs: dict[str, Tensor] = {"inputs_embeds": embedder(batch)}
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
    prompts = prompt_inputs(samples.prompt_batch(records).to(device), embedder, grad=True)
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
    progress: bool,
) -> tuple[nn.Module, nn.Module, nn.Module | None, LLMTrainerState]:
    """The training loop; returns the prepared model, the adapted (PEFT or AdaptedModel) model, the projector
    and the final state."""
    from transformers import get_cosine_schedule_with_warmup

    from recadapt.llm.retrieval import mixed_view

    seed, run_dir = config.train.seed, config.run_dir
    ckpt_dir = run_dir / CHECKPOINT_DIR
    adapted = attach_adapter(backbone_model, llm, cond_source.dim if cond_source else 0)
    if llm.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)
    groups = adapted.param_groups(llm.lr)  # adapter weights at lr, a gate / conditioner at its own scale
    if projector is not None:
        groups.append(
            {"params": list(projector.parameters()), "lr": llm.projector_lr or llm.lr, "name": "projector"}
        )
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

    def loader_for(epoch: int) -> Any:
        plan = length_bucketed_batches(
            lengths, llm.batch_size, seed=seed, epoch=epoch, chunk_batches=llm.bucket_batches
        )
        loader = torch.utils.data.DataLoader(
            range(len(entry_rows)),
            batch_sampler=PlannedBatches(plan, llm.batch_size),
            collate_fn=collate_indices,
        )
        return accelerator.prepare_data_loader(loader)

    steps_per_epoch = math.ceil(len(loader_for(0)) / llm.grad_accum)
    total_steps = llm.max_steps or llm.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(llm.warmup_ratio * total_steps), total_steps
    )
    # the projector is saved and loaded unwrapped; the prepared one (DDP under several processes) trains
    raw_projector = projector
    if projector is not None:
        model, projector, optimizer = accelerator.prepare(adapted, projector, optimizer)
    else:
        model, optimizer = accelerator.prepare(adapted, optimizer)
    if state.step > 0 or state.finished:
        load_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler)
        state.window_tokens = 0  # tokens/s restarts with the clock; loss sums carry over
        log.info(
            "resuming %s at step %d (epoch %d, batch %d)",
            run_dir,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
    if accelerator.is_main_process:
        truncate_log(run_dir / "log.csv", state.step)
    logger = RunLogger(run_dir) if accelerator.is_main_process else None

    embedder = (
        ItemEmbedder(accelerator.unwrap_model(model).get_input_embeddings(), item_table, projector)
        if item_table is not None and projector is not None
        else None
    )
    schedule = HybridSchedule if llm.curriculum == "hybrid" else CurriculumSchedule
    curriculum = schedule(total_steps, seed=seed) if embedder is not None else None
    trainable = [p for group in groups for p in group["params"]]
    if llm.objective != "generative" and accelerator.num_processes > 1:
        raise ValueError(
            f"llm.objective={llm.objective} runs in one process for now: its packed forward calls the model "
            "without the distributed wrapper's gradient synchronisation"
        )
    bar = progress_bar(
        total=total_steps,
        initial=state.step,
        desc=config.run_name,
        enabled=progress and accelerator.is_main_process,
    )
    window_started = clock = time.time()
    model.train()
    if projector is not None:
        projector.train()
    while state.step < total_steps and not state.finished:
        loader = loader_for(state.epoch)
        epoch_batches = len(loader)
        if state.batch_in_epoch >= epoch_batches:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        if state.batch_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        micro = 0  # micro-batch within the optimizer step (checkpoints fall on step boundaries)
        for indices in loader:
            if micro == 0:
                torch.manual_seed(step_seed(seed, state.step, accelerator.process_index))
            hybrid = curriculum is not None and curriculum.use_hybrid(state.step, micro)
            rows = [int(entry_rows[i]) for i in indices.tolist()]
            templates = [factory.template(r, seed=seed, epoch=state.epoch) for r in rows]
            if llm.history == "mixed":  # ReiT: each sample draws the recent or the retrieved view per epoch
                views = [mixed_view(r, seed, state.epoch) for r in rows]
            else:
                views = [bool(entry_views[i]) for i in indices.tolist()]
            keys = [SampleKey(r, t, hybrid, v) for r, t, v in zip(rows, templates, views, strict=True)]
            records = samples.records(keys)
            batch = samples.training_batch(records).to(accelerator.device)
            with accelerator.accumulate(*([model] if projector is None else [model, projector])):
                cond = cond_source(*conditioning_inputs(records)) if cond_source is not None else None
                if llm.objective == "generative":
                    loss = forward_loss(model, batch, embedder if hybrid else None, cond)
                else:
                    loss = listwise_loss(
                        model,
                        samples,
                        records,
                        embedder if hybrid else None,
                        cond,
                        objective=llm.objective,
                    )
                value = (
                    float(accelerator.reduce(loss.detach(), "mean"))
                    if accelerator.num_processes > 1
                    else float(loss.detach())
                )
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{run_dir}: loss is {value} at epoch {state.epoch + 1}, step {state.step}; "
                        "lower llm.lr or check the data"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and llm.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, llm.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens = int(batch.attention_mask.sum())
            state.batch_in_epoch += 1
            state.tokens += tokens
            state.window_loss += value
            state.window_batches += 1
            state.window_tokens += tokens
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step_lr = scheduler.get_last_lr()[0]  # the LoRA learning rate this step used
            scheduler.step()
            state.step += 1
            micro = 0
            bar.update(1)
            if state.step % llm.log_every == 0 or state.step == total_steps:
                elapsed = max(time.time() - window_started, 1e-9)
                row = {
                    "train/loss": state.window_loss / state.window_batches,
                    "train/lr": step_lr,
                    "train/tokens_per_second": state.window_tokens * accelerator.num_processes / elapsed,
                    "train/epoch": state.epoch + state.batch_in_epoch / epoch_batches,
                }
                if curriculum is not None:
                    row["train/p_hybrid"] = curriculum.probability(state.step - 1)  # this step's
                bar.set_postfix(
                    loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_second']:.0f}"
                )
                if logger is not None:
                    logger.log(state.step, row)
                state.window_loss, state.window_batches, state.window_tokens = 0.0, 0, 0
                window_started = time.time()
            if state.step >= total_steps:
                break
            if state.step % llm.checkpoint_every == 0:
                clock = add_train_time(state, clock)
                save_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler, state)
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    if not state.finished:
        add_train_time(state, clock)
    if logger is not None:
        logger.close()
    if accelerator.is_main_process:
        with atomic_directory(run_dir / FINAL_DIR) as tmp:
            save_weights(tmp, adapted, raw_projector, base_model=llm.backbone, tokenizer=encoder.tokenizer)
    if not state.finished:
        state.finished = True
        save_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler, state)
    return model, adapted, projector, state
