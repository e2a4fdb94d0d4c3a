"""The typed sections of a run config (``data``, ``train``, ``llm`` and the run itself) and their value checks.

Each section is a dataclass whose ``__post_init__`` rejects values that cannot work (a batch size of 0, a NaN
learning rate, a run name that leaves ``output_dir``), so a bad config fails when it is read, not after an
epoch. :mod:`recadapt.train.config` reads them from YAML and the command line and says where each field was set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from recadapt.errors import ConfigError
from recadapt.methods.registry import PROTOCOLS

HISTORY_VIEWS = ("recent", "retrieved", "mixed", "both")
COND_SOURCES = ("crm", "crm-target", "random")
RANKING_MODES = ("generate", "constrained", "score")  # as recadapt.llm.ranking (not imported: it needs torch)
PROJECTORS = ("mlp", "scaled", "vocab")  # as recadapt.llm.injection.PROJECTORS
CURRICULA = ("linear", "hybrid")
ITEM_PLACEMENTS = ("after", "before")  # as recadapt.llm.prompts.ITEM_PLACEMENTS
OBJECTIVES = ("generative", "listwise", "both")
PRECISIONS = ("auto", "bf16", "fp16", "no")
QUANTIZATIONS = ("none", "4bit")  # as recadapt.llm.backbone.QUANTIZATIONS
AMAZON_PREFIX = "amazon2018:"  # as recadapt.data.registry
RECBOLE_PREFIX = "recbole:"  # as recadapt.data.registry (not imported: it loads the readers)
_RANKING_MONITORS = ("HR@{k}", "NDCG@{k}")
# validation metrics train.monitor may name, per protocol: the keys of recadapt.tasks.evaluate.report_from_scores
# (not imported: it needs torch) that early stopping can maximise. LogLoss (lower is better) and ValidRatio
# (always 1 for a CRM) are reported too, but keeping the epoch with the highest of them would be wrong or arbitrary.
MONITOR_METRICS: dict[str, tuple[str, ...]] = {
    "next-item": (*(m.format(k=k) for k in (1, 5, 10) for m in _RANKING_MONITORS), "MRR"),
    "full-ranking": (*(m.format(k=k) for k in (1, 5, 10, 20, 50) for m in _RANKING_MONITORS), "MRR"),
    "sampled-ranking": (*(m.format(k=k) for k in (1, 5, 10, 20) for m in _RANKING_MONITORS), "MRR"),
    "ctr": ("AUC", "Accuracy"),
}


def _check_min(dotted: str, value: float, low: float, *, strict: bool = False) -> None:
    """Raise unless ``value`` is a finite number ``>= low`` (``> low`` with ``strict``).

    Phrased as "raise unless ok" because NaN fails every comparison: a plain ``value <= 0`` test lets NaN through.
    """
    ok = value > low if strict else value >= low
    if not (ok and math.isfinite(value)):
        raise ConfigError("config", dotted, f"must be {'>' if strict else '>='} {low:g}, got {value!r}")


def path_component_problem(value: str) -> str | None:
    """Why ``value`` cannot be one directory name under ``output_dir`` (None if it can).

    A run directory is created, overwritten and (for LLM runs) partly deleted, so its name must never reach
    outside ``output_dir``: one component, no separator of any platform, no ``.``/``..``, no drive.
    """
    if not value.strip():
        return "is empty"
    if "\0" in value:
        return "contains a NUL character"
    if "/" in value or "\\" in value or PureWindowsPath(value).drive:
        return "must be a single directory name, without / or \\"
    if value in (".", ".."):
        return f"cannot be {value!r}"
    return None


def dataset_label(dataset: str) -> str:
    """The dataset's part of a derived run name: its registry name, NAME for ``recbole:PATH/NAME``, or
    ``amazon2018-CATEGORY`` for ``amazon2018:PATH/CATEGORY`` (the readers' ``Dataset.name``).

    NAME is the last path component, as ``recadapt.data.readers.recbole.locate`` names the dataset's files.
    """
    if dataset.startswith(RECBOLE_PREFIX):
        return Path(dataset[len(RECBOLE_PREFIX) :]).name
    if dataset.startswith(AMAZON_PREFIX):
        return "amazon2018-" + Path(dataset[len(AMAZON_PREFIX) :]).name
    return dataset


@dataclass
class DataConfig:
    dataset: str = "ml-100k"
    protocol: str = "next-item"
    data_dir: str | None = None  # None: $RECADAPT_DATA, else ~/.cache/recadapt/data
    prepared_dir: str | None = None  # None: <cache>/prepared
    split_seed: int = 0  # seed of the persisted split and candidates (kept fixed across training seeds)
    # sampled-ranking only: negatives per target, drawn uniform or by training popularity
    n_negatives: int = 19
    negatives: str = "uniform"
    kcore: int = 0  # > 1: keep the k-core (users and items with >= k interactions, repeated) before splitting
    # next-item only: history items persisted per sample (LLaRA's 10). Prompts show train.max_len of them; a CRM
    # (and RecLoRA's or iLoRA's conditioning) can read more: the synthetic `long` variant needs it
    history_len: int = 10

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError("config", "data.protocol", f"must be one of {PROTOCOLS}, got {self.protocol!r}")
        _check_min("data.split_seed", self.split_seed, 0)  # numpy seeds are non-negative
        _check_min("data.n_negatives", self.n_negatives, 1)
        _check_min("data.kcore", self.kcore, 0)
        if self.negatives not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                "config", "data.negatives", f"must be one of {NEGATIVE_SAMPLERS}, got {self.negatives!r}"
            )
        _check_min("data.history_len", self.history_len, 3)  # next-item's min_history
        if self.history_len != _HISTORY_LEN and self.protocol != "next-item":
            raise ConfigError(
                "config",
                "data.history_len",
                f"only next-item persists a fixed history length, not {self.protocol}",
            )
        if self.protocol != "sampled-ranking":
            for name, default in _SAMPLED_DEFAULTS.items():
                if getattr(self, name) != default:
                    raise ConfigError(
                        "config", f"data.{name}", f"only sampled-ranking draws negatives, not {self.protocol}"
                    )

    def protocol_params(self) -> dict[str, int | str]:
        """The protocol parameters set away from their defaults (they name the prepared split's directory)."""
        params: dict[str, int | str] = {
            k: getattr(self, k) for k, v in _SAMPLED_DEFAULTS.items() if getattr(self, k) != v
        }
        if self.history_len != _HISTORY_LEN:
            params["history_len"] = self.history_len
        return params


NEGATIVE_SAMPLERS = ("uniform", "popularity")  # as recadapt.data.protocols.NEGATIVE_SAMPLERS
_SAMPLED_DEFAULTS = {"n_negatives": 19, "negatives": "uniform"}
_HISTORY_LEN = 10  # next-item's default, as recadapt.data.protocols.next_item's


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 50
    batch_size: int = 256
    eval_batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 10  # history items the model sees (the most recent ones)
    patience: int = 5  # epochs without validation improvement before stopping; 0 disables early stopping
    monitor: str = "auto"  # validation metric: auto = NDCG@10 (ranking) or AUC (ctr)
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    n_boot: int = 1000  # bootstrap resamples for confidence intervals
    max_steps_per_epoch: int = 0  # 0 = full epochs; a cap makes quick demo runs

    def __post_init__(self) -> None:
        """Reject values that would fail only later (a ZeroDivisionError, an empty range, a missing best
        model) or silently do nothing (lr 0); the monitor is checked by RunConfig, which knows the protocol."""
        for name in ("batch_size", "eval_batch_size", "max_len", "n_boot", "epochs"):
            _check_min(f"train.{name}", getattr(self, name), 1)
        for name in ("seed", "patience", "max_steps_per_epoch", "num_threads"):
            _check_min(f"train.{name}", getattr(self, name), 0)
        _check_min("train.lr", self.lr, 0, strict=True)
        _check_min("train.weight_decay", self.weight_decay, 0)


def _default_lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LLMConfig:
    """LLM methods (the llm and fullrank recipes of :mod:`recadapt.methods.registry`): backbone, LoRA,
    optimisation, budget and evaluation.

    LLM runs take ``train.seed``, ``train.max_len`` (history items in a prompt), ``train.n_boot`` and
    ``train.num_threads`` from the ``train`` section; everything else comes from here. Steps count optimizer
    steps; one step is ``batch_size`` x ``grad_accum`` samples, whatever the number of processes (each process
    takes a share of every micro-batch: :mod:`recadapt.train.distributed`).
    """

    backbone: str = "smollm2-135m"  # alias, local model directory, .gguf file or hub id (load_backbone)
    dtype: str | None = None  # weight dtype; None: fp32 on CPU, bf16 (fp16 without bf16) on CUDA
    # the frozen base weights: none = as dtype; 4bit = bitsandbytes NF4 with double quantization (QLoRA-style),
    # CUDA only, the extra recadapt[quant]; not for GGUF backbones (load_backbone)
    quantization: str = "none"
    precision: str = "auto"  # autocast bf16|fp16|no; auto: bf16 where the device runs it natively, else no
    domain: str = "auto"  # prompt templates (movie, artist, game, item); auto: from the dataset name
    item_tags: int = 0  # tags (LastFM) or genres (ml-100k) after each item name in prompts; 0: names only
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=_default_lora_targets)
    lr: float = 5e-4  # LoRA parameters
    projector_lr: float | None = None  # LLaRA's projector; None: lr
    # how CRM item embeddings become input embeddings (recadapt.llm.injection): mlp = LLaRA's two-layer MLP;
    # scaled = the same MLP on standardised embeddings, its outputs at the token embeddings' norm; vocab = a
    # softmax mixture of the LLM's own token embeddings
    projector: str = "mlp"
    # LLaRA's curriculum: linear = p(hybrid prompt) rises from 0 to 1 over training (the paper's);
    # hybrid = hybrid prompts from the first step
    curriculum: str = "linear"
    # the training loss (next-item): generative = cross-entropy on the target title's tokens (the papers');
    # listwise = a softmax over the candidates' mean log-likelihoods, the scores score mode ranks by, with the
    # target as the label; both = their sum, from one forward (the target's likelihood is among the candidates')
    objective: str = "generative"
    # hybrid prompts: the CRM placeholder after each title (LLaRA's "Title <|item|>") or before it
    item_placement: str = "after"
    # hybrid next-item prompts: one more placeholder before the history, filled with the CRM user vector that
    # conditions the adapter (recadapt's addition: RecLoRA's long-history user vector as a token, not only a gate)
    user_token: bool = False
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # linear warm-up over this share of the steps, then cosine decay to 0
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    epochs: int = 5
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4  # micro-batch, all processes together (each computes a share)
    grad_accum: int = 32  # micro-batches per optimizer step
    bucket_batches: int = 50  # length bucketing: sort by length within seeded chunks of this many batches
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 10  # optimizer steps between log rows
    train_samples: int = 0  # > 0: train on the first N samples of a fixed permutation (ctr: shot_rank < N)
    max_prompt_tokens: int = 1024  # prompt + answer; longer samples drop their oldest history items
    crm_run: str | None = None  # llara, ilora: a trained CRM run directory (item embeddings, user vectors)
    # the low-rank update: a kind of recadapt.adapters (lora, or a personalized one), built with lora_r,
    # lora_alpha, lora_dropout and lora_target_modules plus adapter_options (e.g. {n_experts: 4, gate: cnn})
    adapter: str = "lora"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    # recompute each decoder layer's activations in the backward pass: a fraction of the activation memory
    # (long prompts) for about a third more compute; the same losses and gradients. For the kinds that support it
    # (lora, bottleneck): the personalized ones get their per-instance mix from hooks that live only during the
    # forward call, so a recomputed layer would miss it
    gradient_checkpointing: bool = False
    # with several processes: shard the frozen backbone weights of each decoder layer across them (PyTorch FSDP2,
    # fully_shard with the trainable adapter weights left whole), so each process holds 1/N of the base model;
    # every forward is then collective, so evaluation rows are not split (docs/scaling.md)
    fsdp: bool = False
    # conditioning of a personalized adapter: crm = the CRM run's representation of the user's history (iLoRA's
    # sequence representation), crm-target = a target-aware CRM's (DIN's) representation of that history with
    # respect to the ctr target (RecLoRA's SIM is target-aware), random = a fixed random vector per user (the ablation)
    cond: str = "crm"
    cond_history_len: int = 0  # history items the CRM reads for cond; 0: the CRM run's train.max_len
    # cf-lora / moe-lora: start A and B from a trained lora run (its directory or its final/ folder), e.g. ReLLaX
    # from ReLLa; with adapter_options.freeze_ab (cf-lora) only the interaction network then trains
    init_lora_from: str | None = None
    # which train.max_len history items a prompt shows: the most recent, the retrieved ones (ReLLa's SUBR: the
    # items whose backbone text embeddings are most cosine-similar to the target's), both (ReLLa's ReiT: every
    # training sample appears twice per epoch, once in each view, doubling the data as the paper does) or mixed
    # (ReiT at the compute of one view: each sample draws one of the two views per epoch). Evaluation uses the
    # retrieved view unless recent. ctr only.
    history: str = "recent"
    retrieval_dim: int = 512  # PCA dimension of SUBR's item embeddings (the hidden size if smaller)
    # ranking modes for next-item evaluation (generate, constrained, score); the first gives metrics.json "test"
    eval_modes: list[str] = field(default_factory=lambda: ["generate"])
    eval_samples: int = 0  # > 0: evaluate on a fixed random subset of the test part
    eval_batch_size: int = 8
    max_new_tokens: int = 64  # generate mode
    # model selection: every valid_every optimizer steps (0: never) rank valid_samples validation rows (0: all)
    # in score mode (ctr: p(Yes)) and keep the adapter with the best MRR (ctr: AUC) in RUN_DIR/best; the final
    # adapter is then the best one, and the test part scores it. patience > 0 stops after that many validations
    # without improvement
    valid_every: int = 0
    valid_samples: int = 256
    patience: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.eval_modes, str):
            self.eval_modes = [self.eval_modes]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        for name in ("lora_target_modules", "eval_modes"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    "config", f"llm.{name}", f"expected a non-empty list of strings, got {value!r}"
                )
        unknown = [m for m in self.eval_modes if m not in RANKING_MODES]
        if unknown or len(set(self.eval_modes)) != len(self.eval_modes):
            raise ConfigError(
                "config",
                "llm.eval_modes",
                f"expected distinct modes among {RANKING_MODES}, got {self.eval_modes}",
            )
        if not isinstance(self.adapter_options, dict):
            raise ConfigError(
                "config", "llm.adapter_options", f"expected a mapping, got {self.adapter_options!r}"
            )
        if self.cond not in COND_SOURCES:
            raise ConfigError("config", "llm.cond", f"must be one of {COND_SOURCES}, got {self.cond!r}")
        if self.history not in HISTORY_VIEWS:
            raise ConfigError(
                "config", "llm.history", f"must be one of {HISTORY_VIEWS}, got {self.history!r}"
            )
        if self.projector not in PROJECTORS:
            raise ConfigError(
                "config", "llm.projector", f"must be one of {PROJECTORS}, got {self.projector!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                "config", "llm.objective", f"must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        if self.item_placement not in ITEM_PLACEMENTS:
            raise ConfigError(
                "config",
                "llm.item_placement",
                f"must be one of {ITEM_PLACEMENTS}, got {self.item_placement!r}",
            )
        if self.curriculum not in CURRICULA:
            raise ConfigError(
                "config", "llm.curriculum", f"must be one of {CURRICULA}, got {self.curriculum!r}"
            )
        if self.item_tags < 0:
            raise ConfigError("config", "llm.item_tags", f"must be >= 0, got {self.item_tags}")
        if self.retrieval_dim < 1:
            raise ConfigError("config", "llm.retrieval_dim", f"must be >= 1, got {self.retrieval_dim}")
        if self.cond_history_len < 0:
            raise ConfigError("config", "llm.cond_history_len", f"must be >= 0, got {self.cond_history_len}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "config", "llm.precision", f"must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                "config", "llm.quantization", f"must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        positive = ("lora_r", "batch_size", "grad_accum", "bucket_batches", "checkpoint_every", "log_every")
        for name in (*positive, "eval_batch_size", "max_new_tokens", "max_prompt_tokens"):
            _check_min(f"llm.{name}", getattr(self, name), 1)
        for name in ("epochs", "max_steps", "train_samples", "eval_samples", "max_grad_norm", "weight_decay",
                     "valid_every", "valid_samples", "patience"):  # fmt: skip
            _check_min(f"llm.{name}", getattr(self, name), 0)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("config", "llm.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("config", "llm.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _check_min("llm.lr", self.lr, 0, strict=True)
        if self.projector_lr is not None:
            _check_min("llm.projector_lr", self.projector_lr, 0, strict=True)


@dataclass
class RunConfig:
    name: str = ""  # run directory name under output_dir; empty: <model>-<dataset>-<protocol>-s<seed>
    output_dir: str = "runs"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "sasrec"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    llm: LLMConfig | None = None  # LLM methods only
    # where load_config found each field, for error messages (see origin); a field, so dataclasses.replace
    # keeps it, but never written, compared or read from a file
    _origins: _Origins | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check what needs more than one section: the run directory's name and the monitor's protocol."""
        if self.name:
            problem = path_component_problem(self.name)
            if problem:
                raise ConfigError("config", "name", f"{problem} (the run directory under output_dir)")
        else:  # the derived name <model>-<dataset>-<protocol>-s<seed>: each free-form part must be safe
            parts = {
                "model.name": str(self.model.get("name", "")),
                "data.dataset": dataset_label(self.data.dataset),
            }
            for dotted, part in parts.items():
                problem = path_component_problem(part)
                if problem:
                    raise ConfigError(
                        "config",
                        dotted,
                        f"{part!r} {problem}, so it cannot name the run directory; set name=",
                    )
        monitor, protocol = self.train.monitor, self.data.protocol
        if monitor != "auto" and monitor not in MONITOR_METRICS[protocol]:
            raise ConfigError(
                "config",
                "train.monitor",
                f"must be auto or a {protocol} validation metric: {', '.join(MONITOR_METRICS[protocol])}; "
                f"got {monitor!r}",
            )

    @property
    def model_name(self) -> str:
        return str(self.model["name"])

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        dataset = dataset_label(self.data.dataset)
        return f"{self.model_name}-{dataset}-{self.data.protocol}-s{self.train.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.llm is None:
            del out["llm"]  # CRM configs stay as they were
        del out["_origins"]
        return out

    def origin(self, dotted: str) -> str:
        """Where field ``dotted`` was set, as a ConfigError source: ``FILE:LINE`` (the line of the field, else of
        its nearest enclosing key in the file), ``<command line>``, or the file / ``<defaults>``.

        Recorded by :func:`load_config` (a config built otherwise says ``config``), for checks made after
        loading, such as the model section's (:func:`model_options`).
        """
        return self._origins.of(dotted) if self._origins is not None else "config"

    def error(self, dotted: str, message: str) -> ConfigError:
        """A ConfigError about field ``dotted`` that names where it was set (see :meth:`origin`)."""
        return ConfigError(self.origin(dotted), dotted, message)


@dataclass(frozen=True)
class _Origins:
    """The file and line of each dotted key of a config file, and the keys the command line set."""

    source: str
    lines: dict[str, int]
    overridden: frozenset[str]

    def of(self, dotted: str) -> str:
        """``FILE:LINE``, ``<command line>`` or the file, for ``dotted`` or else its nearest enclosing key."""
        parts = dotted.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        if any(p in self.overridden for p in prefixes):
            return "<command line>"
        line = next((self.lines[p] for p in prefixes if p in self.lines), None)
        return f"{self.source}:{line}" if line else self.source
