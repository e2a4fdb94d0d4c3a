"""Typed run configuration: one YAML file plus ``key=value`` overrides.

A run config has typed sections (``data``, ``train`` and, for LLM methods, ``llm``; :mod:`recadapt.train.sections`),
each a dataclass, and a free-form ``model`` mapping that the model's own config class validates. Unknown keys are
errors that name the file and the dotted field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from recadapt.errors import ConfigError
from recadapt.io import write_text_atomic
from recadapt.methods.registry import method
from recadapt.train.sections import *  # noqa: F403  (the sections, re-exported: one import for a run config)
from recadapt.train.sections import (
    LLMConfig,
    RunConfig,
    _Origins,
)


def coerce(value: Any, annotation: Any, source: str, dotted: str, text: str | None = None) -> Any:
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
        return coerce(value, options[0], source, dotted, text)
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
    """Build dataclass ``cls`` from a raw mapping; ``texts``: the written text of scalars (see :func:`coerce`)."""
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
            kwargs[name] = coerce(value, annotation, source, dotted, texts.get(dotted))
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
    if config.llm is not None and method(config.model_name).recipe == "crm":
        raise config.error(
            "llm",
            f"applies to the LLM methods only, not to the conventional recommender {config.model_name!r}",
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
            kwargs[key] = coerce(value, hints[key], "config", dotted)
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
            # the split's own parameters (sampled negatives, next-item history length) only when set, so the
            # digests of runs made before they were recorded stay the same
            "data": [
                data.dataset,
                data.protocol,
                data.split_seed,
                *([data.protocol_params()] * bool(data.protocol_params())),
            ],
            "train": [config.train.seed, config.train.max_len],
            "llm": llm_fields,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return (digest(changed), digest(values), *(digest(older) for older in olders))
