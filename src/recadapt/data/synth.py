"""Seeded synthetic datasets whose signal is known, written as RecBole atomic files: the learnability suite.

Every user has one taste, a genre; what differs between the variants is where that taste can be seen.

- ``text``: each user's items all come from their genre, and a title names its genre (``opera tune 02``). An LLM
  reading the prompt can tell; so can a CRM.
- ``cf``: the same interactions, but titles are random syllables. The genre shows only in which items are bought
  together, which a CRM learns and a prompt does not carry.
- ``long``: the genre shows only in the older part of a user's sequence. The ``recent`` items before the last
  one are drawn from all genres, and the last item is from the user's genre again. A prompt of the 10 most
  recent items sees no taste; a CRM over the whole history (RecLoRA's long/short split) does.
- ``ctr``: each interaction is rated 5 when the item is of the user's genre, else 1, half and half, at
  interleaved global times. Titles are random, so the label is visible only collaboratively: from which items the
  user rated high before.

:func:`generate` returns the frames and the ground truth (each item's and user's genre) for tests and probes;
:func:`write_recbole` writes ``NAME.inter`` and ``NAME.item`` byte for byte the same for the same spec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from recadapt.io import atomic_directory

Variant = Literal["text", "cf", "long", "ctr"]
VARIANTS: tuple[str, ...] = ("text", "cf", "long", "ctr")
TitleStyle = Literal["auto", "genre", "random"]
TITLE_STYLES: tuple[str, ...] = ("auto", "genre", "random")
GENRE_WORDS = (
    "jazz", "opera", "blues", "techno", "reggae", "metal", "folk", "disco", "gospel", "salsa",
    "punk", "soul", "tango", "samba", "polka", "grunge", "funk", "ambient", "swing", "ska",
)  # fmt: skip
NOUNS = ("tune", "song", "track", "melody", "anthem", "ballad", "groove", "beat", "chant", "hymn")
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``min_items``..``max_items`` interactions per user (``long``: the older part; the
    ``recent`` items and the final one come on top). ``titles``: ``genre`` names the item's genre
    (``opera tune 02``), ``random`` is random syllables, ``auto`` is ``genre`` for ``text`` and ``random`` for the
    others. The interactions do not depend on it: ``long`` with ``genre`` titles has ``long``'s sequences, with
    the taste still hidden from the prompt's recent items but each candidate's genre readable (what RecLoRA's
    text-only item side needs)."""

    variant: Variant = "cf"
    n_users: int = 1000
    n_genres: int = 20
    items_per_genre: int = 25
    min_items: int = 14
    max_items: int = 16
    recent: int = 10
    seed: int = 0
    titles: TitleStyle = "auto"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.titles not in TITLE_STYLES:
            raise ValueError(f"titles must be one of {TITLE_STYLES}, got {self.titles!r}")
        if not 2 <= self.n_genres <= len(GENRE_WORDS):
            raise ValueError(f"n_genres must be in [2, {len(GENRE_WORDS)}], got {self.n_genres}")
        if self.n_users < 1 or self.items_per_genre < 2 or self.recent < 1:
            raise ValueError("n_users >= 1, items_per_genre >= 2 and recent >= 1 are needed")
        if not 2 <= self.min_items <= self.max_items:
            raise ValueError(f"need 2 <= min_items <= max_items, got {self.min_items}, {self.max_items}")
        if self.variant in ("text", "cf") and self.max_items > self.items_per_genre:
            raise ValueError(
                "text and cf users take distinct items of one genre: max_items <= items_per_genre"
            )

    @property
    def own_title_style(self) -> str:
        """The variant's own title style, what ``auto`` means: ``genre`` for ``text``, ``random`` otherwise."""
        return "genre" if self.variant == "text" else "random"

    @property
    def title_style(self) -> str:
        """``genre`` or ``random``: ``titles`` with ``auto`` resolved by the variant."""
        return self.own_title_style if self.titles == "auto" else self.titles

    @property
    def name(self) -> str:
        """``synth-long-s0``; what differs from the defaults is named, so no two sizes share a folder:
        ``synth-long-genre-titles-s0``, ``synth-cf-4000u-20x230-s0`` (users, genres x items per genre)."""
        style = "" if self.title_style == self.own_title_style else f"-{self.title_style}-titles"
        default = SynthSpec(variant=self.variant)
        sizes = (self.n_users, self.n_genres, self.items_per_genre)
        if sizes != (default.n_users, default.n_genres, default.items_per_genre):
            style += f"-{self.n_users}u-{self.n_genres}x{self.items_per_genre}"
        return f"synth-{self.variant}{style}-s{self.seed}"


@dataclass
class Synthetic:
    """The dataset's frames and its ground truth."""

    interactions: pd.DataFrame  # user, item, rating, timestamp (tokens as in the files)
    items: pd.DataFrame  # item, title
    item_genre: np.ndarray  # [n_items]
    user_genre: np.ndarray  # [n_users]


def _titles(spec: SynthSpec, rng: np.random.Generator, genres: np.ndarray) -> list[str]:
    if spec.title_style == "genre":
        within = np.zeros(len(genres), dtype=np.int64)
        titles = []
        for i, g in enumerate(genres):
            within[i] = (genres[:i] == g).sum()
            titles.append(f"{GENRE_WORDS[g]} {NOUNS[within[i] % len(NOUNS)]} {within[i]:02d}")
        return titles
    seen: set[str] = set()
    titles = []
    for _ in genres:  # drawn independently of the genre: a title says nothing about it
        while True:
            words = [
                "".join(_SYLLABLES[j] for j in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
                for _ in range(2)
            ]
            title = f"{words[0]} {words[1]} {int(rng.integers(100)):02d}"
            if title not in seen:
                seen.add(title)
                titles.append(title)
                break
    return titles


def generate(spec: SynthSpec) -> Synthetic:
    """The dataset of ``spec``; the same spec gives the same frames."""
    rng = np.random.default_rng([spec.seed, VARIANTS.index(spec.variant)])
    n_items = spec.n_genres * spec.items_per_genre
    item_genre = np.repeat(np.arange(spec.n_genres), spec.items_per_genre)
    by_genre = [np.flatnonzero(item_genre == g) for g in range(spec.n_genres)]
    user_genre = rng.integers(spec.n_genres, size=spec.n_users)
    users, items, ratings, times = [], [], [], []
    for u in range(spec.n_users):
        g = int(user_genre[u])
        n = int(rng.integers(spec.min_items, spec.max_items + 1))
        if spec.variant in ("text", "cf"):
            seq = rng.choice(by_genre[g], size=n, replace=False)
            rate = np.full(n, 5.0)
        elif spec.variant == "long":
            older = rng.choice(by_genre[g], size=n, replace=True)
            recent = rng.integers(n_items, size=spec.recent)
            seq = np.concatenate([older, recent, rng.choice(by_genre[g], size=1)])
            rate = np.full(len(seq), 5.0)
        else:  # ctr: half of the user's interactions in their genre (liked), half elsewhere (disliked)
            liked = rng.random(n) < 0.5
            others = np.flatnonzero(np.arange(spec.n_genres) != g)
            genres = np.where(liked, g, rng.choice(others, size=n))
            seq = np.array([rng.choice(by_genre[int(h)]) for h in genres])
            rate = np.where(liked, 5.0, 1.0)
        users += [u] * len(seq)
        items += seq.tolist()
        ratings += rate.tolist()
        if spec.variant == "ctr":  # interleaved across users: the CTR protocol splits in global time order
            times += np.sort(rng.integers(10**9, size=len(seq))).tolist()
        else:
            times += (10**6 * u + 60 * np.arange(len(seq))).tolist()
    titles = _titles(spec, rng, item_genre)
    interactions = pd.DataFrame(
        {
            "user": [f"u{u}" for u in users],
            "item": [f"i{i}" for i in items],
            "rating": np.asarray(ratings),
            "timestamp": np.asarray(times, dtype=np.int64),
        }
    )
    item_frame = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)], "title": titles})
    return Synthetic(interactions, item_frame, item_genre, user_genre)


def centroid_accuracy(vectors: np.ndarray, labels: np.ndarray) -> float:
    """How well ``labels`` (e.g. the ground-truth genres) can be read back from ``vectors`` [n, d]: nearest-centroid
    accuracy, centroids from the first half of the rows, scored on the second half (chance: 1 / classes). The
    probes of ``benchmarks/gate_spread.py`` and ``benchmarks/darec_slots.py``."""
    half = len(vectors) // 2
    fit, test = slice(0, half), slice(half, None)
    classes = np.unique(labels[fit])
    centroids = np.stack([vectors[fit][labels[fit] == c].mean(0) for c in classes])
    distance = ((vectors[test][:, None] - centroids[None]) ** 2).sum(-1)
    return float((classes[distance.argmin(1)] == labels[test]).mean())


def write_recbole(spec: SynthSpec, out_dir: str | Path) -> Path:
    """Write ``out_dir/NAME/NAME.inter`` and ``NAME.item`` (atomically) and return the dataset path to pass as
    ``--dataset recbole:PATH``. A ``spec.json`` beside them records what was generated."""
    import json

    data = generate(spec)
    final = Path(out_dir) / spec.name
    with atomic_directory(final) as tmp:
        lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        lines += [
            f"{u}\t{i}\t{r:g}\t{t}"
            for u, i, r, t in zip(
                data.interactions["user"],
                data.interactions["item"],
                data.interactions["rating"],
                data.interactions["timestamp"],
                strict=True,
            )
        ]
        (tmp / f"{spec.name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
        item_lines = ["item_id:token\ttitle:token_seq"]
        item_lines += [f"{i}\t{t}" for i, t in zip(data.items["item"], data.items["title"], strict=True)]
        (tmp / f"{spec.name}.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
        (tmp / "spec.json").write_text(
            json.dumps(asdict(spec), indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
    return final / spec.name
