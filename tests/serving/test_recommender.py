"""``recadapt.load`` on tiny trained runs (the committed RecBole ``patterns`` fixture, a tiny random Llama):
what a Recommender returns equals what the run's own evaluation computes, batched requests equal single ones
(personalized adapters mix per row), bad requests name their field, and LLM runs export self-describing folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from score_spy import record_raw_scores

import recadapt
from recadapt.cli import main
from recadapt.errors import ConfigError
from recadapt.serving import RequestError
from recadapt.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"
DATASET = f"recbole:{FIXTURE}"
TINY_LLM = [
    "train.num_threads=1",
    "train.n_boot=10",
    "llm.train_samples=16",
    "llm.batch_size=4",
    "llm.epochs=1",
    "llm.lr=1e-2",
    "llm.checkpoint_every=50",
    "llm.eval_modes=[score]",
    "llm.eval_samples=12",
    "llm.eval_batch_size=12",
    "llm.precision=no",  # fp32: served and evaluated scores compare to float tolerance on every CPU
]

pytestmark = pytest.mark.usefixtures("single_thread")


def _sasrec(workdir: Path, name: str, *overrides: str) -> Path:
    from recadapt.train.crm import train_crm

    run = workdir / "runs" / name
    if not (run / "metrics.json").exists():
        config = load_config(
            REPO / "configs" / "sasrec.yaml",
            [
                f"data.dataset={DATASET}",
                f"data.prepared_dir={workdir / 'prepared'}",
                f"output_dir={workdir / 'runs'}",
                f"name={name}",
                "model.hidden_size=16",
                "train.epochs=2",
                "train.n_boot=10",
                *overrides,
            ],
        )
        train_crm(config, progress=False)
    return run


def _llm(workdir: Path, method: str, name: str, *extra: str, protocol: str = "next-item") -> Path:
    run = workdir / "runs" / name
    if not (run / "metrics.json").exists():
        args = [
            "--quiet",
            "train",
            "--config",
            str(REPO / "configs" / f"{method}.yaml"),
            f"--dataset={DATASET}",
            f"--protocol={protocol}",
            f"data.prepared_dir={workdir / 'prepared'}",
            f"output_dir={workdir / 'runs'}",
            f"name={name}",
            f"llm.backbone={workdir / 'backbone'}",
            *TINY_LLM,
            *extra,
        ]
        assert main(args) == 0
    return run


def _ilora(workdir: Path) -> Path:
    crm = _sasrec(workdir, "sasrec")
    options = "llm.adapter_options={n_experts: 2, gate: mlp, gate_width: 8}"
    return _llm(workdir, "ilora", "ilora", f"llm.crm_run={crm}", options)


def _assert_same(got: list[list[Any]], expected: list[list[Any]]) -> None:
    """The same items in the same order, scores equal to float tolerance (batching changes the last bits)."""
    assert [[r.item for r in row] for row in got] == [[r.item for r in row] for row in expected]
    for row, other in zip(got, expected, strict=True):
        np.testing.assert_allclose([r.score for r in row], [r.score for r in other], rtol=1e-5, atol=1e-6)


def _raw(recommender: Any, ids: Any) -> list[str]:
    return [recommender.catalogue.raw_ids[int(i)] for i in ids]


# --- conventional recommenders --------------------------------------------------------------------------------


def test_a_crm_recommends_its_catalogue_top_k_without_seen_items(workdir: Path) -> None:
    run = _sasrec(workdir, "sasrec")
    recommender = recadapt.load(run)
    from recadapt.cf.checkpoint import load_crm
    from recadapt.data.batching import pad_histories

    model = load_crm(run / "best").eval()
    history = ["i1", "Item number 2", "i3"]  # ids and titles mix
    ids = np.array([1, 2, 3])
    assert list(recommender.catalogue.items(history, "history")) == [1, 2, 3]
    batch = {"history": torch.from_numpy(pad_histories([ids], 50, model.pad_id))}
    with torch.no_grad():
        logits = model.score_all(batch)[0].numpy().astype(np.float64)
    logits[ids] = -np.inf
    expected = np.argsort(-logits, kind="stable")[:5]
    top = recommender.recommend(history, k=5)
    assert [r.item for r in top] == _raw(recommender, expected)
    np.testing.assert_allclose([r.score for r in top], logits[expected], rtol=1e-6)
    assert top[0].title == recommender.catalogue.titles[expected[0]]

    with_seen = recommender.recommend(history, k=59 + 1, exclude_seen=False)
    assert len(with_seen) == 60 and {"i1", "i2", "i3"} <= {r.item for r in with_seen}
    among = recommender.recommend(history, k=2, candidates=["i7", "i8", "i9", "i1"])
    assert {r.item for r in among} <= {"i7", "i8", "i9"} and len(among) == 2  # i1 is seen
    scored = recommender.score(history, ["i9", "i1"])
    assert [r.item for r in scored] == ["i9", "i1"]
    np.testing.assert_allclose(
        [r.score for r in scored], [logits[9], model.score_all(batch)[0, 1].item()], rtol=1e-5
    )


def test_batched_requests_equal_single_ones(workdir: Path) -> None:
    recommender = recadapt.load(_sasrec(workdir, "sasrec"))
    histories = [["i1"], ["i2", "i3", "i4"], ["i5", "i6"]]
    many = recommender.recommend_many(histories, k=4)
    _assert_same(many, [recommender.recommend(h, k=4) for h in histories])
    cands = [["i10", "i11"], ["i12", "i13", "i14"], ["i15"]]
    many = recommender.recommend_many(histories, k=1, candidates=cands)
    assert many == [
        recommender.recommend(h, k=1, candidates=c) for h, c in zip(histories, cands, strict=True)
    ]


@pytest.mark.parametrize(
    ("call", "field", "words"),
    [
        (lambda r: r.recommend([]), "history", "empty"),
        (lambda r: r.recommend(["i1", "nope"]), "history[1]", "unknown item 'nope'"),
        (lambda r: r.recommend("i1"), "history", "a list"),
        (lambda r: r.recommend(["i1"] * 1001), "history", "at most 1000"),
        (lambda r: r.recommend(["i1"], k=0), "k", "between 1 and 59"),
        (lambda r: r.recommend(["i1"], k=60), "k", "between 1 and 59"),
        (lambda r: r.recommend(["i1"], k=3, candidates=["i2", "i3"]), "k", "between 1 and 2"),
        (lambda r: r.recommend(["i1"], k=True), "k", "an integer"),
        (lambda r: r.recommend(["i1"], candidates=["i1"]), "candidates", "in the history"),
        (lambda r: r.recommend(["i1"], k=1, candidates=["i2", "i2"]), "candidates", "twice"),
        (lambda r: r.recommend([1.5]), "history[0]", "id or title"),
        (lambda r: r.recommend(["i1"], user="nobody"), "user", "unknown user"),
        (lambda r: r.score(["i1"], []), "items", "empty"),
    ],
)
def test_bad_requests_name_their_field(workdir: Path, call: Any, field: str, words: str) -> None:
    recommender = recadapt.load(_sasrec(workdir, "sasrec"))
    with pytest.raises(RequestError) as caught:
        call(recommender)
    assert caught.value.field == field and words in str(caught.value)


def test_a_crm_refuses_a_retriever_and_a_run_dir_must_be_trained(workdir: Path, tmp_path: Path) -> None:
    run = _sasrec(workdir, "sasrec")
    with pytest.raises(ConfigError, match="ranks the whole catalogue"):
        recadapt.load(run, retriever=run)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        recadapt.load(tmp_path)


# --- LLM rankers -----------------------------------------------------------------------------------------------


def _test_rows(recommender: Any) -> Any:
    from recadapt.tasks.evaluate import evaluation_rows

    config = recommender.config
    part = recommender.prepared.parts["test"]
    rows = evaluation_rows(len(part), config.llm.eval_samples, config.data.split_seed)
    return part.iloc[rows].reset_index(drop=True)


def test_an_ilora_run_serves_the_scores_its_evaluation_computes(workdir: Path, monkeypatch) -> None:
    """The personalized ranker: each request's gate reads its own SASRec representation inside one batched
    forward, so served scores equal the evaluation's row by row, and a batch equals its requests one by one."""
    from recadapt.train.llm import evaluate_llm_run

    run = _ilora(workdir)
    recorded = record_raw_scores(monkeypatch)
    evaluate_llm_run(run, progress=False)
    evaluated = np.concatenate(recorded)
    recommender = recadapt.load(run)
    assert recommender.info()["kind"] == "llm" and recommender.info()["retriever"].endswith("sasrec")
    rows = _test_rows(recommender)
    users = [recommender.prepared.users["raw_id"].iloc[int(u)] for u in rows["user_id"]]
    histories = [_raw(recommender, h) for h in rows["history"]]
    candidates = [_raw(recommender, c) for c in rows["candidates"]]
    served = recommender.score_many(histories, candidates, users)
    np.testing.assert_allclose(
        np.array([[r.score for r in s] for s in served]), evaluated, rtol=1e-4, atol=1e-5
    )
    single = [
        recommender.score(h, c, u) for h, c, u in zip(histories[:3], candidates[:3], users[:3], strict=True)
    ]
    np.testing.assert_allclose(
        [[r.score for r in s] for s in single],
        [[r.score for r in s] for s in served[:3]],
        rtol=1e-4,
        atol=1e-5,
    )
    top = recommender.recommend_many(histories[:4], k=3, candidates=candidates[:4], exclude_seen=False)
    for n, picks in enumerate(top):
        best = np.argsort(-evaluated[n], kind="stable")[:3]
        assert [p.item for p in picks] == [candidates[n][i] for i in best]


def test_an_llm_ranker_reranks_its_crms_top_n_when_no_candidates_are_given(workdir: Path) -> None:
    ranker = recadapt.load(_ilora(workdir))
    retriever = recadapt.load(_sasrec(workdir, "sasrec"))
    history = ["i4", "i5", "i6"]
    shortlist = {r.item for r in retriever.recommend(history, k=20)}
    picks = ranker.recommend(history, k=5)
    assert len(picks) == 5 and {p.item for p in picks} <= shortlist
    with pytest.raises(RequestError, match="between 1 and 20"):
        ranker.recommend(history, k=21)
    narrow = recadapt.load(_ilora(workdir), n_candidates=3)
    assert {p.item for p in narrow.recommend(history, k=3)} == {
        r.item for r in retriever.recommend(history, k=3)
    }


def test_a_pipeline_yaml_names_ranker_retriever_and_candidates(workdir: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"ranker: {_ilora(workdir)}\nretriever: {_sasrec(workdir, 'sasrec')}\ncandidates: 4\n",
        encoding="utf-8",
    )
    recommender = recadapt.load(pipeline)
    assert recommender.n_candidates == 4 and len(recommender.recommend(["i1"], k=4)) == 4
    pipeline.write_text(f"ranker: {_ilora(workdir)}\ncandidate: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:2: field 'candidate' unknown key"):
        recadapt.load(pipeline)


def test_a_tallrec_run_without_a_retriever_needs_candidates(workdir: Path) -> None:
    run = _llm(workdir, "tallrec", "tallrec")
    recommender = recadapt.load(run)
    with pytest.raises(RequestError, match="no retrieval stage") as caught:
        recommender.recommend(["i1"], k=3)
    assert caught.value.field == "candidates"
    assert len(recommender.recommend(["i1"], k=2, candidates=["i2", "i3", "i4"])) == 2
    with_stage = recadapt.load(run, retriever=_sasrec(workdir, "sasrec"))
    assert len(with_stage.recommend(["i1"], k=3)) == 3


def test_a_ctr_run_scores_p_yes_as_its_evaluation_does(workdir: Path, monkeypatch) -> None:
    from recadapt.train.llm import evaluate_llm_run

    crm = _sasrec(workdir, "sasrec-ctr", "data.protocol=ctr", "model.max_len=20", "train.max_len=20")
    run = _llm(
        workdir,
        "reclora",
        "reclora-ctr",
        f"llm.crm_run={crm}",
        "llm.adapter_options={n_members: 3, gate_hidden: 8}",
        "train.max_len=3",
        protocol="ctr",
    )
    recorded = record_raw_scores(monkeypatch)
    evaluate_llm_run(run, progress=False)
    evaluated = np.concatenate(recorded)
    recommender = recadapt.load(run)
    rows = _test_rows(recommender)
    kept = np.array(
        [len(h) > 0 for h in rows["history"]]
    )  # a request needs a history; evaluation has cold rows
    assert kept.sum() >= 5
    rows, evaluated = rows[kept].reset_index(drop=True), evaluated[kept]
    raw_users = recommender.prepared.users["raw_id"]
    served = [
        recommender.run_score(
            [
                recommender.query(
                    _raw(recommender, row.history),
                    1,
                    _raw(recommender, [row.target]),
                    False,
                    raw_users.iloc[int(row.user_id)],
                    list(row.history_ratings),
                    scoring=True,
                )
                for row in rows.itertuples()
            ]
        )
    ][0]
    np.testing.assert_allclose([s[0].score for s in served], evaluated, rtol=1e-4, atol=1e-6)
    picks = recommender.recommend(["i1", "i2"], k=3)  # candidates: the CTR SASRec's top 20
    assert len(picks) == 3 and all(0.0 <= p.score <= 1.0 for p in picks)
    assert picks == sorted(picks, key=lambda p: -p.score)


def test_llm_runs_export_self_describing_folders(workdir: Path) -> None:
    """Plain LoRA: PEFT's format, loadable by PeftModel.from_pretrained, the base model as the user named it;
    personalized kinds: recadapt's format naming the base model too; both with the tokenizer beside them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tallrec = _llm(workdir, "tallrec", "tallrec") / "final"
    config = json.loads((tallrec / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(workdir / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(tallrec)
    assert "<|im_end|>" in tokenizer.get_vocab()
    base = AutoModelForCausalLM.from_pretrained(workdir / "backbone")
    peft_model = PeftModel.from_pretrained(base, tallrec)
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) > 0
    personal = _ilora(workdir) / "final"
    saved = json.loads((personal / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == "moe-lora" and saved["base_model_name_or_path"] == str(workdir / "backbone")
    assert (personal / "tokenizer_config.json").exists() and (personal / "projector.safetensors").exists()


def test_recadapt_recommend_prints_titles_and_names_the_option_of_a_bad_value(workdir: Path, capsys) -> None:
    run = _sasrec(workdir, "sasrec")
    expected = recadapt.load(run).recommend(["i1", "i2"], k=3)
    assert main(["recommend", str(run), "--history", "i1,i2", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"{r.title}  [item {r.item}]" in out for r in expected)
    assert main(["recommend", str(run), "--history", "i1", "--json", "--score", "i4,i5"]) == 0
    assert [r["item"] for r in json.loads(capsys.readouterr().out)["items"]] == ["i4", "i5"]
    assert main(["recommend", str(run), "--history", "i1", "--score", "i4,zz"]) == 2
    assert "--score: unknown item 'zz'" in capsys.readouterr().err
