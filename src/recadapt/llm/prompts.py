"""Prompt texts for next-item and CTR recommendation, filled in from a domain's templates.

Items appear in two forms (LLaRA):

- text-only: ``Title`` (TALLRec, and the text branch of LLaRA's curriculum);
- hybrid: ``Title <|item|>`` (or ``<|item|> Title``, ``llm.item_placement``), where the input embedding at the
  single special token :data:`ITEM_TOKEN` is later replaced by ``Projector(CRM item embedding)``
  (:mod:`recadapt.llm.injection`).

Text-only prompts carry no placeholder at all. LLaRA's code keeps a frozen ``[PH]`` token there, whose embedding
is an untrained row the model must learn to ignore; the paper and TALLRec describe the text form as the title
alone, and omitting it keeps text-only prompts identical to TALLRec's, so the two methods differ only in the items.

Templates come from :mod:`recadapt.llm.prompt_templates`; :mod:`recadapt.llm.encoding` tokenizes the texts.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recadapt.llm.prompt_templates import CtrTemplates, DomainTemplates, load_templates

ITEM_TOKEN = "<|item|>"
# where a hybrid item's placeholder goes: after its title (LLaRA's ``Title <|item|>``) or before it
# (``<|item|> Title``: the title's first token then directly follows the CRM vector, as an induction copy needs)
ITEM_PLACEMENTS = ("after", "before")
EVAL_TEMPLATE_INDEX = 0  # LLaRA evaluates with the first template of a domain
# the placeholder id of the user token (``llm.user_token``): the embedder fills it with the row's CRM user vector
USER_ITEM_ID = -1
USER_TOKEN_TEXT = "their long-term taste"

_FORMATTER = string.Formatter()


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
    placement: str = "after",
    user_token: bool = False,
) -> Prompt:
    """LLaRA's next-item prompt: history (oldest first) and candidates, each ``Title`` or, when ``hybrid``,
    ``Title <|item|>`` (``<|item|> Title`` with ``placement="before"``). Hybrid prompts need ``history_ids`` and
    ``candidate_ids`` (the item ids behind the titles); the returned ``item_ids`` follow the placeholders in the
    text, whichever of history and candidates comes first. ``user_token`` (hybrid only): the history starts with
    one more placeholder, ``<|item|> their long-term taste``, whose id is :data:`USER_ITEM_ID`.
    """
    templates = load_templates(domain).next_item
    if not 0 <= template_index < len(templates.templates):
        raise ValueError(
            f"template_index {template_index} out of range: domain has {len(templates.templates)} templates"
        )
    sep = templates.separator
    history = _item_pieces(history_titles, history_ids, hybrid, "history", placement)
    if hybrid and user_token:
        history = [*_item_pieces([USER_TOKEN_TEXT], [USER_ITEM_ID], True, "user", placement), *history]
    values = {
        "history": _join(history, sep),
        "candidates": _join(
            _item_pieces(candidate_titles, candidate_ids, hybrid, "candidate", placement), sep
        ),
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
    placement: str = "after",
) -> Prompt:
    """ReLLa's CTR prompt: the user's profile, the history (oldest first) with ratings where known, and the target.

    ``history_ratings`` may hold NaN or None for unknown ratings (CoLLM's ML-1M publishes none); items without one
    are written without stars. ``profile`` maps user attributes (a users-table row) to values; only attributes the
    template names are used, and missing ones (None, NaN) are left out. ``hybrid`` marks the history items and the
    target with :data:`ITEM_TOKEN` (ReLLaX's soft prompts, placed as in :func:`build_next_item_prompt`) and needs
    ``history_ids`` and ``target_id``.
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
        zip(_item_pieces(history_titles, history_ids, hybrid, "history", placement), ratings, strict=True),
        start=1,
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
    (target,) = _item_pieces([target_title], ids, hybrid, "target", placement)
    values = {"profile": (_profile_text(ctr, profile), ()), "history": history, "target": target}
    return Prompt(*_render(ctr.prompt, values))


def ctr_answer(label: bool | int | float, domain: str | DomainTemplates) -> str:
    """The answer text for a CTR label: ``"Yes."`` for a like (label 1), ``"No."`` otherwise."""
    ctr = load_templates(domain).ctr
    return ctr.answer_yes if bool(label) else ctr.answer_no


def _item_pieces(
    titles: Sequence[str], ids: Sequence[int] | None, hybrid: bool, what: str, placement: str = "after"
) -> list[_Piece]:
    if placement not in ITEM_PLACEMENTS:
        raise ValueError(f"placement must be one of {ITEM_PLACEMENTS}, got {placement!r}")
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
    form = "{title} {token}" if placement == "after" else "{token} {title}"
    return [
        (form.format(title=title, token=ITEM_TOKEN), (int(i),)) for title, i in zip(titles, ids, strict=True)
    ]


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
