"""The learnability suite's synthetic datasets: deterministic, and each variant's signal is where it claims."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recadapt.cli import main
from recadapt.data.registry import load_dataset
from recadapt.data.synth import VARIANTS, SynthSpec, generate, write_recbole

SMALL = {"n_users": 300, "n_genres": 10, "items_per_genre": 20}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC, ties counted half."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.astype(bool)
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def _title_classifier_accuracy(titles: list[str], genres: np.ndarray) -> float:
    """A character-bigram naive Bayes trained on half the items of each genre, tested on the other half: what a
    model reading only titles can learn about genres."""

    def bigrams(text: str) -> list[str]:
        padded = f" {text} "
        return [padded[k : k + 2] for k in range(len(padded) - 1)]

    n_genres = int(genres.max()) + 1
    position = np.array([(genres[:i] == g).sum() for i, g in enumerate(genres)])
    train, test = position % 2 == 0, position % 2 == 1
    counts = [Counter() for _ in range(n_genres)]
    for title, g in zip(np.asarray(titles)[train], genres[train], strict=True):
        counts[g].update(bigrams(title))
    vocab = set().union(*counts)
    correct = 0
    for title, g in zip(np.asarray(titles)[test], genres[test], strict=True):
        scores = [
            sum(np.log((c[b] + 1) / (sum(c.values()) + len(vocab))) for b in bigrams(title)) for c in counts
        ]
        correct += int(np.argmax(scores) == g)
    return correct / int(test.sum())


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_same_spec_writes_the_same_bytes(tmp_path: Path, variant: str) -> None:
    spec = SynthSpec(variant=variant, **SMALL)
    a, b = write_recbole(spec, tmp_path / "a"), write_recbole(spec, tmp_path / "b")
    for suffix in (".inter", ".item"):
        assert a.with_suffix(suffix).read_bytes() == b.with_suffix(suffix).read_bytes()
    other = write_recbole(SynthSpec(variant=variant, **SMALL, seed=1), tmp_path / "c")
    assert other.with_suffix(".inter").read_bytes() != a.with_suffix(".inter").read_bytes()


@pytest.mark.parametrize("variant", VARIANTS)
def test_titles_carry_the_genre_in_text_only(variant: str) -> None:
    data = generate(SynthSpec(variant=variant, **SMALL))
    accuracy = _title_classifier_accuracy(list(data.items["title"]), data.item_genre)
    if variant == "text":
        assert accuracy > 0.9
    else:  # chance is 1 / 10
        assert accuracy < 0.25, f"{variant}: titles predict the genre ({accuracy:.2f})"


@pytest.mark.parametrize(("variant", "titles"), [("long", "genre"), ("text", "random"), ("cf", "genre")])
def test_a_title_style_changes_the_titles_and_nothing_else(variant: str, titles: str) -> None:
    own = generate(SynthSpec(variant=variant, **SMALL))
    other_spec = SynthSpec(variant=variant, **SMALL, titles=titles)
    other = generate(other_spec)
    pd.testing.assert_frame_equal(other.interactions, own.interactions)
    accuracy = _title_classifier_accuracy(list(other.items["title"]), other.item_genre)
    assert (accuracy > 0.9) if titles == "genre" else (accuracy < 0.25), f"{titles} titles: {accuracy:.2f}"
    assert other_spec.name == f"synth-{variant}-{titles}-titles-300u-10x20-s0"
    own_style = (
        "genre" if variant == "text" else "random"
    )  # spelled out: the test states the rule, not reuses it
    assert SynthSpec(variant=variant, titles=own_style).name == f"synth-{variant}-s0"  # type: ignore[arg-type]


def test_sizes_other_than_the_defaults_are_named() -> None:
    """Two sizes of one variant must not share a folder (the suite's ``cf`` and ``cf-large``)."""
    assert SynthSpec(variant="cf").name == "synth-cf-s0"
    assert SynthSpec(variant="cf", n_users=4000, items_per_genre=230).name == "synth-cf-4000u-20x230-s0"
    assert SynthSpec(variant="ctr", n_genres=10, seed=2).name == "synth-ctr-1000u-10x25-s2"


def test_an_unknown_title_style_is_refused() -> None:
    with pytest.raises(ValueError, match="titles must be one of"):
        SynthSpec(titles="emoji")  # type: ignore[arg-type]


def _sequences(data) -> dict[str, np.ndarray]:
    frame = data.interactions.sort_values(["user", "timestamp"], kind="stable")
    genre = {f"i{i}": g for i, g in enumerate(data.item_genre)}
    return {u: np.array([genre[i] for i in group["item"]]) for u, group in frame.groupby("user", sort=False)}


@pytest.mark.parametrize("variant", ["text", "cf"])
def test_every_user_stays_in_their_genre(variant: str) -> None:
    data = generate(SynthSpec(variant=variant, **SMALL))
    for user, genres in _sequences(data).items():
        assert set(genres) == {data.user_genre[int(user[1:])]}


def test_long_hides_the_genre_from_the_recent_items() -> None:
    spec = SynthSpec(variant="long", **SMALL)
    data = generate(spec)
    shares = []
    for user, genres in _sequences(data).items():
        g = data.user_genre[int(user[1:])]
        older, recent, last = genres[: -spec.recent - 1], genres[-spec.recent - 1 : -1], genres[-1]
        assert set(older) == {g} and last == g
        shares.append(np.mean(recent == g))
    assert np.mean(shares) < 0.2  # the user's genre is no more frequent among the recent items than any other


def test_ctr_labels_follow_a_taste_visible_only_collaboratively() -> None:
    data = generate(SynthSpec(variant="ctr", **SMALL))
    frame = data.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    item_genre = frame["item"].str[1:].astype(int).map(lambda i: data.item_genre[i]).to_numpy()
    user_genre = data.user_genre[frame["user"].str[1:].astype(int).to_numpy()]
    labels = (frame["rating"] > 3).to_numpy()
    assert np.array_equal(labels, item_genre == user_genre)
    assert 0.4 < labels.mean() < 0.6
    half = len(frame) // 2  # the item's positive rate on the earlier half cannot rank the later half
    rates = frame.iloc[:half].groupby("item")["rating"].apply(lambda r: float(np.mean(r > 3)))
    later = frame.iloc[half:]
    scores = later["item"].map(rates).fillna(0.5).to_numpy()
    assert abs(_auc(scores, labels[half:]) - 0.5) < 0.1
    # the collaborative oracle (is the item's genre one the user rated high before?) ranks almost perfectly
    liked: dict[str, set[int]] = {}
    oracle = []
    for user, genre, label in zip(frame["user"], item_genre, labels, strict=True):
        oracle.append(float(genre in liked.get(user, set())))
        if label:
            liked.setdefault(user, set()).add(int(genre))
    assert _auc(np.array(oracle[half:]), labels[half:]) > 0.9


def test_the_cli_writes_a_dataset_the_protocols_read(tmp_path: Path, capsys) -> None:
    assert (
        main(["data", "synth", "--variant", "ctr", "--out", str(tmp_path), "--users", "200", "--genres", "5"])
        == 0
    )
    path = tmp_path / "synth-ctr-200u-5x25-s0" / "synth-ctr-200u-5x25-s0"
    assert f"--dataset recbole:{path}" in capsys.readouterr().out
    dataset = load_dataset(f"recbole:{path}")
    assert dataset.interactions["user_id"].nunique() == 200 and len(dataset.items) == 5 * 25


def test_long_needs_a_longer_persisted_history_to_show_the_genre(tmp_path: Path) -> None:
    """Next-item persists 10 history items by default: on ``long`` they are the random recent ones, so no method
    could see the user's genre. ``data.history_len=30`` keeps the older, in-genre part for a CRM to read (the
    prompt still shows train.max_len items), and the split lives beside the default one."""
    from recadapt.data.store import prepared_for
    from recadapt.train.sections import DataConfig

    spec = SynthSpec(variant="long", **SMALL)
    dataset = f"recbole:{write_recbole(spec, tmp_path / 'data')}"
    short = prepared_for(DataConfig(dataset=dataset, prepared_dir=str(tmp_path / "prepared")))
    long = prepared_for(DataConfig(dataset=dataset, prepared_dir=str(tmp_path / "prepared"), history_len=30))
    genre = np.repeat(np.arange(spec.n_genres), spec.items_per_genre)
    for prepared, most in ((short, 10), (long, 30)):
        test = prepared.parts["test"]
        assert max(len(h) for h in test["history"]) <= most
        target_genre = genre[test["target"].to_numpy()]
        # the share of history items in the target's genre: chance in the last 10, most of the longer history
        share = np.mean([np.mean(genre[h] == g) for h, g in zip(test["history"], target_genre, strict=True)])
        assert (share < 0.3) if most == 10 else (share > 0.4), (most, share)
    with pytest.raises(Exception, match="data.history_len"):
        DataConfig(dataset=dataset, protocol="ctr", history_len=30)


def test_centroid_accuracy_reads_back_separable_labels_and_not_random_ones() -> None:
    from recadapt.data.synth import centroid_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(5, size=400)
    separated = np.eye(5)[labels] * 10 + rng.normal(size=(400, 5))
    assert centroid_accuracy(separated, labels) == 1.0
    noise = rng.normal(size=(400, 5))
    assert centroid_accuracy(noise, labels) < 0.35  # chance 0.2
