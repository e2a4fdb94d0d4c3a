"""Typed run configuration: one YAML file plus ``key=value`` overrides.

A run config has typed sections (``data``, ``train`` and, for LLM methods, ``llm``), each a dataclass, and a
free-form ``model`` mapping that the model's own config class validates. Unknown keys are errors that name the file
and the dotted field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recadapt.errors import ConfigError

PROTOCOLS = ("next-item", "ctr", "full-ranking")
# model.name values trained by recadapt.train.llm
LLM_METHODS = ("zero-shot", "tallrec", "llara", "ilora", "reclora", "rella", "rellax")
# full-ranking LLM recommenders with an embedding head (recadapt.train.fullrank); they read part of the llm section
EMBEDDING_METHODS = ("laser", "darec")
# prompts carry projected CRM item embeddings (LLaRA's hybrid items, with its curriculum; ReLLaX's soft prompts)
HYBRID_METHODS = ("llara", "ilora", "rellax")
HISTORY_VIEWS = ("recent", "retrieved", "mixed", "both")
# recadapt.adapters.ADAPTERS' kinds (not imported: it needs torch); "lora" trains through PEFT
ADAPTER_KINDS = ("lora", "moe-lora", "personal-lora", "cf-lora", "bottleneck")
COND_SOURCES = ("crm", "random")
RANKING_MODES = ("generate", "constrained", "score")  # as recadapt.llm.ranking (not imported: it needs torch)
PRECISIONS = ("auto", "bf16", "fp16", "no")


@dataclass
class DataConfig:
    dataset: str = "ml-100k"
    protocol: str = "next-item"
    data_dir: str | None = None  # None: $RECADAPT_DATA, else ~/.cache/recadapt/data
    prepared_dir: str | None = None  # None: <cache>/prepared
    split_seed: int = 0  # seed of the persisted split and candidates (kept fixed across training seeds)


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


def _default_lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LLMConfig:
    """LLM methods (``model.name`` in :data:`LLM_METHODS`): backbone, LoRA, optimisation, budget and evaluation.

    LLM runs take ``train.seed``, ``train.max_len`` (history items in a prompt), ``train.n_boot`` and
    ``train.num_threads`` from the ``train`` section; everything else comes from here. Steps count optimizer
    steps; one step is ``batch_size`` x ``grad_accum`` x processes samples.
    """

    backbone: str = "smollm2-135m"  # alias, local model directory, .gguf file or hub id (load_backbone)
    dtype: str | None = None  # weight dtype; None: fp32 on CPU, bf16 (fp16 without bf16) on CUDA
    precision: str = "auto"  # autocast bf16|fp16|no; auto: bf16 where the device runs it natively, else no
    domain: str = "auto"  # prompt templates (movie, artist, game, item); auto: from the dataset name
    item_tags: int = 0  # tags (LastFM) or genres (ml-100k) after each item name in prompts; 0: names only
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=_default_lora_targets)
    lr: float = 5e-4  # LoRA parameters
    projector_lr: float | None = None  # LLaRA's projector; None: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # linear warm-up over this share of the steps, then cosine decay to 0
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    epochs: int = 5
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4  # micro-batch per process
    grad_accum: int = 32  # micro-batches per optimizer step
    bucket_batches: int = 50  # length bucketing: sort by length within seeded chunks of this many batches
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 10  # optimizer steps between log rows
    train_samples: int = 0  # > 0: train on the first N samples of a fixed permutation (ctr: shot_rank < N)
    max_prompt_tokens: int = 1024  # prompt + answer; longer samples drop their oldest history items
    crm_run: str | None = None  # llara, ilora: a trained CRM run directory (item embeddings, user vectors)
    # the low-rank update: lora (PEFT) or a personalized kind of recadapt.adapters, built with lora_r,
    # lora_alpha, lora_dropout and lora_target_modules plus adapter_options (e.g. {n_experts: 4, gate: cnn})
    adapter: str = "lora"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    # recompute each decoder layer's activations in the backward pass: a fraction of the activation memory
    # (long prompts) for about a third more compute; the same losses and gradients. PEFT's lora only: the
    # personalized kinds get their per-instance mix from hooks that live only during the forward call
    gradient_checkpointing: bool = False
    # conditioning of a personalized adapter: crm = the CRM run's representation of the user's history (iLoRA's
    # sequence representation), random = a fixed random vector per user (the ablation)
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
        if self.adapter not in ADAPTER_KINDS:
            raise ConfigError(
                "config", "llm.adapter", f"must be one of {ADAPTER_KINDS}, got {self.adapter!r}"
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
        if self.gradient_checkpointing and self.adapter != "lora":
            raise ConfigError(
                "config",
                "llm.gradient_checkpointing",
                f"works with llm.adapter=lora only, not {self.adapter!r} (its per-instance mix is not there when "
                "the backward pass recomputes a layer)",
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
        positive = ("lora_r", "batch_size", "grad_accum", "bucket_batches", "checkpoint_every", "log_every")
        for name in (*positive, "eval_batch_size", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError("config", f"llm.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "train_samples", "eval_samples", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError("config", f"llm.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("config", "llm.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("config", "llm.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lr <= 0 or (self.projector_lr is not None and self.projector_lr <= 0):
            raise ConfigError("config", "llm.lr", "learning rates must be > 0")


@dataclass
class RunConfig:
    name: str = ""  # run directory name under output_dir; empty: <model>-<dataset>-<protocol>-s<seed>
    output_dir: str = "runs"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "sasrec"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    llm: LLMConfig | None = None  # LLM methods only

    @property
    def model_name(self) -> str:
        return str(self.model["name"])

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        dataset = self.data.dataset.replace("recbole:", "").replace("/", "_")
        return f"{self.model_name}-{dataset}-{self.data.protocol}-s{self.train.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.llm is None:
            del out["llm"]  # CRM configs stay as they were
        return out


def _coerce(value: Any, annotation: Any, source: str, dotted: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, options[0], source, dotted)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(source, dotted, f"expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(source, dotted, f"expected a number, got {value!r}")
        try:
            number = (
                float(value)
                if annotation is float
                else int(str(value), 0)
                if isinstance(value, str)
                else value
            )
        except (TypeError, ValueError):
            raise ConfigError(source, dotted, f"expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and not isinstance(number, int):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(source, dotted, f"expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(source, dotted, f"expected a string, got {value!r}")
        return str(value)
    return value


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = prefix + str(key.value)
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _optional_section(annotation: Any) -> Any:
    """``Section | None`` -> ``Section`` for an optional dataclass section; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return annotation


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(source, prefix + unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        annotation = _optional_section(hints[name])
        dotted = prefix + name
        if dataclasses.is_dataclass(annotation) and value is None and annotation is not hints[name]:
            kwargs[name] = None  # an optional section written as null
        elif dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, "expected a mapping")
            kwargs[name] = _build(annotation, value, source, dotted + ".")
        elif name == "model":
            if not isinstance(value, dict) or "name" not in value:
                raise ConfigError(source, dotted, "expected a mapping with a 'name'")
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, annotation, source, dotted)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``true``, ``[1, 2]``); numbers are coerced by the field type."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a raw config mapping (returns a new mapping)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("<command line>", item, "overrides look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("<command line>", key, f"'{part}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (``None``: defaults only), apply overrides, validate types and names."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, None, f"cannot read: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "unknown line"
            raise ConfigError(
                source, None, f"invalid YAML at {where}: {getattr(exc, 'problem', exc)}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(source, None, "the top level must be a mapping")
        lines = _key_lines(text)
    else:
        lines = {}
    raw.setdefault("model", {"name": RunConfig().model_name})
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        config = _build(RunConfig, raw, source)
    except ConfigError as exc:
        overridden = {o.split("=", 1)[0].strip() for o in overrides or []}
        if exc.field in overridden:
            raise ConfigError("<command line>", exc.field, exc.message) from None
        line = lines.get(exc.field or "")
        raise ConfigError(f"{source}:{line}" if line else source, exc.field, exc.message) from None
    if config.data.protocol not in PROTOCOLS:
        raise ConfigError(
            source, "data.protocol", f"must be one of {PROTOCOLS}, got {config.data.protocol!r}"
        )
    if config.llm is not None and config.model_name not in LLM_METHODS + EMBEDDING_METHODS:
        raise ConfigError(
            source,
            "llm",
            f"applies to the LLM methods {LLM_METHODS + EMBEDDING_METHODS} only, not model {config.model_name!r}",
        )
    return config


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


# llm fields added after the first checkpoints were written, oldest addition first; a checkpoint written under the
# old every-field rule before an addition left that addition's fields, and every later one's, out
LLM_FIELD_ADDITIONS: tuple[tuple[str, ...], ...] = (("history", "retrieval_dim"), ("init_lora_from",))


def run_fingerprints(config: RunConfig, llm: LLMConfig, *, ignore: tuple[str, ...]) -> tuple[str, ...]:
    """Hashes of everything that shapes an LLM run's training, so a checkpoint is never resumed under another config.

    The first is the current rule: only ``llm`` fields away from their defaults enter it, so adding a field
    (with a default that keeps the old behaviour) leaves existing runs resumable. The others are the older
    every-field rule, as it stood now and before each of ``LLM_FIELD_ADDITIONS`` (newest first), so checkpoints
    written under it are still accepted. ``ignore`` names the evaluation-only fields, which never enter.
    """
    import hashlib
    import json

    defaults = dataclasses.asdict(LLMConfig())
    values = {k: v for k, v in dataclasses.asdict(llm).items() if k not in ignore}
    changed = {k: v for k, v in values.items() if v != defaults.get(k)}
    olders = []
    for cut in range(len(LLM_FIELD_ADDITIONS) - 1, -1, -1):
        added = {name for fields in LLM_FIELD_ADDITIONS[cut:] for name in fields}
        olders.append({k: v for k, v in values.items() if k not in added or k in changed})

    def digest(llm_fields: dict[str, Any]) -> str:
        data = config.data
        payload = {
            "model": config.model,
            "data": [data.dataset, data.protocol, data.split_seed],
            "train": [config.train.seed, config.train.max_len],
            "llm": llm_fields,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return (digest(changed), digest(values), *(digest(older) for older in olders))
