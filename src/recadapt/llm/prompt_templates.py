"""Prompt templates, kept as data and checked on load.

Templates are data, not code: one YAML file per domain (``movie``, ``artist``, ``game``, generic ``item``) in
``recadapt/llm/templates/``, so wording can change without touching code. Each holds LLaRA's three next-item
templates and a ReLLa-style CTR template. Loading checks every field a template uses, so a malformed file fails
here with its name and key rather than at the first training step; :mod:`recadapt.llm.prompts` fills them in.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from recadapt.errors import ConfigError

DEFAULT_DOMAIN = "item"

_TEMPLATE_PACKAGE = "recadapt.llm"
_TEMPLATE_FOLDER = "templates"
_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class NextItemTemplates:
    """LLaRA-style next-item prompts: ``templates`` use ``{history}``, ``{candidates}`` and ``{n_candidates}``."""

    templates: tuple[str, ...]
    separator: str


@dataclass(frozen=True)
class CtrTemplates:
    """ReLLa-style CTR prompt pieces; see the comments in the template files for what each field holds."""

    prompt: str
    history_rated: str
    history_unrated: str
    history_empty: str
    item_rated: str
    item_unrated: str
    separator: str
    profile: Mapping[str, str]
    profile_values: Mapping[str, Mapping[str, str]]
    answer_yes: str
    answer_no: str


@dataclass(frozen=True)
class DomainTemplates:
    """All templates of one domain, and the file they came from (for error messages)."""

    domain: str
    source: str
    next_item: NextItemTemplates
    ctr: CtrTemplates
    # how an item is written when its tags are shown (``llm.item_tags`` > 0); optional keys of the file
    item_described: str = "{title} ({tags})"
    tag_separator: str = ", "


# For every template string: (required fields, allowed fields). Plain strings (separators, answers) are not listed.
_NEXT_ITEM_FIELDS = ({"history", "candidates"}, {"history", "candidates", "n_candidates"})
_CTR_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "prompt": ({"history", "target"}, {"profile", "history", "target"}),
    "history_rated": ({"items"}, {"items"}),
    "history_unrated": ({"items"}, {"items"}),
    "history_empty": (set(), set()),
    "item_rated": ({"title", "rating"}, {"index", "title", "rating"}),
    "item_unrated": ({"title"}, {"index", "title"}),
}
_PROFILE_FIELDS = ({"value"}, {"value"})
_DESCRIBED_FIELDS = ({"title", "tags"}, {"title", "tags"})
_CTR_PLAIN = ("separator", "answer_yes", "answer_no")


def available_domains(directory: str | Path | None = None) -> list[str]:
    """Domains with a template file in ``directory`` (default: the templates shipped with recadapt)."""
    folder = _template_folder(directory)
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_templates(domain: str | DomainTemplates, directory: str | Path | None = None) -> DomainTemplates:
    """The templates of ``domain`` (``movie``, ``artist``, ``game``, ``item``), from ``directory`` when given,
    else from the package. A ``DomainTemplates`` passes through, so builders accept either.

    Raises ``ConfigError`` naming the file and the key when a file is malformed, and ``ValueError`` listing the
    known domains when there is no file for ``domain``.
    """
    if isinstance(domain, DomainTemplates):
        return domain
    if directory is None:
        return _load_packaged(domain)
    return _load_file(_template_folder(directory), domain)


@cache
def _load_packaged(domain: str) -> DomainTemplates:
    return _load_file(_template_folder(None), domain)


def _template_folder(directory: str | Path | None) -> Any:
    """A ``Traversable`` folder: package data is read through importlib.resources so zipped installs work."""
    if directory is not None:
        return Path(directory)
    return resources.files(_TEMPLATE_PACKAGE).joinpath(_TEMPLATE_FOLDER)


def _load_file(folder: Any, domain: str) -> DomainTemplates:
    entry = folder.joinpath(f"{domain}.yaml")
    if not entry.is_file():
        known = ", ".join(available_domains(folder if isinstance(folder, Path) else None))
        raise ValueError(f"no prompt templates for domain {domain!r} in {folder}; known domains: {known}")
    source = str(entry)
    try:
        data = yaml.safe_load(entry.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(source, None, f"invalid YAML: {err}") from err
    return parse_templates(data, source=source, domain=domain)


def parse_templates(data: Any, *, source: str, domain: str) -> DomainTemplates:
    """Check the parsed YAML of one template file and build :class:`DomainTemplates`.

    Every template string must use its required fields and no others, so a typo such as ``{histroy}`` fails
    here, naming ``source`` and the key, instead of at the first training step.
    """
    root = _mapping(data, source, None, {"next_item", "ctr"}, optional={"item_described", "tag_separator"})
    next_raw = _mapping(root["next_item"], source, "next_item", {"templates", "separator"})
    raw_templates = next_raw["templates"]
    if not isinstance(raw_templates, list) or not raw_templates:
        raise ConfigError(source, "next_item.templates", "must be a non-empty list of strings")
    templates = tuple(
        _template(text, source, f"next_item.templates[{i}]", *_NEXT_ITEM_FIELDS)
        for i, text in enumerate(raw_templates)
    )
    next_item = NextItemTemplates(
        templates=templates, separator=_plain(next_raw["separator"], source, "next_item.separator")
    )

    ctr_raw = _mapping(root["ctr"], source, "ctr", {*_CTR_FIELDS, *_CTR_PLAIN, "profile", "profile_values"})
    texts = {
        key: _template(ctr_raw[key], source, f"ctr.{key}", *fields) for key, fields in _CTR_FIELDS.items()
    }
    plain = {key: _plain(ctr_raw[key], source, f"ctr.{key}") for key in _CTR_PLAIN}
    for key in ("answer_yes", "answer_no"):
        if not plain[key].strip():
            raise ConfigError(source, f"ctr.{key}", "must not be empty")
    profile_raw = _mapping(ctr_raw["profile"], source, "ctr.profile", None)
    profile = {
        str(attr): _template(text, source, f"ctr.profile.{attr}", *_PROFILE_FIELDS)
        for attr, text in profile_raw.items()
    }
    values_raw = _mapping(ctr_raw["profile_values"], source, "ctr.profile_values", None)
    profile_values: dict[str, dict[str, str]] = {}
    for attr, mapping in values_raw.items():
        key = f"ctr.profile_values.{attr}"
        if attr not in profile:
            raise ConfigError(source, key, f"names an attribute missing from ctr.profile ({sorted(profile)})")
        names = _mapping(mapping, source, key, None)
        profile_values[str(attr)] = {str(k): _plain(v, source, f"{key}.{k}") for k, v in names.items()}
    ctr = CtrTemplates(
        **texts,
        **plain,
        profile=MappingProxyType(profile),  # read-only: loaded templates are cached and shared
        profile_values=MappingProxyType({k: MappingProxyType(v) for k, v in profile_values.items()}),
    )
    described = {}
    if "item_described" in root:
        described["item_described"] = _template(
            root["item_described"], source, "item_described", *_DESCRIBED_FIELDS
        )
    if "tag_separator" in root:
        described["tag_separator"] = _plain(root["tag_separator"], source, "tag_separator")
    return DomainTemplates(domain=domain, source=source, next_item=next_item, ctr=ctr, **described)


def _mapping(
    value: Any, source: str, key: str | None, required: set[str] | None, optional: set[str] | None = None
) -> dict[Any, Any]:
    """``value`` as a dict; with ``required``, exactly those keys plus any of ``optional`` (unknown keys are
    typos, so they fail too)."""
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"must be a mapping, got {type(value).__name__}")
    if required is not None:
        known = required | (optional or set())
        prefix = f"{key}." if key else ""
        missing = sorted(required - set(value))
        unknown = sorted(str(k) for k in set(value) - known)
        if missing:
            also = f" (unknown keys here: {', '.join(unknown)})" if unknown else ""
            raise ConfigError(source, prefix + missing[0], "is missing" + also)
        if unknown:
            raise ConfigError(source, prefix + unknown[0], f"is not a known key; known: {sorted(known)}")
    return value


def _plain(value: Any, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, got {type(value).__name__}")
    return value


def _template(value: Any, source: str, key: str, required: set[str], allowed: set[str]) -> str:
    """A format string using every ``required`` field, only ``allowed`` fields, without specs or conversions."""
    text = _plain(value, source, key)
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as err:
        raise ConfigError(
            source, key, f"is not a valid template ({err}); write a literal brace as {{{{ or }}}}"
        ) from err
    used: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed:
            raise ConfigError(source, key, f"uses unknown field {{{name}}}; allowed: {sorted(allowed)}")
        if spec or conversion:
            raise ConfigError(source, key, f"field {{{name}}} must not have a format spec or conversion")
        used.add(name)
    missing = sorted(required - used)
    if missing:
        raise ConfigError(source, key, f"lacks the required field {{{missing[0]}}}")
    return text
