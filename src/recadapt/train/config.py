"""Typed run configuration: one YAML file plus ``key=value`` overrides.

A run config has typed sections (``data``, ``train`` and, for LLM methods, ``llm``), each a dataclass, and a
free-form ``model`` mapping that the model's own config class validates. Unknown keys are errors that name the file
and the dotted field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from recadapt.errors import ConfigError
from recadapt.io import write_text_atomic

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
RECBOLE_PREFIX = "recbole:"  # as recadapt.data.registry (not imported: it loads the readers)
_RANKING_MONITORS = ("HR@{k}", "NDCG@{k}")
# validation metrics train.monitor may name, per protocol: the keys of recadapt.tasks.evaluate.report_from_scores
# (not imported: it needs torch) that early stopping can maximise. LogLoss (lower is better) and ValidRatio
# (always 1 for a CRM) are reported too, but keeping the epoch with the highest of them would be wrong or arbitrary.
MONITOR_METRICS: dict[str, tuple[str, ...]] = {
    "next-item": (*(m.format(k=k) for k in (1, 5, 10) for m in _RANKING_MONITORS), "MRR"),
    "full-ranking": (*(m.format(k=k) for k in (1, 5, 10, 20, 50) for m in _RANKING_MONITORS), "MRR"),
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
    """The dataset's part of a derived run name: its registry name, or NAME for ``recbole:PATH/NAME``.

    NAME is the last path component, as ``recadapt.data.readers.recbole.locate`` names the dataset's files.
    """
    if dataset.startswith(RECBOLE_PREFIX):
        return Path(dataset[len(RECBOLE_PREFIX) :]).name
    return dataset


@dataclass
class DataConfig:
    dataset: str = "ml-100k"
    protocol: str = "next-item"
    data_dir: str | None = None  # None: $RECADAPT_DATA, else ~/.cache/recadapt/data
    prepared_dir: str | None = None  # None: <cache>/prepared
    split_seed: int = 0  # seed of the persisted split and candidates (kept fixed across training seeds)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError("config", "data.protocol", f"must be one of {PROTOCOLS}, got {self.protocol!r}")
        _check_min("data.split_seed", self.split_seed, 0)  # numpy seeds are non-negative


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
            _check_min(f"llm.{name}", getattr(self, name), 1)
        for name in ("epochs", "max_steps", "train_samples", "eval_samples", "max_grad_norm", "weight_decay"):
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


def _coerce(value: Any, annotation: Any, source: str, dotted: str, text: str | None = None) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise ConfigError.

    ``text`` is the scalar as written, before YAML typed it. A string field takes it whenever YAML read something
    else: YAML 1.1 reads ``no``, ``off``, ``~`` and ``007`` as false, null and 7, so ``llm.precision=no`` would
    otherwise arrive as ``False`` (and become "False").
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, options[0], source, dotted, text)
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
        if not isinstance(value, str) and text is not None:
            return text
        return str(value)
    return value


def _read_yaml(text: str, source: str) -> tuple[Any, dict[str, int], dict[str, str]]:
    """Parse a YAML config: its data, the 1-based line of each dotted key and the written text of each scalar.

    One pass over the node tree also rejects duplicate keys, naming both lines: ``yaml.safe_load`` silently keeps
    the last one, so a value a user believes is set could be ignored.
    """
    lines: dict[str, int] = {}
    texts: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already walked
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                dotted, line = prefix + str(key.value), key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and dotted in first:
                    raise ConfigError(
                        f"{source}:{line}", dotted, f"duplicate key (first at line {first[dotted]})"
                    )
                first[dotted] = lines[dotted] = line
                if isinstance(value, yaml.ScalarNode):
                    texts[dotted] = value.value
                walk(value, dotted + ".", seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.", seen)

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, lines, texts
        walk(root, "", set())
        return loader.construct_document(root), lines, texts
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        raise ConfigError(source, None, f"invalid YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()


def _optional_section(annotation: Any) -> Any:
    """``Section | None`` -> ``Section`` for an optional dataclass section; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return annotation


def _build(
    cls: type, raw: dict[str, Any], source: str, prefix: str = "", texts: dict[str, str] | None = None
) -> Any:
    """Build dataclass ``cls`` from a raw mapping; ``texts``: the written text of scalars (see :func:`_coerce`)."""
    texts = texts or {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
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
            kwargs[name] = _build(annotation, value, source, dotted + ".", texts)
        elif name == "model":
            if not isinstance(value, dict) or "name" not in value:
                raise ConfigError(source, dotted, "expected a mapping with a 'name'")
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, annotation, source, dotted, texts.get(dotted))
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
    """Read a YAML run config (``None``: defaults only), apply overrides, validate types and names.

    Every ConfigError names where the offending field was set: ``FILE:LINE`` or ``<command line>``.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    lines: dict[str, int] = {}
    texts: dict[str, str] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, None, f"cannot read: {exc.strerror}") from None
        raw, lines, texts = _read_yaml(text, source)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(source, None, "the top level must be a mapping")
    raw.setdefault("model", {"name": RunConfig().model_name})
    overridden = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
    if overrides:
        raw = apply_overrides(raw, overrides)
        for item in overrides:
            key, value = item.split("=", 1)
            texts = {k: v for k, v in texts.items() if not (k + ".").startswith(key.strip() + ".")}
            texts[key.strip()] = value.strip()
    origins = _Origins(source, lines, frozenset(overridden))
    try:
        config = _build(RunConfig, raw, source, texts=texts)
    except ConfigError as exc:
        raise ConfigError(origins.of(exc.field) if exc.field else source, exc.field, exc.message) from None
    config._origins = origins
    if config.llm is not None and config.model_name not in LLM_METHODS + EMBEDDING_METHODS:
        raise config.error(
            "llm",
            f"applies to the LLM methods {LLM_METHODS + EMBEDDING_METHODS} only, not model {config.model_name!r}",
        )
    return config


def model_options(config: RunConfig, config_class: type) -> dict[str, Any]:
    """The ``model`` section without its name, coerced to ``config_class``'s field types and validated by it.

    For the CRM trainers, which know the model's config class (config.py does not import the models): errors
    are ConfigErrors naming the field and where it was set. A config class's own checks raise ValueErrors that
    begin with the field's name (``n_layers must be >= 1``, ``SASRecConfig.n_layers must be int``); that name
    picks the field, else the error is about ``model``.
    """
    name = config.model_name
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    for key, value in config.model.items():
        if key == "name":
            continue
        dotted = f"model.{key}"
        if key not in known:
            raise config.error(dotted, f"unknown field for {name} (known: {', '.join(sorted(known))})")
        try:
            kwargs[key] = _coerce(value, hints[key], "config", dotted)
        except ConfigError as exc:
            raise config.error(dotted, exc.message) from None
    try:
        config_class(**kwargs)
    except ValueError as exc:
        match = re.match(r"(?:\w+\.)?(\w+)", str(exc))
        key = match.group(1) if match and match.group(1) in known else None
        raise config.error(f"model.{key}" if key else "model", str(exc)) from None
    return kwargs


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


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
