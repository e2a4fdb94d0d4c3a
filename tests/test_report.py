import json
from pathlib import Path

import pytest

from recadapt.report import train_time, write_report


def _run(root: Path, model: str, seed: int, hr: float) -> Path:
    run = root / f"{model}-s{seed}"
    run.mkdir(parents=True)
    estimate = {"value": hr, "low": hr - 0.1, "high": hr + 0.1}
    test = {"HR@1": estimate, "NDCG@10": estimate, "ValidRatio": {"value": 1.0, "low": 1.0, "high": 1.0}}
    payload = {
        "dataset": "toy",
        "protocol": "next-item",
        "model": model,
        "seed": seed,
        "test_samples": 10,
        "test": test,
    }
    (run / "metrics.json").write_text(json.dumps(payload))
    return run


def test_report_aggregates_seeds_and_writes_table_csv_and_plot(tmp_path: Path):
    runs = [
        _run(tmp_path, "sasrec", 0, 0.2),
        _run(tmp_path, "sasrec", 1, 0.4),
        _run(tmp_path, "gru4rec", 0, 0.3),
    ]
    rows = write_report(runs, tmp_path / "out" / "table.md", title="Toy")
    sasrec = next(r for r in rows if r["model"] == "sasrec")
    assert sasrec["HR@1"]["mean"] == pytest.approx(0.3)
    assert sasrec["HR@1"]["std"] == pytest.approx(0.1414, abs=1e-4)
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| sasrec | 2 | 0.3000 ± 0.1414 |" in text
    assert "| sasrec | 1 | 0.4000 [0.3000, 0.5000] |" in text
    assert (tmp_path / "out" / "table.csv").read_text().count("\n") == 1 + 2 * 3
    assert (tmp_path / "out" / "table.png").stat().st_size > 1000


def test_unfinished_run_is_named(tmp_path: Path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="half"):
        write_report([tmp_path / "half"], tmp_path / "t.md")


def test_llm_runs_get_one_row_per_ranking_mode_and_a_budget_table(tmp_path: Path):
    run = _run(tmp_path, "tallrec", 0, 0.3)
    payload = json.loads((run / "metrics.json").read_text())
    hr1 = {"value": 0.25, "low": 0.2, "high": 0.3}
    valid = {"value": 0.9, "low": 0.85, "high": 0.95}
    payload |= {
        "optimizer_steps": 16,
        "train_samples": 512,
        "train_tokens": 150_000,
        "train_seconds_this_process": 1200.0,
        "test_by_mode": {
            "generate": {"HR@1": hr1, "ValidRatio": valid, "NDCG@10": hr1},  # as older runs recorded it
            "score": payload["test"],
        },
    }
    (run / "metrics.json").write_text(json.dumps(payload))
    rows = write_report([run, _run(tmp_path, "sasrec", 0, 0.2)], tmp_path / "llm.md", title="LLM")
    assert {r["model"] for r in rows} == {"tallrec (generate)", "tallrec (score)", "sasrec"}
    text = (tmp_path / "llm.md").read_text()
    # generate names one candidate: no NDCG@10, shown as a dash rather than a number
    assert "| tallrec (generate) | 1 | 0.2500 ± 0.0000 | — | 0.9000 ± 0.0000 |" in text
    assert "| tallrec (score) | 1 | 0.3000 ± 0.0000 | 0.3000 ± 0.0000 | 1.0000 ± 0.0000 |" in text
    assert "| toy | tallrec | 0 | 512 | 16 | 150,000 | 20.0 min | 10 |" in text
    assert "sasrec | 0 |" not in text.split("Training budget")[1]  # CRMs have no LLM budget row


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"train_seconds": 1500.0, "train_seconds_this_process": 60.0}, "25.0 min"),  # summed over processes
        (
            {"train_seconds": None, "train_seconds_this_process": 60.0},
            "—",
        ),  # resumed from an older checkpoint
        ({"train_seconds_this_process": 60.0}, "1.0 min"),  # metrics written before the sum was recorded
    ],
)
def test_train_time_prefers_the_sum_over_processes(fields: dict, shown: str) -> None:
    assert train_time(fields) == shown


def test_label_by_name_gives_ablations_rows_of_their_own(tmp_path: Path):
    runs = []
    for name, seed, hr in (("ilora", 0, 0.2), ("ilora", 1, 0.4), ("ilora-k2", 0, 0.1)):
        run = _run(tmp_path, name, seed, hr)
        payload = json.loads((run / "metrics.json").read_text())
        payload |= {"model": "ilora", "run": f"{name}-toy-s{seed}"}  # an ablation keeps its model's name
        (run / "metrics.json").write_text(json.dumps(payload))
        runs.append(run)
    assert {r["model"] for r in write_report(runs, tmp_path / "a.md")} == {"ilora"}
    rows = write_report(runs, tmp_path / "b.md", label_by_name=True)
    assert {r["model"]: len(r["seeds"]) for r in rows} == {"ilora-toy": 2, "ilora-k2-toy": 1}
