"""benchmarks/learnability.py: its doc table (``--merge`` keeps rows trained elsewhere, replaces those re-run) and
the dataset each row variant trains on."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_script import benchmark_module


@pytest.fixture(scope="module")
def learnability():
    with benchmark_module("learnability") as module:
        yield module


def _row(key: str, value: float, shuffled: float | None) -> dict:
    variant = key.split("/")[0]
    return {
        "row": key, "method": "m", "variant": variant, "samples": 256, "steps": 32, "minutes": 1.0,
        "metric": "HR@1", "value": value, "result": f"{value:.3f}", "sasrec": "0.8", "popular": "-",
        "chance": 0.05, "panel": variant, "shuffled": "n/a" if shuffled is None else f"{shuffled:.3f}",
        "shuffled_value": shuffled, "loss": "0.7", "loss_shuffled": "-", "precision": "bf16",
    }  # fmt: skip


def test_merge_keeps_rows_from_elsewhere_and_replaces_the_rerun_ones(learnability, tmp_path: Path) -> None:
    prefix = tmp_path / "table"
    learnability.write([_row("cf/a", 0.1, 0.05), _row("cf/b", 0.2, None), _row("ctr/c", 0.6, 0.5)], prefix)
    rows = learnability.merged(prefix, [_row("cf/b", 0.7, 0.04), _row("long/d", 0.3, 0.1)])
    assert [r["row"] for r in rows] == ["cf/a", "cf/b", "ctr/c", "long/d"]
    assert rows[1]["value"] == 0.7 and rows[1]["shuffled_value"] == 0.04
    assert rows[0]["value"] == pytest.approx(0.1) and rows[0]["chance"] == pytest.approx(0.05)
    assert rows[0]["shuffled_value"] == pytest.approx(0.05)
    learnability.write(rows, prefix)  # the numbers read back plot again
    table = prefix.with_suffix(".md").read_text(encoding="utf-8").splitlines()[2:]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == [r["row"] for r in rows]
    assert learnability.merged(tmp_path / "absent", rows[:1]) == rows[:1]


def test_every_row_variant_names_a_synthetic_dataset_written_with_its_options(
    learnability, tmp_path: Path, monkeypatch
) -> None:
    assert {row.variant for row in learnability.ROWS} <= set(learnability.SYNTH)
    commands = []
    monkeypatch.setattr(learnability, "run", lambda command, log: commands.append(command))
    dataset = learnability.dataset(tmp_path, "long-text")
    assert (
        dataset
        == f"recbole:{tmp_path / 'data' / 'synth-long-genre-titles-s0' / 'synth-long-genre-titles-s0'}"
    )
    assert commands[0][-7:] == [
        "synth",
        "--variant",
        "long",
        "--titles",
        "genre",
        "--out",
        str(tmp_path / "data"),
    ]
    assert (
        learnability.common_args(tmp_path, "long-text")[-1] == f"data.history_len={learnability.LONG_HISTORY}"
    )
    large = learnability.dataset(tmp_path, "cf-large")
    assert large.endswith("synth-cf-4000u-20x230-s0/synth-cf-4000u-20x230-s0")
    assert commands[1][-8:-1] == ["--variant", "cf", "--users", "4000", "--items-per-genre", "230", "--out"]


def test_every_variants_flags_make_the_dataset_it_names(learnability, tmp_path: Path, monkeypatch) -> None:
    """The flags the suite passes to `recadapt data synth` must write the dataset whose path it returns."""
    from recadapt.cli import main

    commands = []
    monkeypatch.setattr(learnability, "run", lambda command, log: commands.append(command))
    for variant in learnability.SYNTH:
        named = learnability.dataset(tmp_path, variant).removeprefix("recbole:")
        assert main(commands[-1][commands[-1].index("data") :]) == 0
        assert Path(f"{named}.inter").is_file(), variant
