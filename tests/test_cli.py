"""The command line as a user runs it: ``recadapt data prepare`` on a RecBole dataset, twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from recadapt.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "recbole" / "patterns" / "patterns"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_prepare_twice_gives_identical_bytes(tmp_path: Path, capsys):
    args = [
        "data",
        "prepare",
        "--dataset",
        f"recbole:{FIXTURE}",
        "--protocol",
        "next-item",
        "ctr",
        "full-ranking",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--force"]) == 0
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(first) == 3 * 6  # train/valid/test/items/users parquet + manifest per protocol
    assert first == second
    out = capsys.readouterr().out
    assert "next-item: train" in out and "120 users, 60 items" in out


def test_unknown_dataset_is_a_one_line_error(tmp_path: Path, capsys):
    assert main(["data", "prepare", "--dataset", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "ml-100k" in err  # the message lists the known datasets


def test_data_stats_and_prepare_with_kcore_and_popularity_negatives(tmp_path: Path, capsys):
    import json

    assert main(["data", "stats", "--dataset", f"recbole:{FIXTURE}", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["data", "stats", "--dataset", f"recbole:{FIXTURE}", "--kcore", "16", "--json"]) == 0
    core = json.loads(capsys.readouterr().out)
    assert core["interactions"] < full["interactions"] and core["per_item"]["min"] >= 16
    assert core["per_user"]["min"] >= 16
    args = ["data", "prepare", "--dataset", f"recbole:{FIXTURE}", "--out", str(tmp_path), "--kcore", "16"]
    assert (
        main([*args, "--protocol", "sampled-ranking", "--negatives", "popularity", "--n-negatives", "9"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"{core['users']:,} users, {core['items']:,} items" in printed
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("__16core")
    assert [p.name for p in folder.iterdir()] == ["sampled-ranking__n_negatives-9__negatives-popularity"]


def test_overrides_are_read_on_both_sides_of_an_option(capsys):
    """``recadapt train --config C a=1 --protocol P b=2``: both overrides reach the config (the second, a field
    that does not exist, is the error), and anything else left over is still refused."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "sasrec.yaml")
    assert main(["train", "--config", config, "train.seed=1", "--protocol", "ctr", "train.bogus=2"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["train", "--config", config, "train.seed=1", "--bogus"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
