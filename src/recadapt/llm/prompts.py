"""Prompt texts for next-item and CTR recommendation, and their tokenization for a causal LM.

Templates are data, not code: one YAML file per domain (``movie``, ``artist``, ``game``, generic ``item``) in
``recadapt/llm/templates/``, so wording can change without touching code. Each holds LLaRA's three next-item
templates and a ReLLa-style CTR template.

Items appear in two forms (LLaRA):

- text-only: ``Title`` (TALLRec, and the text branch of LLaRA's curriculum);
- hybrid: ``Title <|item|>``, where the input embedding at the single special token :data:`ITEM_TOKEN` is later
  replaced by ``Projector(CRM item embedding)`` (:mod:`recadapt.llm.injection`).

Text-only prompts carry no placeholder at all. LLaRA's code keeps a frozen ``[PH]`` token there, whose embedding
is an untrained row the model must learn to ignore; the paper and TALLRec describe the text form as the title
alone, and omitting it keeps text-only prompts identical to TALLRec's, so the two methods differ only in the items.

One added special token (not a word pieced together from sub-words) makes placeholder positions exact:
``input_ids == item_token_id``. :class:`ItemTokenizer` tokenizes (prompt, answer) pairs with the backbone's chat
template when it has one and labels only the answer tokens.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from torch import Tensor

from recadapt.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ITEM_TOKEN = "<|item|>"
IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers' LM loss) skips
EVAL_TEMPLATE_INDEX = 0  # LLaRA evaluates with the first template of a domain
DEFAULT_DOMAIN = "item"

_TEMPLATE_PACKAGE = "recadapt.llm"
_TEMPLATE_FOLDER = "templates"
_FORMATTER = string.Formatter()

PaddingSide = Literal["left", "right"]


# --- templates ----------------------------------------------------------------------------------------------------


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


# --- building prompt texts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt text and, in order of appearance, the item id behind each :data:`ITEM_TOKEN` in it."""

    text: str
    item_ids: tuple[int, ...] = ()


# A rendered piece of a prompt: its text and the ids of the placeholders inside it, in order.
_Piece = tuple[str, tuple[int, ...]]


def pick_template_index(n_templates: int, *, seed: int, sample_index: int, epoch: int = 0) -> int:
    """A template index drawn from (seed, epoch, sample): the same sample gets the same template in every run and
    in any data-loader worker, and a fresh draw each epoch (LLaRA draws one per batch, unseeded)."""
    if n_templates < 1:
        raise ValueError(f"n_templates must be >= 1, got {n_templates}")
    rng = np.random.default_rng([seed, epoch, sample_index])
    return int(rng.integers(n_templates))


def describe_item(title: str, tags: Sequence[str], domain: str | DomainTemplates) -> str:
    """``title`` with its ``tags`` as the domain writes them (default ``Title (tag, tag)``); the bare title when
    there are none. Prompts show described items; answers and ranked candidates stay bare titles."""
    if not tags:
        return title
    templates = load_templates(domain)
    return templates.item_described.format(title=title, tags=templates.tag_separator.join(tags))


def build_next_item_prompt(
    history_titles: Sequence[str],
    candidate_titles: Sequence[str],
    domain: str | DomainTemplates,
    template_index: int = EVAL_TEMPLATE_INDEX,
    hybrid: bool = False,
    *,
    history_ids: Sequence[int] | None = None,
    candidate_ids: Sequence[int] | None = None,
) -> Prompt:
    """LLaRA's next-item prompt: history (oldest first) and candidates, each ``Title`` or, when ``hybrid``,
    ``Title <|item|>``. Hybrid prompts need ``history_ids`` and ``candidate_ids`` (the item ids behind the titles);
    the returned ``item_ids`` follow the placeholders in the text, whichever of history and candidates comes first.
    """
    templates = load_templates(domain).next_item
    if not 0 <= template_index < len(templates.templates):
        raise ValueError(
            f"template_index {template_index} out of range: domain has {len(templates.templates)} templates"
        )
    sep = templates.separator
    values = {
        "history": _join(_item_pieces(history_titles, history_ids, hybrid, "history"), sep),
        "candidates": _join(_item_pieces(candidate_titles, candidate_ids, hybrid, "candidate"), sep),
        "n_candidates": (str(len(candidate_titles)), ()),
    }
    return Prompt(*_render(templates.templates[template_index], values))


def build_ctr_prompt(
    history_titles: Sequence[str],
    target_title: str,
    domain: str | DomainTemplates,
    *,
    history_ratings: Sequence[float | None] | None = None,
    profile: Mapping[str, Any] | None = None,
    hybrid: bool = False,
    history_ids: Sequence[int] | None = None,
    target_id: int | None = None,
) -> Prompt:
    """ReLLa's CTR prompt: the user's profile, the history (oldest first) with ratings where known, and the target.

    ``history_ratings`` may hold NaN or None for unknown ratings (CoLLM's ML-1M publishes none); items without one
    are written without stars. ``profile`` maps user attributes (a users-table row) to values; only attributes the
    template names are used, and missing ones (None, NaN) are left out. ``hybrid`` marks the history items and the
    target with :data:`ITEM_TOKEN` (ReLLaX's soft prompts) and needs ``history_ids`` and ``target_id``.
    """
    ctr = load_templates(domain).ctr
    if history_ratings is not None and len(history_ratings) != len(history_titles):
        raise ValueError(f"{len(history_ratings)} ratings for {len(history_titles)} history items")
    if hybrid and target_id is None:
        raise ValueError("a hybrid prompt needs target_id")
    ratings = [_rating_text(r) for r in history_ratings] if history_ratings is not None else []
    ratings += [None] * (len(history_titles) - len(ratings))
    items: list[_Piece] = []
    for index, (piece, rating) in enumerate(
        zip(_item_pieces(history_titles, history_ids, hybrid, "history"), ratings, strict=True), start=1
    ):
        fields = {"index": (str(index), ()), "title": piece}
        if rating is None:
            items.append(_render(ctr.item_unrated, fields))
        else:
            items.append(_render(ctr.item_rated, {**fields, "rating": (rating, ())}))
    if not items:
        history = _render(ctr.history_empty, {})
    else:
        header = ctr.history_unrated if all(r is None for r in ratings) else ctr.history_rated
        history = _render(header, {"items": _join(items, ctr.separator)})
    ids = [target_id] if target_id is not None else None
    (target,) = _item_pieces([target_title], ids, hybrid, "target")
    values = {"profile": (_profile_text(ctr, profile), ()), "history": history, "target": target}
    return Prompt(*_render(ctr.prompt, values))


def ctr_answer(label: bool | int | float, domain: str | DomainTemplates) -> str:
    """The answer text for a CTR label: ``"Yes."`` for a like (label 1), ``"No."`` otherwise."""
    ctr = load_templates(domain).ctr
    return ctr.answer_yes if bool(label) else ctr.answer_no


def _item_pieces(titles: Sequence[str], ids: Sequence[int] | None, hybrid: bool, what: str) -> list[_Piece]:
    if hybrid:
        if ids is None:
            raise ValueError(f"a hybrid prompt needs the {what} item ids")
        if len(ids) != len(titles):
            raise ValueError(f"{len(ids)} {what} ids for {len(titles)} {what} titles")
    for title in titles:
        if ITEM_TOKEN in title:
            raise ValueError(f"{what} title {title!r} contains the placeholder token {ITEM_TOKEN}")
    if not hybrid or ids is None:
        return [(title, ()) for title in titles]
    return [(f"{title} {ITEM_TOKEN}", (int(i),)) for title, i in zip(titles, ids, strict=True)]


def _join(pieces: Sequence[_Piece], separator: str) -> _Piece:
    return separator.join(text for text, _ in pieces), tuple(i for _, ids in pieces for i in ids)


def _render(template: str, values: Mapping[str, _Piece]) -> _Piece:
    """Fill ``template`` left to right, collecting placeholder ids in text order. Values are never re-parsed, so
    braces in titles are safe."""
    text: list[str] = []
    ids: list[int] = []
    for literal, name, _, _ in _FORMATTER.parse(template):
        text.append(literal)
        if name is not None:
            value, value_ids = values[name]
            text.append(value)
            ids.extend(value_ids)
    return "".join(text), tuple(ids)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN
    except TypeError:  # pandas.NA refuses bool()
        return True


def _rating_text(rating: float | None) -> str | None:
    if rating is None or _missing(rating):
        return None
    value = float(rating)
    if not math.isfinite(value):
        return None
    return f"{value:g}"


def _profile_text(ctr: CtrTemplates, profile: Mapping[str, Any] | None) -> str:
    """The profile sentences, in template order, followed by a space; empty when nothing is known."""
    if not profile:
        return ""
    sentences = []
    for attr, template in ctr.profile.items():
        value = profile.get(attr)
        if _missing(value) or str(value).strip() == "":
            continue
        text = str(value)
        text = ctr.profile_values.get(attr, {}).get(text, text)
        sentences.append(_render(template, {"value": (text, ())})[0])
    return " ".join(sentences) + " " if sentences else ""


# --- tokenization -------------------------------------------------------------------------------------------------


def add_item_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> int:
    """Add :data:`ITEM_TOKEN` as a special token (idempotent) and return its id; with ``model``, grow its input
    embeddings so the id is valid. Never shrinks: some models carry more embedding rows than tokens."""
    from tokenizers import AddedToken

    tokenizer.add_tokens(
        [AddedToken(ITEM_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)],
        special_tokens=True,
    )
    token_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"the tokenizer did not register {ITEM_TOKEN}")
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if token_id >= rows:
            # mean_resizing: the new row starts at the mean embedding, so an un-injected token is not an outlier
            model.resize_token_embeddings(token_id + 1, mean_resizing=True)
    return token_id


@dataclass
class EncodedBatch:
    """A padded batch for a causal LM.

    ``labels`` is -100 except on answer tokens (None for generation prompts). ``item_positions`` is
    LongTensor[N, 2] of (row, position) of every placeholder token, row-major and left to right, and ``item_ids``
    LongTensor[N] the item each stands for: the arguments :func:`recadapt.llm.injection.inject_item_embeddings`
    takes.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    item_positions: Tensor
    item_ids: Tensor
    padding_side: PaddingSide = "right"

    def to(self, device: torch.device | str) -> EncodedBatch:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return EncodedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=move(self.labels),
            item_positions=self.item_positions.to(device),
            item_ids=self.item_ids.to(device),
            padding_side=self.padding_side,
        )


class ItemTokenizer:
    """Tokenize (prompt, answer) pairs for training and prompts alone for generation.

    With a chat template (``use_chat_template=None`` uses one when the tokenizer has it) the prompt is the user
    message and the answer the assistant message; the labelled tokens are the answer and the template's end of
    turn (e.g. ``<|im_end|>``), so the model learns to stop; whitespace the template writes after the end-of-turn
    token is dropped. Without one, the answer is ``answer_prefix + answer +
    answer_suffix`` (LLaRA: the title followed by a newline) after the prompt.

    Prompt and answer are tokenized separately and concatenated, so the prompt's ids during training are exactly
    those :meth:`encode` gives for generation, and no token straddles the prompt/answer boundary.

    Constructing one adds :data:`ITEM_TOKEN` to ``tokenizer`` (pass ``model`` to resize its embeddings too).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model: PreTrainedModel | None = None,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        answer_prefix: str = " ",
        answer_suffix: str = "\n",
        max_length: int | None = None,
    ) -> None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.uses_chat_template = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        self.answer_prefix = answer_prefix
        self.answer_suffix = answer_suffix
        self.max_length = max_length
        self.item_token_id = add_item_token(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_token_id = int(pad)
        # ids of every special token (end-of-turn markers such as <|im_end|> or <end_of_turn> among them)
        self._special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        )

    # text level

    def prompt_text(self, prompt: str) -> str:
        """The text the model sees before its answer: the chat-templated user turn plus the assistant header, or
        the prompt itself."""
        if not self.uses_chat_template:
            return prompt
        return self._chat(self._messages(prompt), add_generation_prompt=True)

    def answer_text(self, prompt: str, answer: str) -> str:
        """The text after :meth:`prompt_text` in a training sample: the assistant turn as the chat template
        renders it (the end-of-turn marker included), or ``answer_prefix + answer + answer_suffix``."""
        return self._answer_text(self.prompt_text(prompt), prompt, answer)

    def answer_token_ids(self, answer: str, prompt: str = "") -> list[int]:
        """The labelled token ids of ``answer``; CTR scoring reads the first of "Yes." and "No."."""
        return self._answer_ids([self.answer_text(prompt, answer)])[0]

    # token level

    def encode(
        self,
        prompts: Sequence[Prompt | str],
        answers: Sequence[str] | None = None,
        *,
        padding_side: PaddingSide | None = None,
    ) -> EncodedBatch:
        """Tokenize and pad a batch. With ``answers``: training inputs with labels (default right padding).
        Without: generation prompts, no labels (default left padding, so every row ends where generation starts).
        """
        prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        side: PaddingSide = padding_side or ("right" if answers is not None else "left")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        head_texts = [self.prompt_text(p.text) for p in prompts]
        heads = self._ids(head_texts, special=not self.uses_chat_template)
        if answers is None:
            tails: list[list[int]] = [[] for _ in prompts]
        else:
            texts = [
                self._answer_text(head, p.text, a)
                for head, p, a in zip(head_texts, prompts, answers, strict=True)
            ]
            tails = self._answer_ids(texts)
        for row, (prompt, head, tail) in enumerate(zip(prompts, heads, tails, strict=True)):
            found = head.count(self.item_token_id) + tail.count(self.item_token_id)
            if found != len(prompt.item_ids):
                raise ValueError(
                    f"sample {row}: {found} {ITEM_TOKEN} tokens in the text but {len(prompt.item_ids)} item ids"
                )
            if self.max_length is not None and len(head) + len(tail) > self.max_length:
                raise ValueError(
                    f"sample {row} has {len(head) + len(tail)} tokens, over max_length={self.max_length}; "
                    "shorten the history rather than truncate (that would cut placeholders or the answer)"
                )
            if answers is not None and not tail:
                raise ValueError(f"sample {row}: the answer has no tokens")

        width = max((len(h) + len(t) for h, t in zip(heads, tails, strict=True)), default=0)
        batch = len(prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if answers is not None else None
        for row, (head, tail) in enumerate(zip(heads, tails, strict=True)):
            length = len(head) + len(tail)
            start = width - length if side == "left" else 0
            input_ids[row, start : start + length] = torch.tensor(head + tail, dtype=torch.long)
            attention_mask[row, start : start + length] = 1
            if labels is not None:
                labels[row, start + len(head) : start + length] = torch.tensor(tail, dtype=torch.long)

        # the pad token is never the placeholder, so the mask of real placeholders is exact
        item_positions = (input_ids == self.item_token_id).nonzero()
        item_ids = torch.tensor([i for p in prompts for i in p.item_ids], dtype=torch.long)
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            item_positions=item_positions,
            item_ids=item_ids,
            padding_side=side,
        )

    def __call__(
        self,
        prompts: Sequence[Prompt | str],
        answers: Sequence[str] | None = None,
        *,
        padding_side: PaddingSide | None = None,
    ) -> EncodedBatch:
        return self.encode(prompts, answers, padding_side=padding_side)

    def _answer_text(self, head: str, prompt: str, answer: str) -> str:
        if not self.uses_chat_template:
            return self.answer_prefix + answer + self.answer_suffix
        full = self._chat([*self._messages(prompt), {"role": "assistant", "content": answer}])
        if not full.startswith(head):
            raise ValueError(
                "the chat template renders a conversation that does not start with its generation prompt; "
                "set use_chat_template=False for this tokenizer"
            )
        return full[len(head) :]

    def _answer_ids(self, texts: list[str]) -> list[list[int]]:
        """Answer token ids, ending at the chat template's end-of-turn token: whitespace the template writes
        after it (ChatML's newline) is not part of the answer, so it is neither labelled nor fed."""
        ids = self._ids(texts, special=False)
        if not self.uses_chat_template:
            return ids
        return [self._trim_after_end_of_turn(row) for row in ids]

    def _trim_after_end_of_turn(self, ids: list[int]) -> list[int]:
        end = len(ids)
        while (
            end > 0
            and ids[end - 1] not in self._special_ids
            and not self.tokenizer.decode(ids[end - 1 :]).strip()
        ):
            end -= 1
        if 0 < end < len(ids) and ids[end - 1] in self._special_ids:
            return ids[:end]
        return ids  # no special token before the trailing whitespace: keep it, it may be the only terminator

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        return [*messages, {"role": "user", "content": prompt}]

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _ids(self, texts: list[str], *, special: bool) -> list[list[int]]:
        """Token ids per text. Chat-templated text already holds its special tokens (BOS included), so it is
        tokenized with ``add_special_tokens=False``, as transformers' own ``apply_chat_template`` does."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [list(ids) for ids in encoded]
