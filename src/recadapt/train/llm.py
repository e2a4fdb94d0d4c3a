"""Training recipe for LLM recommenders: ``zero-shot`` (no training), ``tallrec`` (text prompts + LoRA),
``llara`` (hybrid prompts + LoRA + curriculum over a frozen CRM's item embeddings) and ``ilora`` (LLaRA's prompts
with a mixture-of-experts LoRA gated per instance by the CRM's sequence representation). ``llm.adapter`` picks any
:mod:`recadapt.adapters` kind; conditioned kinds get ``cond`` from :class:`CondSource` at every forward.

One loop on Hugging Face ``accelerate`` (a single CPU process here; ``accelerate launch`` runs the same code on
several GPUs or nodes): LoRA through PEFT, gradient accumulation, linear warm-up then cosine decay, one learning
rate for the LoRA weights and one for LLaRA's projector, and length-bucketed batches (samples sorted by length
within seeded chunks) so little compute goes to padding. Mixed precision is used only where the device runs it
natively (on a CPU without avx512_bf16 or AMX, bf16 autocast is several times slower than fp32).

Resumable: every ``llm.checkpoint_every`` optimizer steps ``RUN_DIR/checkpoint`` is replaced atomically with the
adapter weights, the projector, optimizer and scheduler states, RNG states and the data position; a run started
again continues at the exact micro-batch and reaches the same metrics as an uninterrupted one. Dropout draws are
reseeded from (seed, step, process) at every optimizer step, so a resumed step draws what the uninterrupted step
drew whatever ran in between. After training, the test part is ranked with the configured modes
(:mod:`recadapt.llm.ranking`) and ``metrics.json`` written as the CRM recipe writes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recadapt.adapters.dropout import set_lora_dropout
from recadapt.data.prepare import Prepared
from recadapt.data.store import ensure_prepared
from recadapt.errors import ConfigError, NonFiniteLossError
from recadapt.io import atomic_directory, write_json_atomic
from recadapt.llm.injection import CurriculumSchedule, ItemProjector, embed_with_items
from recadapt.llm.prompts import (
    EVAL_TEMPLATE_INDEX,
    IGNORE_INDEX,
    EncodedBatch,
    ItemTokenizer,
    Prompt,
    build_ctr_prompt,
    build_next_item_prompt,
    ctr_answer,
    describe_item,
    load_templates,
    pick_template_index,
)
from recadapt.progress import progress_bar
from recadapt.tasks.evaluate import RANKING_KS, evaluation_rows
from recadapt.tasks.metrics import Estimate, ctr_report, mean_with_ci, ranking_report, target_ranks
from recadapt.train.config import (
    HYBRID_METHODS,
    LLM_METHODS,
    LLMConfig,
    RunConfig,
    TrainConfig,
    run_fingerprints,
    save_config,
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

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "LLMConfig",
    "LLMTrainerState",
    "answer_loss",
    "evaluate_llm_run",
    "PromptFactory",
    "length_bucketed_batches",
    "resolve_domain",
    "select_precision",
    "train_llm",
    "training_rows",
    "with_lora",
]

log = logging.getLogger(__name__)

NATIVE_BF16_ENV = "RECADAPT_NATIVE_BF16"  # 1 / 0: treat the device as running bf16 natively or not
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"  # the trained adapter (and projector) alone
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's file names, so PeftModel.from_pretrained reads the folder
PROJECTOR_FILE = "projector.safetensors"
PERSONAL_ADAPTER_DIR = (
    "adapter"  # a recadapt.adapters kind (moe-lora, personal-lora, cf-lora), save_adapters' files
)
# train.* fields an LLM run reads; the others belong to the CRM recipe and must stay at their defaults
TRAIN_FIELDS_USED = ("seed", "max_len", "n_boot", "num_threads")
# llm.* fields that may change between a checkpoint and its resumption (they do not affect training)
_EVAL_ONLY_FIELDS = ("eval_modes", "eval_samples", "eval_batch_size", "max_new_tokens", "log_every")
DOMAIN_BY_DATASET = {
    "ml-100k": "movie",
    "ml-1m-ctr": "movie",
    "movielens-llara-test": "movie",
    "lastfm": "artist",
    "steam-llara-test": "game",
}
# independent random streams derived from the seeds
_STREAM_SUBSET, _STREAM_ORDER, _STREAM_STEP, _STREAM_COND = 11, 12, 14, 15  # 13: evaluation_rows
_EVAL_CHUNK = 64  # test samples whose prompts are built (and embedded) at once


# --- configuration ------------------------------------------------------------------------------------------------


def resolve_domain(dataset: str, requested: str = "auto") -> str:
    """The prompt-template domain: ``requested`` unless ``auto``, else from the dataset name (``item`` if unknown)."""
    if requested != "auto":
        load_templates(requested)  # an unknown domain fails here, listing the known ones
        return requested
    return DOMAIN_BY_DATASET.get(dataset, "item")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA with bf16 support, or a CPU with avx512_bf16 or AMX.

    Elsewhere bf16 is emulated; measured on an AVX2-only AMD EPYC, bf16 autocast ran ~7x slower than fp32.
    ``$RECADAPT_NATIVE_BF16`` = 1 or 0 overrides the detection, so one machine can test both choices.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"${NATIVE_BF16_ENV} must be 0 or 1, got {forced!r}")
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch; else read /proc/cpuinfo
    if get_capabilities is not None:
        caps = get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_precision(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """The ``accelerate`` mixed-precision setting (``bf16``, ``fp16`` or ``no``) and why it was chosen."""
    if requested != "auto":
        return requested, "as configured (llm.precision)"
    if native_bf16(device):
        return "bf16", f"{device.type} runs bf16 natively"
    if device.type == "cuda":
        return "fp16", "this GPU lacks bf16"
    return "no", f"{device.type} has no native bf16 (emulated bf16 is slower than fp32)"


def _check_config(config: RunConfig, llm: LLMConfig) -> None:
    method, protocol = config.model_name, config.data.protocol
    extra = sorted(set(config.model) - {"name"})
    if extra:
        raise config.error(f"model.{extra[0]}", f"{method} takes its settings from the llm section")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in TRAIN_FIELDS_USED and getattr(config.train, f.name) != getattr(defaults, f.name):
            raise config.error(
                f"train.{f.name}",
                f"has no effect on LLM runs (they read train.{', train.'.join(TRAIN_FIELDS_USED)}); "
                f"set the llm section instead",
            )
    if protocol not in ("next-item", "ctr"):
        raise config.error("data.protocol", f"{method} supports next-item and ctr, not {protocol}")
    if method == "llara" and protocol != "next-item":
        raise config.error("data.protocol", "llara is defined for next-item only")
    if method in HYBRID_METHODS and not llm.crm_run:
        raise config.error("llm.crm_run", f"{method} needs a trained CRM run directory (e.g. SASRec)")
    if llm.history != "recent" and protocol != "ctr":
        raise config.error(
            "llm.history",
            "retrieval (SUBR) ranks history items by similarity to the target item, which only ctr gives; "
            "use llm.history=recent for next-item",
        )
    if llm.init_lora_from and llm.adapter not in ("cf-lora", "moe-lora"):
        raise config.error(
            "llm.init_lora_from",
            f"starts cf-lora or moe-lora from a trained LoRA, not {llm.adapter}",
        )
    if llm.adapter != "lora":
        if method == "zero-shot":
            raise config.error("llm.adapter", "zero-shot trains no adapter; leave it at lora")
        from recadapt.adapters import adapter_kind

        known = {f.name for f in dataclasses.fields(adapter_kind(llm.adapter).config)}
        for key in sorted(set(llm.adapter_options) - known):  # before any work, naming the file and line
            raise config.error(
                f"llm.adapter_options.{key}",
                f"unknown option of adapter {llm.adapter} (known: {', '.join(sorted(known))})",
            )
        if adapter_kind(llm.adapter).config.needs_cond and llm.cond == "crm" and not llm.crm_run:
            raise config.error(
                "llm.crm_run",
                f"adapter {llm.adapter} is conditioned on a CRM: name a trained CRM run",
            )
    if method != "zero-shot" and llm.max_steps == 0 and llm.epochs == 0:
        raise config.error("llm.epochs", "set llm.epochs or llm.max_steps > 0 to train")


def _evaluation_settings(config: RunConfig, llm: LLMConfig) -> dict[str, Any]:
    """What the test metrics depend on beyond the trained weights (recorded in ``metrics.json``)."""
    return {
        "modes": list(llm.eval_modes),
        "samples": llm.eval_samples,
        "max_new_tokens": llm.max_new_tokens,
        "n_boot": config.train.n_boot,
    }


# --- samples, prompts and batches ---------------------------------------------------------------------------------


def training_rows(part: pd.DataFrame, protocol: str, n: int, split_seed: int) -> np.ndarray:
    """Rows of the train part to train on: all when ``n`` is 0, else the first ``n`` of one fixed permutation
    (for ctr, the persisted few-shot set ``shot_rank < n``). Sets are nested in ``n`` and shared by every method and
    training seed, so runs differ only in what they are meant to."""
    if n <= 0 or n >= len(part):
        return np.arange(len(part))
    if protocol == "ctr" and "shot_rank" in part:
        return np.flatnonzero(part["shot_rank"].to_numpy() < n)
    permutation = np.random.default_rng([split_seed, _STREAM_SUBSET]).permutation(len(part))
    return np.sort(permutation[:n])


def length_bucketed_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int, epoch: int, chunk_batches: int = 50
) -> list[list[int]]:
    """Batches of positions into ``lengths`` for one epoch, grouped by similar length to limit padding.

    The positions are shuffled with (seed, epoch), cut into chunks of ``chunk_batches`` batches, sorted by length
    (longest first) within each chunk and cut into batches; the full batches are shuffled again and the one short
    batch, if any, goes last (as in a ``BatchSampler``, which ``accelerate`` shards across processes).
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size} and {chunk_batches}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch, _STREAM_ORDER])
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    full: list[list[int]] = []
    short: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        for i in range(0, len(part), batch_size):
            batch = part[i : i + batch_size].tolist()
            (full if len(batch) == batch_size else short).append(batch)
    return [full[i] for i in rng.permutation(len(full))] + short


class _PlannedBatches(torch.utils.data.Sampler[list[int]]):
    """A fixed list of batches, with the ``batch_size`` and ``drop_last`` that ``accelerate`` reads to shard it."""

    def __init__(self, batches: list[list[int]], batch_size: int) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.drop_last = False

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate_indices(indices: list[int]) -> Tensor:
    return torch.tensor(indices, dtype=torch.long)


class PromptFactory:
    """Prompts and answers for the rows of one protocol part (next-item or ctr), titles from ``prepared.items``.

    ``history_len`` caps a prompt's history at the most recent items; :meth:`prompt` can keep fewer (``n_history``)
    so a long sample fits the token budget.
    """

    def __init__(
        self, prepared: Prepared, part: str, domain: str, history_len: int, item_tags: int = 0
    ) -> None:
        self.protocol, self.part = prepared.protocol, part
        if self.protocol not in ("next-item", "ctr"):
            raise ValueError(f"LLM prompts exist for next-item and ctr, not {self.protocol}")
        self.domain = load_templates(domain)
        self.frame = prepared.parts[part].reset_index(drop=True)
        self.titles = item_titles(prepared.items, prepared.n_items)
        # how prompts write each item: the title, with up to item_tags tags when asked; answers stay titles
        self.names = self.titles
        if item_tags:
            tags = item_tag_lists(prepared.items, prepared.n_items, str(prepared.manifest.get("dataset", "")))
            self.names = [
                describe_item(t, g[:item_tags], self.domain) for t, g in zip(self.titles, tags, strict=True)
            ]
        self.history_len = history_len
        self.n_templates = len(self.domain.next_item.templates)
        self.users = self.frame["user_id"].to_numpy(np.int64)
        self.targets = self.frame["target"].to_numpy(np.int64)
        # the whole history (a CRM conditioning a personalized adapter may read more than the prompt shows)
        self.full_histories = [np.asarray(h, dtype=np.int64) for h in self.frame["history"]]
        self.histories = [h[-history_len:] for h in self.full_histories]
        self.candidates: list[np.ndarray] = []
        self.labels: np.ndarray | None = None
        self.ratings: list[np.ndarray] = []
        self.full_ratings: list[np.ndarray] = []
        # ReLLa's retrieved view: positions into each full history (set by set_retrieval), else None
        self.retrieved: list[np.ndarray] | None = None
        self.profiles: dict[int, dict[str, Any]] = {}
        if self.protocol == "next-item":
            self.candidates = [np.asarray(c, dtype=np.int64) for c in self.frame["candidates"]]
        else:
            self.labels = self.frame["label"].to_numpy(np.int64)
            self.full_ratings = [np.asarray(r, dtype=np.float64) for r in self.frame["history_ratings"]]
            self.ratings = [r[-history_len:] for r in self.full_ratings]
            users = prepared.users.drop(columns=["raw_id"], errors="ignore")
            self.profiles = {int(row.pop("user_id")): row for row in users.to_dict("records")}

    def __len__(self) -> int:
        return len(self.frame)

    def set_retrieval(self, positions: Sequence[np.ndarray]) -> None:
        """Give every row a retrieved view: ``positions`` (ascending) into its full history, e.g. ReLLa's SUBR
        top-K (:func:`recadapt.llm.retrieval.retrieval_positions`)."""
        if len(positions) != len(self):
            raise ValueError(f"{len(positions)} retrieved views for {len(self)} rows")
        self.retrieved = [np.asarray(p, dtype=np.int64) for p in positions]

    def view(self, row: int, retrieved: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The history items (oldest first) and, for ctr, their ratings that ``row``'s prompt shows: the most
        recent ``history_len`` items, or the retrieved ones."""
        ratings = self.ratings[row] if self.ratings else None
        if not retrieved:
            return self.histories[row], ratings
        if self.retrieved is None:
            raise ValueError("no retrieved view: call set_retrieval first")
        keep = self.retrieved[row]
        return self.full_histories[row][keep], (self.full_ratings[row][keep] if self.full_ratings else None)

    def n_history(self, row: int, retrieved: bool = False) -> int:
        return len(self.view(row, retrieved)[0])

    def prompt(
        self,
        row: int,
        *,
        n_history: int | None = None,
        template: int = 0,
        hybrid: bool = False,
        retrieved: bool = False,
    ) -> Prompt:
        """The prompt of ``row`` with the ``n_history`` most recent items of its view (default: all kept)."""
        history, ratings = self.view(row, retrieved)
        keep = len(history) if n_history is None else n_history
        history = history[len(history) - keep :]
        history_titles = [self.names[i] for i in history]
        if self.protocol == "next-item":
            candidates = self.candidates[row]
            return build_next_item_prompt(
                history_titles,
                [self.names[i] for i in candidates],
                self.domain,
                template,
                hybrid,
                history_ids=history.tolist(),
                candidate_ids=candidates.tolist(),
            )
        assert ratings is not None
        return build_ctr_prompt(
            history_titles,
            self.names[self.targets[row]],
            self.domain,
            history_ratings=ratings[len(ratings) - keep :].tolist(),
            profile=self.profiles.get(int(self.users[row])),
            hybrid=hybrid,
            history_ids=history.tolist(),
            target_id=int(self.targets[row]),
        )

    def answer(self, row: int) -> str:
        """The training answer: the target title (next-item) or "Yes."/"No." (ctr)."""
        if self.labels is not None:
            return ctr_answer(int(self.labels[row]), self.domain)
        return self.titles[self.targets[row]]

    def template(self, row: int, *, seed: int, epoch: int) -> int:
        """The next-item template of ``row`` in ``epoch`` (a fresh seeded draw per epoch; ctr has one)."""
        if self.protocol != "next-item":
            return 0
        return pick_template_index(self.n_templates, seed=seed, sample_index=row, epoch=epoch)


def item_titles(items: pd.DataFrame, n_items: int) -> list[str]:
    """Titles indexed by item id; an item without one is called by its source id."""
    titles = [f"item {i}" for i in range(n_items)]
    raw = items["raw_id"] if "raw_id" in items else items["item_id"]
    title_column = items["title"] if "title" in items else pd.Series([None] * len(items))
    for item_id, title, source in zip(items["item_id"], title_column, raw, strict=True):
        text = str(title).strip() if isinstance(title, str) else ""
        titles[int(item_id)] = text or f"item {source}"
    return titles


def item_tag_lists(items: pd.DataFrame, n_items: int, dataset: str = "") -> list[list[str]]:
    """Each item's tags (the items table's ``tags`` column, else ``genres``; '|' joined, most telling first),
    indexed by item id. Raises ``ConfigError`` on ``llm.item_tags`` when the table has neither."""
    column = next((c for c in ("tags", "genres") if c in items), None)
    if column is None:
        raise ConfigError(
            "config",
            "llm.item_tags",
            f"the {dataset or 'dataset'} items have no tags or genres column to show",
        )
    lists: list[list[str]] = [[] for _ in range(n_items)]
    for item_id, text in zip(items["item_id"], items[column], strict=True):
        if isinstance(text, str) and text.strip():
            lists[int(item_id)] = [t.strip() for t in text.split("|") if t.strip()]
    return lists


def encode_fitted(
    encoder: ItemTokenizer,
    factory: PromptFactory,
    rows: Sequence[int],
    *,
    templates: Sequence[int],
    hybrid: bool,
    max_tokens: int,
    retrieved: Sequence[bool] | None = None,
) -> tuple[list[Prompt], EncodedBatch]:
    """Training inputs for ``rows`` with every sample (prompt + answer) within ``max_tokens``: a sample over the
    budget drops its oldest history items, one at a time, until it fits. ``retrieved[i]``: row i shows its
    retrieved view (ReLLa) instead of its recent items."""
    views = list(retrieved) if retrieved is not None else [False] * len(rows)
    keep = [factory.n_history(r, v) for r, v in zip(rows, views, strict=True)]
    answers = [factory.answer(r) for r in rows]
    while True:
        prompts = [
            factory.prompt(r, n_history=k, template=t, hybrid=hybrid, retrieved=v)
            for r, k, t, v in zip(rows, keep, templates, views, strict=True)
        ]
        batch = encoder.encode(prompts, answers)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        over = [i for i, n in enumerate(lengths) if n > max_tokens]
        if not over:
            return prompts, batch
        for i in over:
            if keep[i] == 0:
                raise ValueError(
                    f"sample {rows[i]} needs {lengths[i]} tokens without any history, over "
                    f"llm.max_prompt_tokens={max_tokens}; raise it"
                )
            keep[i] -= 1


# --- the model --------------------------------------------------------------------------------------------------


def with_lora(backbone_model: nn.Module, llm: LLMConfig) -> nn.Module:
    """The backbone wrapped by PEFT with the configured LoRA (the same for training and re-evaluation)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=llm.lora_r,
        lora_alpha=llm.lora_alpha,
        lora_dropout=llm.lora_dropout,
        target_modules=list(llm.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(backbone_model, lora)
    except ValueError as err:  # e.g. a target module the backbone does not have
        raise ConfigError("config", "llm.lora_target_modules", str(err)) from err
    set_lora_dropout(model)  # FastDropout: same distribution, a third of the cost on CPU
    return model


@dataclass
class _ItemEmbedder:
    """LLaRA's hybrid inputs: token embeddings with ``projector(CRM item embedding)`` at every placeholder."""

    embedding: nn.Module
    item_table: Tensor
    projector: nn.Module

    def __call__(self, batch: EncodedBatch) -> Tensor:
        return embed_with_items(
            self.embedding,
            batch.input_ids,
            batch.item_positions,
            batch.item_ids,
            self.item_table,
            self.projector,
        )


def _forward_loss(
    model: nn.Module, batch: EncodedBatch, embedder: _ItemEmbedder | None, cond: Tensor | None = None
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


def load_crm_run(
    crm_run: str, prepared: Prepared, dataset: str, device: torch.device
) -> tuple[nn.Module, int]:
    """The frozen best model of a CRM run trained on the same dataset, and the history length it trained with."""
    from recadapt.cf.checkpoint import load_crm
    from recadapt.train.config import load_config

    run = Path(crm_run).expanduser()
    if not (run / "best").is_dir():
        raise ConfigError("config", "llm.crm_run", f"{run} holds no trained CRM (no best/ folder)")
    max_len = TrainConfig().max_len
    config_file = run / "config.yaml"
    if config_file.exists():
        crm_config = load_config(config_file)
        trained_on, max_len = crm_config.data.dataset, crm_config.train.max_len
        if trained_on != dataset:
            raise ConfigError(
                "config", "llm.crm_run", f"{run} was trained on {trained_on!r}, this run uses {dataset!r}"
            )
    crm = load_crm(run / "best")
    if crm.n_items != prepared.n_items:
        raise ConfigError(
            "config", "llm.crm_run", f"{run} knows {crm.n_items} items, the dataset has {prepared.n_items}"
        )
    return crm.to(device).eval().requires_grad_(False), max_len


def _load_item_table(crm: nn.Module) -> Tensor:
    """The CRM's frozen item embeddings [n_items, d] (LLaRA's hybrid item tokens)."""
    with torch.no_grad():
        return crm.item_embeddings().detach().float()


@dataclass
class CondSource:
    """Per-instance conditioning for a personalized adapter: ``cond`` [rows, d] for rows of a prompt factory.

    ``crm``: the frozen CRM's user representation of each row's most recent ``history_len`` items (iLoRA's
    SASRec sequence representation); ``random``: a fixed standard-normal vector per user, drawn from (seed, user)
    (iLoRA's ablation: a gate that sees no collaborative signal).
    """

    kind: str
    dim: int
    history_len: int
    crm: nn.Module | None = None
    seed: int = 0

    def __call__(self, factory: PromptFactory, rows: Sequence[int]) -> Tensor:
        if self.kind == "random":
            vectors = [
                np.random.default_rng([self.seed, _STREAM_COND, int(factory.users[r])]).standard_normal(
                    self.dim
                )
                for r in rows
            ]
            return torch.tensor(np.stack(vectors), dtype=torch.float32)
        from recadapt.data.batching import pad_histories

        assert self.crm is not None
        device = next(self.crm.parameters()).device
        histories = pad_histories(
            [factory.full_histories[r] for r in rows], self.history_len, int(self.crm.pad_id)
        )
        batch = {
            "history": torch.from_numpy(histories).to(device),
            "user_id": torch.from_numpy(factory.users[list(rows)]).to(device),
        }
        with torch.no_grad():
            return self.crm.user_representation(batch).float()


def _adapter_config(llm: LLMConfig, cond_dim: int) -> Any:
    """The recadapt.adapters config of a personalized kind from the llm section; unknown options name the field."""
    from recadapt.adapters import ConditionedConfig, adapter_kind, make_config

    values: dict[str, Any] = {
        "r": llm.lora_r,
        "alpha": float(llm.lora_alpha),
        "dropout": llm.lora_dropout,
        "target_modules": list(llm.lora_target_modules),
    }
    if issubclass(adapter_kind(llm.adapter).config, ConditionedConfig):
        values["cond_dim"] = cond_dim
    try:
        return make_config(llm.adapter, **values, **llm.adapter_options)
    except (TypeError, ValueError) as err:
        raise ConfigError("config", "llm.adapter_options", str(err)) from err


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Transformers' activation checkpointing on every decoder layer, non-reentrant (so the frozen embeddings need
    no ``requires_grad`` trick, and hybrid ``inputs_embeds`` work). torch.utils.checkpoint restores the RNG state
    for the recomputation, so dropout masks, hence losses and gradients, are those of a run without it."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def attach_adapter(backbone_model: nn.Module, llm: LLMConfig, cond_dim: int = 0) -> nn.Module:
    """The backbone with the configured adapter: PEFT's LoRA for ``lora``, else a :mod:`recadapt.adapters` kind
    (an :class:`~recadapt.adapters.AdaptedModel`, called with ``cond=``)."""
    if llm.adapter == "lora":
        return with_lora(backbone_model, llm)
    from recadapt.adapters import attach_adapters

    try:
        adapted = attach_adapters(backbone_model, _adapter_config(llm, cond_dim))
    except ValueError as err:  # e.g. a target module the backbone does not have
        raise ConfigError("config", "llm.lora_target_modules", str(err)) from err
    if llm.init_lora_from:
        from recadapt.adapters import load_lora_weights

        source = Path(llm.init_lora_from).expanduser()
        source = source / FINAL_DIR if (source / FINAL_DIR).is_dir() else source
        try:
            load_lora_weights(adapted, source)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError("config", "llm.init_lora_from", f"{source}: {err}") from err
    return adapted


def _accelerator(precision: str, **options: Any) -> Accelerator:
    """An ``Accelerator`` with mixed precision ``precision``. accelerate keeps one process-wide state and refuses
    a second precision in the same process ("AcceleratorState has already been initialized"), so a Python session
    that trains a bf16 run and then an fp32 one resets it first; only in a single-process run, where no other
    rank shares that state."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, **options)


def _unwrapped(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """``module`` as built, without the autocast and fp32-output wrappers ``accelerator.prepare`` puts on its
    ``forward``: left on, they make a module's precision depend on which path built it (a trained run's projector
    projected in bf16, a reloaded one in fp32), so the same run scored differently after reloading."""
    return accelerator.unwrap_model(module, keep_fp32_wrapper=False)


def _inference_model(adapted: nn.Module) -> nn.Module:
    """What evaluation calls: PEFT's base model (LoRA layers inside), or the AdaptedModel itself (it takes cond)."""
    from recadapt.adapters import AdaptedModel

    return adapted if isinstance(adapted, AdaptedModel) else adapted.get_base_model()


# --- checkpoints --------------------------------------------------------------------------------------------------


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


def _save_weights(folder: Path, adapted: nn.Module | None, projector: nn.Module | None) -> None:
    """The adapter (PEFT's files for ``lora``, :func:`recadapt.adapters.save_adapters` in ``adapter/`` for the
    personalized kinds) and the projector, into ``folder``."""
    from safetensors.torch import save_file

    from recadapt.adapters import AdaptedModel, save_adapters

    if isinstance(adapted, AdaptedModel):
        save_adapters(adapted, folder / PERSONAL_ADAPTER_DIR)
    elif adapted is not None:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(adapted, save_embedding_layers=False)
        save_file(_cpu_tensors(state), str(folder / ADAPTER_FILE), metadata={"format": "pt"})
        adapted.peft_config["default"].save_pretrained(str(folder))
    if projector is not None:
        save_file(
            _cpu_tensors(projector.state_dict()), str(folder / PROJECTOR_FILE), metadata={"format": "pt"}
        )


def _load_weights(folder: Path, adapted: nn.Module | None, projector: nn.Module | None) -> None:
    from safetensors.torch import load_file

    from recadapt.adapters import ADAPTER_WEIGHTS, AdaptedModel

    if isinstance(adapted, AdaptedModel):
        try:
            adapted.load_adapter_state_dict(load_file(str(folder / PERSONAL_ADAPTER_DIR / ADAPTER_WEIGHTS)))
        except ValueError as err:
            raise ConfigError(folder, "adapter", str(err)) from err
    elif adapted is not None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(adapted, load_file(str(folder / ADAPTER_FILE)))
        if result.unexpected_keys:
            raise ConfigError(
                folder, "adapter", f"weights do not fit the model: {result.unexpected_keys[:3]}"
            )
    if projector is not None:
        projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))


def _has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_FILE).exists() or (folder / PERSONAL_ADAPTER_DIR).is_dir()


def _cpu_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
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
            _save_weights(tmp, adapted, projector)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()


def _read_state(path: Path) -> LLMTrainerState | None:
    if not (path / "state.json").exists():
        return None
    with reading_checkpoint(path):
        return read_state(LLMTrainerState, path / "state.json")


def _load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    adapted: nn.Module,
    projector: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    with reading_checkpoint(path):
        _load_weights(path, adapted, projector)
        optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
        rng = load_tensors(path / "rng.pt")
        _set_rng_state(rng[accelerator.process_index])


# --- evaluation ---------------------------------------------------------------------------------------------------


def _prompt_inputs(batch: EncodedBatch, embedder: _ItemEmbedder | None) -> list[Tensor]:
    """One unpadded prompt per row: token ids, or input embeddings [T, H] for hybrid prompts."""
    mask = batch.attention_mask.bool()
    if embedder is None or not batch.item_ids.numel():
        return [batch.input_ids[r][mask[r]] for r in range(len(mask))]
    with torch.no_grad():
        embeds = embedder(batch)
    return [embeds[r][mask[r]] for r in range(len(mask))]


def evaluate_llm(
    model: nn.Module,
    encoder: ItemTokenizer,
    factory: PromptFactory,
    rows: np.ndarray,
    *,
    modes: Sequence[str],
    embedder: _ItemEmbedder | None,
    max_tokens: int,
    batch_size: int,
    max_new_tokens: int,
    autocast: Callable[[], Any],
    n_boot: int,
    seed: int,
    progress: bool = False,
    cond_source: CondSource | None = None,
    retrieved: bool = False,
) -> dict[str, dict[str, Estimate]]:
    """Metrics per ranking mode (next-item) or ``{"ctr": ...}`` (AUC, LogLoss, Accuracy), on ``rows`` of the part.

    Next-item: HR@K, NDCG@K and MRR from each mode's :class:`~recadapt.llm.ranking.Ranking` (for ``generate`` and
    ``constrained`` a top-1 only, so HR@K = HR@1), and ValidRatio with its CI. Prompts use the evaluation template,
    hybrid when ``embedder`` is given, and the same history truncation as in training. Every forward (the
    projection of CRM items, the adapter, the backbone) runs under ``autocast``, as in training; the caller passes
    modules without accelerate's wrappers (:func:`_unwrapped`), so a trained and a reloaded run score alike.
    """
    from recadapt.llm.ranking import RankingMode, rank_candidates, yes_probability

    model.eval()
    hybrid = embedder is not None
    answer_ids: dict[str, list[int]] = {}

    def candidate_ids(title: str) -> list[int]:
        if title not in answer_ids:  # the whole answer, end-of-turn included: "this title, then stop"
            answer_ids[title] = encoder.answer_token_ids(title)
        return answer_ids[title]

    scores: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    valid: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    probs: list[np.ndarray] = []
    if factory.protocol == "ctr":
        yes_id, no_id = (
            encoder.answer_token_ids(a)[0]
            for a in (factory.domain.ctr.answer_yes, factory.domain.ctr.answer_no)
        )
        if yes_id == no_id:
            raise ValueError("the Yes and No answers start with the same token; CTR cannot be scored")
    chunks = [rows[i : i + _EVAL_CHUNK] for i in range(0, len(rows), _EVAL_CHUNK)]
    for chunk in progress_bar(chunks, desc="evaluate", enabled=progress, leave=False):
        chunk_rows = [int(r) for r in chunk]
        templates = [EVAL_TEMPLATE_INDEX] * len(chunk_rows)
        prompts, _ = encode_fitted(
            encoder,
            factory,
            chunk_rows,
            templates=templates,
            hybrid=hybrid,
            max_tokens=max_tokens,
            retrieved=[retrieved] * len(chunk_rows),
        )
        device = next(model.parameters()).device
        cond = cond_source(factory, chunk_rows).to(device) if cond_source is not None else None
        with (
            autocast()
        ):  # the one precision rule: projection, adapter and backbone all under the run's autocast
            inputs = _prompt_inputs(encoder.encode(prompts).to(device), embedder)
            if factory.protocol == "ctr":
                probs.append(
                    yes_probability(model, inputs, yes_id, no_id, batch_size=batch_size, cond=cond).numpy()
                )
                continue
            titles = [[factory.titles[i] for i in factory.candidates[r]] for r in chunk_rows]
            token_ids = [[candidate_ids(t) for t in row] for row in titles]
            for mode in modes:
                ranking = rank_candidates(
                    typing.cast(RankingMode, mode),
                    model,
                    inputs,
                    token_ids,
                    tokenizer=encoder.tokenizer,
                    candidate_titles=titles,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    cond=cond,
                )
                scores[mode].append(ranking.scores)
                valid[mode].append(ranking.valid)

    users = factory.users[rows]
    if factory.protocol == "ctr":
        assert factory.labels is not None
        return {
            "ctr": ctr_report(factory.labels[rows], np.concatenate(probs), users, n_boot=n_boot, seed=seed)
        }
    candidates = np.stack([factory.candidates[r] for r in rows])
    target_index = (candidates == factory.targets[rows][:, None]).argmax(axis=1)
    reports: dict[str, dict[str, Estimate]] = {}
    for mode in modes:
        ranks = target_ranks(np.concatenate(scores[mode]), target_index)
        # generate and constrained name one candidate, so only HitRatio@1 is defined for them
        ks = RANKING_KS["next-item"] if mode == "score" else (1,)
        report = ranking_report(ranks, users, ks=ks, n_boot=n_boot, seed=seed)
        if mode != "score":
            report = {"HR@1": report["HR@1"]}
        report["ValidRatio"] = mean_with_ci(
            np.concatenate(valid[mode]).astype(np.float64), users, n_boot, seed
        )
        reports[mode] = report
    return reports


# --- training -----------------------------------------------------------------------------------------------------


def _step_seed(seed: int, step: int, process: int) -> int:
    return int(np.random.default_rng([seed, step, process, _STREAM_STEP]).integers(2**62))


def train_llm(config: RunConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (``tallrec``, ``llara``) or just evaluate (``zero-shot``) an LLM recommender; returns the metrics
    JSON payload, also written to ``RUN_DIR/metrics.json``.

    With ``resume`` a run directory holding a checkpoint continues from it (a finished run returns its metrics);
    without, training starts over. The main process holds the run directory's lock throughout.
    """
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return _train_llm(config, resume, progress)
    with run_dir_lock(config.run_dir) as recovered:
        for line in recovered:
            log.warning("%s: %s (left by an interrupted process)", config.run_dir, line)
        return _train_llm(config, resume, progress)


def _train_llm(config: RunConfig, resume: bool, progress: bool) -> dict[str, Any]:
    from accelerate import PartialState

    from recadapt.llm.backbone import load_backbone

    method = config.model_name
    if method not in LLM_METHODS:
        raise ConfigError(
            "config", "model.name", f"{method!r} is not an LLM method ({', '.join(LLM_METHODS)})"
        )
    llm = config.llm or LLMConfig()
    config = dataclasses.replace(config, llm=llm)
    _check_config(config, llm)
    data, tc = config.data, config.train
    run_dir, ckpt_dir = config.run_dir, config.run_dir / CHECKPOINT_DIR
    fingerprints = run_fingerprints(config, llm, ignore=_EVAL_ONLY_FIELDS)
    fingerprint = fingerprints[0]

    precision, why = select_precision(PartialState().device, llm.precision)
    accelerator = _accelerator(precision, gradient_accumulation_steps=llm.grad_accum)
    main = accelerator.is_main_process
    log.info("%s: mixed precision %s (%s)", run_dir, precision, why)
    if progress and main:
        tqdm.write(f"{config.run_name}: mixed precision {precision} ({why}), device {accelerator.device}")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)

    state = _read_state(ckpt_dir) if resume else None
    if state is not None and state.fingerprint not in fingerprints:
        raise ConfigError(
            ckpt_dir, None, "was written under a different training config; run with --restart to start over"
        )
    if main:  # only after the check, so a refused run leaves the existing run's config.yaml alone
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    evaluation = _evaluation_settings(config, llm)
    if state is not None and state.finished and (run_dir / "metrics.json").exists():
        previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if previous.get("evaluation") == evaluation:
            return previous
        log.info("%s: evaluation settings changed; evaluating the trained model again", run_dir)
    if state is not None and state.num_processes != accelerator.num_processes:
        raise ConfigError(
            ckpt_dir,
            None,
            f"was written by {state.num_processes} processes, this run has {accelerator.num_processes}; "
            "resume with the same number or --restart",
        )
    if state is None and main:
        for stale in (run_dir / "metrics.json", run_dir / "log.csv", run_dir / FINAL_DIR):  # an earlier run's
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)

    with accelerator.main_process_first():
        prepared = ensure_prepared(
            data.dataset,
            data.protocol,
            data_root=data.data_dir,
            out_root=data.prepared_dir,
            seed=data.split_seed,
        )
    domain = resolve_domain(data.dataset, llm.domain)
    torch.manual_seed(tc.seed)  # LoRA and projector initialisation (a resumed run loads them anyway)
    backbone = load_backbone(llm.backbone, dtype=llm.dtype, device=accelerator.device)
    backbone.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    encoder = ItemTokenizer(backbone.tokenizer, model=backbone.model)
    item_vectors = _retrieval_vectors(config, backbone, prepared, progress and main)
    item_table, cond_source = _collaborative_inputs(config, prepared, accelerator.device)
    projector = (
        ItemProjector(item_table.shape[1], backbone.hidden_size).to(accelerator.device)
        if item_table is not None
        else None
    )

    started = time.time()
    train_factory = PromptFactory(prepared, "train", domain, tc.max_len, llm.item_tags)
    if item_vectors is not None:
        _set_retrieval(train_factory, item_vectors)
    subset = training_rows(prepared.parts["train"], data.protocol, llm.train_samples, data.split_seed)
    model: nn.Module = backbone.model
    adapted: nn.Module | None = None
    if method != "zero-shot":
        model, adapted, projector, state = _train(
            accelerator,
            config,
            llm,
            backbone.model,
            encoder,
            train_factory,
            subset,
            item_table,
            projector,
            state or LLMTrainerState(fingerprint=fingerprint, num_processes=accelerator.num_processes),
            cond_source=cond_source,
            progress=progress,
        )
    train_seconds = time.time() - started

    if method == "zero-shot" and main:  # nothing to train: the checkpoint records that the run is done
        state = LLMTrainerState(
            finished=True, num_processes=accelerator.num_processes, fingerprint=fingerprint
        )
        with atomic_directory(ckpt_dir) as tmp:
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")

    payload: dict[str, Any] = {}
    if main:
        # accelerate's mixed-precision wrappers come off: evaluation sets its own autocast, the same one a
        # reloaded run uses (evaluate_llm_run), so both paths compute identical scores
        base = _inference_model(_unwrapped(accelerator, adapted)) if adapted is not None else model
        rows, reports = _evaluate_part(
            config,
            base,
            encoder,
            prepared,
            "test",
            item_table=item_table,
            projector=_unwrapped(accelerator, projector) if projector is not None else None,
            modes=llm.eval_modes,
            autocast=accelerator.autocast,
            n_boot=tc.n_boot,
            progress=progress,
            cond_source=cond_source,
            item_vectors=item_vectors,
        )
        headline = "ctr" if data.protocol == "ctr" else llm.eval_modes[0]
        payload = {
            "run": config.run_name,
            "model": method,
            "dataset": data.dataset,
            "protocol": data.protocol,
            "seed": tc.seed,
            "split_seed": data.split_seed,
            "backbone": llm.backbone,
            "precision": precision,
            "optimizer_steps": state.step if state is not None else 0,
            "train_tokens": state.tokens if state is not None else 0,
            "train_samples": 0 if method == "zero-shot" else len(subset),
            "test_samples": len(rows),
            "ranking_mode": None if data.protocol == "ctr" else headline,
            "train_seconds": 0.0 if method == "zero-shot" else rounded_train_seconds(state),
            "train_seconds_this_process": round(train_seconds, 1),
            "evaluation": evaluation,
            "test": {k: v.to_dict() for k, v in reports[headline].items()},
        }
        if data.protocol != "ctr":
            payload["test_by_mode"] = {m: {k: v.to_dict() for k, v in r.items()} for m, r in reports.items()}
        write_json_atomic(run_dir / "metrics.json", payload)
    accelerator.wait_for_everyone()
    if not main:
        payload = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return payload


def _collaborative_inputs(
    config: RunConfig, prepared: Prepared, device: torch.device
) -> tuple[Tensor | None, CondSource | None]:
    """What a method takes from its CRM run: the item table (hybrid prompts) and the adapter's cond source."""
    llm = config.llm or LLMConfig()
    hybrid = config.model_name in HYBRID_METHODS
    conditioned = llm.adapter not in ("lora",) and config.model_name != "zero-shot"
    crm, crm_len = (None, 0)
    if llm.crm_run and (hybrid or (conditioned and llm.cond == "crm")):
        crm, crm_len = load_crm_run(llm.crm_run, prepared, config.data.dataset, device)
    item_table = _load_item_table(crm) if hybrid and crm is not None else None
    cond_source = None
    if conditioned:
        from recadapt.adapters import ConditionedConfig, adapter_kind

        if issubclass(adapter_kind(llm.adapter).config, ConditionedConfig):
            dim = int(crm.embedding_dim) if crm is not None else int(llm.adapter_options.get("cond_dim", 64))
            cond_source = CondSource(
                kind=llm.cond,
                dim=dim,
                history_len=llm.cond_history_len or crm_len,
                crm=crm if llm.cond == "crm" else None,
                seed=config.train.seed,
            )
    return item_table, cond_source


def _retrieval_vectors(
    config: RunConfig, backbone: Any, prepared: Prepared, progress: bool
) -> np.ndarray | None:
    """SUBR's item vectors (the backbone's mean last hidden state of each title, PCA-reduced), computed with the
    plain backbone before any adapter is attached and cached per dataset and backbone; None without retrieval."""
    llm = config.llm or LLMConfig()
    if llm.history == "recent":
        return None
    from recadapt.llm.retrieval import backbone_item_vectors

    titles = item_titles(prepared.items, prepared.n_items)
    return backbone_item_vectors(
        backbone, config.data.dataset, titles, dim=llm.retrieval_dim, progress=progress
    )


def _set_retrieval(factory: PromptFactory, item_vectors: np.ndarray) -> None:
    """Each row's retrieved view: its train.max_len history items most similar to the target (time order)."""
    from recadapt.llm.retrieval import retrieval_positions

    positions = retrieval_positions(
        factory.full_histories, factory.targets, item_vectors, factory.history_len
    )
    factory.set_retrieval(positions)


def _evaluate_part(
    config: RunConfig,
    model: nn.Module,
    encoder: ItemTokenizer,
    prepared: Prepared,
    part: str,
    *,
    item_table: Tensor | None,
    projector: nn.Module | None,
    modes: Sequence[str],
    autocast: Callable[[], Any],
    n_boot: int,
    progress: bool,
    cond_source: CondSource | None = None,
    item_vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, dict[str, Estimate]]]:
    """Rank (or score, for CTR) the evaluation rows of ``part`` with ``model``; returns the rows and the reports."""
    llm = config.llm or LLMConfig()
    embedder = (
        _ItemEmbedder(model.get_input_embeddings(), item_table, projector)
        if item_table is not None and projector is not None
        else None
    )
    domain = resolve_domain(config.data.dataset, llm.domain)
    factory = PromptFactory(prepared, part, domain, config.train.max_len, llm.item_tags)
    if item_vectors is not None:  # ReLLa evaluates on the retrieved view (recent, mixed: trained on both)
        _set_retrieval(factory, item_vectors)
    rows = evaluation_rows(len(factory), llm.eval_samples, config.data.split_seed)
    reports = evaluate_llm(
        model,
        encoder,
        factory,
        rows,
        modes=modes,
        embedder=embedder,
        max_tokens=llm.max_prompt_tokens,
        batch_size=llm.eval_batch_size,
        max_new_tokens=llm.max_new_tokens,
        autocast=autocast,
        n_boot=n_boot,
        seed=config.train.seed,
        progress=progress,
        cond_source=cond_source,
        retrieved=item_vectors is not None,
    )
    return rows, reports


def evaluate_llm_run(
    run_dir: Path,
    *,
    part: str = "test",
    modes: Sequence[str] | None = None,
    n_boot: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Estimate]]:
    """Evaluate a finished LLM run again from what it saved (``config.yaml`` and the ``final`` adapter and
    projector), with any ranking modes: ``recadapt eval RUN_DIR --mode constrained``.

    Returns one report per mode (next-item) or ``{"ctr": ...}``. The run's own settings decide the prompts, the
    evaluation rows and the bootstrap seed, so the same modes reproduce ``metrics.json``.
    """
    from accelerate import PartialState

    from recadapt.llm.backbone import load_backbone
    from recadapt.train.config import load_config

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(config_file)
    method, llm, data = config.model_name, config.llm or LLMConfig(), config.data
    if method not in LLM_METHODS:
        raise ConfigError(config_file, "model.name", f"{method!r} is not an LLM method")
    final = run_dir / FINAL_DIR
    if method != "zero-shot" and not _has_adapter(final):
        raise FileNotFoundError(
            f"{run_dir} has no trained adapter in {final} (expected {ADAPTER_FILE} or {PERSONAL_ADAPTER_DIR}/); "
            "train it first"
        )
    modes = list(modes or llm.eval_modes)
    if data.protocol == "ctr":
        modes = list(llm.eval_modes)  # CTR has one scoring rule; the modes do not apply

    accelerator = _accelerator(select_precision(PartialState().device, llm.precision)[0])
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    prepared = ensure_prepared(
        data.dataset, data.protocol, data_root=data.data_dir, out_root=data.prepared_dir, seed=data.split_seed
    )
    torch.manual_seed(config.train.seed)  # as in training: the same resized-embedding initialisation
    backbone = load_backbone(llm.backbone, dtype=llm.dtype, device=accelerator.device)
    encoder = ItemTokenizer(backbone.tokenizer, model=backbone.model)
    model: nn.Module = backbone.model
    item_vectors = _retrieval_vectors(config, backbone, prepared, progress)
    item_table, cond_source = _collaborative_inputs(config, prepared, accelerator.device)
    projector = None
    if item_table is not None:
        projector = ItemProjector(item_table.shape[1], backbone.hidden_size).to(accelerator.device)
    if method != "zero-shot":
        adapted = attach_adapter(backbone.model, llm, cond_source.dim if cond_source else 0)
        _load_weights(final, adapted, projector)
        model = _inference_model(adapted)
    if projector is not None:
        projector.eval()
    _, reports = _evaluate_part(
        config,
        model,
        encoder,
        prepared,
        part,
        item_table=item_table,
        projector=projector,
        modes=modes,
        autocast=accelerator.autocast,
        n_boot=config.train.n_boot if n_boot is None else n_boot,
        progress=progress,
        cond_source=cond_source,
        item_vectors=item_vectors,
    )
    return reports


def _train(
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

    from recadapt.adapters import AdaptedModel
    from recadapt.llm.retrieval import mixed_view

    seed, run_dir = config.train.seed, config.run_dir
    ckpt_dir = run_dir / CHECKPOINT_DIR
    adapted = attach_adapter(backbone_model, llm, cond_source.dim if cond_source else 0)
    if llm.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)
    if isinstance(adapted, AdaptedModel):  # adapter weights at lr, a gate / conditioner at its own scale
        groups = adapted.param_groups(llm.lr)
    else:
        groups = [
            {"params": [p for p in adapted.parameters() if p.requires_grad], "lr": llm.lr, "name": "lora"},
        ]
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
    # token lengths (text prompt, evaluation template, answer) order the samples for bucketing
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
            batch_sampler=_PlannedBatches(plan, llm.batch_size),
            collate_fn=_collate_indices,
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
        _load_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler)
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
        _ItemEmbedder(accelerator.unwrap_model(model).get_input_embeddings(), item_table, projector)
        if item_table is not None and projector is not None
        else None
    )
    curriculum = CurriculumSchedule(total_steps, seed=seed) if embedder is not None else None
    trainable = [p for group in groups for p in group["params"]]
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
                torch.manual_seed(_step_seed(seed, state.step, accelerator.process_index))
            hybrid = curriculum is not None and curriculum.use_hybrid(state.step, micro)
            rows = [int(entry_rows[i]) for i in indices.tolist()]
            templates = [factory.template(r, seed=seed, epoch=state.epoch) for r in rows]
            if llm.history == "mixed":  # ReiT: each sample draws the recent or the retrieved view per epoch
                views = [mixed_view(r, seed, state.epoch) for r in rows]
            else:
                views = [bool(entry_views[i]) for i in indices.tolist()]
            _, batch = encode_fitted(
                encoder,
                factory,
                rows,
                templates=templates,
                hybrid=hybrid,
                max_tokens=llm.max_prompt_tokens,
                retrieved=views,
            )
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(*([model] if projector is None else [model, projector])):
                cond = cond_source(factory, rows) if cond_source is not None else None
                loss = _forward_loss(model, batch, embedder if hybrid else None, cond)
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
                _save_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler, state)
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    if not state.finished:
        add_train_time(state, clock)
    if logger is not None:
        logger.close()
    if accelerator.is_main_process:
        with atomic_directory(run_dir / FINAL_DIR) as tmp:
            _save_weights(tmp, adapted, raw_projector)
    if not state.finished:
        state.finished = True
        _save_checkpoint(accelerator, ckpt_dir, adapted, raw_projector, optimizer, scheduler, state)
    return model, adapted, projector, state
