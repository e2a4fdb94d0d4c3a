"""The command line of a tiny SASRec run on the committed RecBole ``patterns`` fixture (seconds on one core), for
tests of what surrounds training: locks, progress output. Imported as ``tiny_crm`` (``tests/`` is on sys.path)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"


def tiny_sasrec_args(tmp_path: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``recadapt [flags] train ...`` with prepared splits and runs under ``tmp_path``, then ``overrides``."""
    return [
        *flags,
        "train",
        "--config",
        str(REPO / "configs" / "sasrec.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"output_dir={tmp_path / 'runs'}",
        "model.hidden_size=16",
        "train.n_boot=10",
        "train.patience=0",
        *overrides,
    ]
