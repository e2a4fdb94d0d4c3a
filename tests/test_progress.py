"""Progress output: a bar on a terminal, a few plain lines in a log file, nothing with --quiet."""

from __future__ import annotations

from pathlib import Path

from tiny_crm import tiny_sasrec_args

from recadapt.cli import main
from recadapt.progress import LINES_PER_BAR, LineProgress, progress_bar


def test_a_redirected_bar_prints_a_line_per_tenth_and_inner_bars_nothing(capsys) -> None:
    bar = progress_bar(range(1000), desc="steps")  # stderr is captured by pytest: not a terminal
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.5")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == LINES_PER_BAR and "\r" not in "".join(lines)
    assert lines[-1].startswith("steps: 1000/1000 (100%)") and lines[-1].endswith("loss=0.5")
    for _ in progress_bar(range(1000), desc="inner", leave=False):
        pass
    assert capsys.readouterr().err == ""


def _train(tmp_path: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    return tiny_sasrec_args(tmp_path, "train.epochs=3", "train.batch_size=8", *extra, flags=flags)


def test_a_redirected_training_log_has_lines_not_carriage_returns(tmp_path: Path, capsys) -> None:
    assert main(_train(tmp_path, "name=loud")) == 0
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err
    assert [line for line in out.out.splitlines() if line.startswith("epoch ")][-1].startswith("epoch 3:")
    assert main(_train(tmp_path, "name=quiet", flags=("--quiet",))) == 0
    out = capsys.readouterr()
    assert out.err == "" and not any(line.startswith("epoch ") for line in out.out.splitlines())
    assert "best epoch" in out.out  # results still print
