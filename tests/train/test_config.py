import dataclasses
import json
import re
from pathlib import Path

import pytest

from recadapt.errors import ConfigError
from recadapt.train.config import load_config, model_options, save_config
from recadapt.train.sections import MONITOR_METRICS, PROTOCOLS, RECBOLE_PREFIX, dataset_label


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=1e-3", "train.epochs=7", "model.name=gru4rec", "data.dataset=lastfm"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 7
    assert cfg.model_name == "gru4rec"
    assert cfg.run_name == "gru4rec-lastfm-next-item-s0"


def test_unknown_field_names_file_line_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: sasrec\ntrain:\n  epochs: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:5" in message and "train.lrr" in message


def test_wrong_type_in_file_and_on_command_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: field 'train.epochs' expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"<command line>: field 'train.seed'"):
        load_config(None, ["train.seed=x"])


def test_bad_protocol_and_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.protocol"):
        load_config(None, ["data.protocol=pairwise"])
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_save_round_trip(tmp_path: Path):
    cfg = load_config(None, ["train.seed=3", "model.hidden=32"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    configs = sorted(root.glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


def test_unknown_adapter_and_history_view_name_the_field():
    """The history view is checked on loading; the adapter kind against the one adapter table
    (:data:`recadapt.adapters.ADAPTERS`) when the recipe checks the run, before any work."""
    from recadapt.train.llm import _check_config

    root = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm\.history'"):
        load_config(root / "ilora.yaml", ["llm.history=oldest"])
    config = load_config(root / "ilora.yaml", ["llm.adapter=dora", "llm.crm_run=runs/x"])
    with pytest.raises(
        ConfigError, match=r"<command line>: field 'llm\.adapter' unknown adapter kind 'dora'"
    ):
        _check_config(config, config.llm)
    config = load_config(root / "ilora.yaml", ["llm.adapter_options={n_experts: many}", "llm.crm_run=runs/x"])
    with pytest.raises(ConfigError, match=r"field 'llm\.adapter_options\.n_experts' expected int"):
        _check_config(config, config.llm)


# --- value checks: every section, the file's line or the command line ------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "train.batch_size=0",
        "train.eval_batch_size=0",
        "train.lr=0",
        "train.lr=-1e-3",
        "train.lr=nan",
        "train.lr=inf",
        "train.weight_decay=-1",
        "train.weight_decay=nan",
        "train.epochs=-1",
        "train.epochs=0",
        "train.patience=-1",
        "train.max_steps_per_epoch=-1",
        "train.num_threads=-1",
        "train.n_boot=0",
        "train.n_boot=-5",
        "train.max_len=0",
        "train.seed=-1",
        "data.split_seed=-1",
    ],
)
def test_out_of_range_train_and_data_values_are_config_errors(override: str):
    """Each of these used to fail only later (ZeroDivisionError, KeyError, nan CIs) or silently train nothing."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^<command line>: field '{re.escape(field)}' must be >"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    ["llm.lr=nan", "llm.lr=0", "llm.projector_lr=nan", "llm.weight_decay=nan", "llm.max_grad_norm=nan"],
)
def test_nan_llm_rates_are_config_errors(override: str):
    """``nan <= 0`` is False, so the old checks let NaN learning rates and weight decay through."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^<command line>: field '{re.escape(field)}' must be >"):
        load_config(None, ["model.name=llara", override])


def test_post_init_errors_name_the_file_line(tmp_path: Path):
    """The sections' own checks run inside load_config, which rewrites their source to FILE:LINE."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: tallrec\ntrain:\n  seed: 1\n  batch_size: 0\nllm:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:5: field 'train.batch_size'"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:7: field 'llm.lr'"):
        load_config(path, ["train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"^<command line>: field 'llm.precision'"):
        load_config(path, ["train.batch_size=8", "llm.lr=1e-3", "llm.precision=fp8"])


def test_mistyped_nested_keys_name_file_and_line(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: ilora\nllm:\n  adapter: moe-lora\n  lora_rr: 4\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:5: field 'llm.lora_rr' unknown field"):
        load_config(path)
    # adapter_options is free-form here (the adapter kind checks it); origin() gives its trainer the line
    path.write_text(
        "model:\n  name: ilora\nllm:\n  adapter: moe-lora\n  adapter_options:\n    n_experst: 4\n"
    )
    config = load_config(path, ["train.seed=2"])
    assert config.origin("llm.adapter_options.n_experst") == f"{path}:6"
    assert config.origin("llm.adapter_options.unwritten") == f"{path}:5"  # the enclosing key's line
    assert config.origin("train.seed") == "<command line>"
    assert dataclasses.replace(config, name="x").origin("llm.adapter") == f"{path}:4"
    assert str(config.error("llm.adapter_options", "bad")) == f"{path}:5: field 'llm.adapter_options' bad"
    assert "_origins" not in config.to_dict()


# --- train.monitor ---------------------------------------------------------------------------------------------


def test_monitor_must_be_a_validation_metric_of_the_protocol():
    """An unknown monitor used to be a KeyError after a whole epoch of training."""
    for protocol, monitor in (("next-item", "NDCG@100"), ("next-item", "AUC"), ("ctr", "NDCG@10")):
        with pytest.raises(ConfigError, match=r"^<command line>: field 'train.monitor' must be auto or"):
            load_config(None, [f"data.protocol={protocol}", f"train.monitor={monitor}"])
    with pytest.raises(ConfigError, match="train.monitor"):
        load_config(None, ["data.protocol=ctr", "train.monitor=LogLoss"])  # lower is better: not a monitor
    for protocol, monitor in (("next-item", "HR@5"), ("full-ranking", "NDCG@50"), ("ctr", "AUC")):
        assert (
            load_config(None, [f"data.protocol={protocol}", f"train.monitor={monitor}"]).train.monitor
            == monitor
        )


def test_monitor_metrics_are_what_evaluation_reports():
    """config.py names the metrics without importing torch; they must be the reports' (all but LogLoss and
    ValidRatio, which early stopping cannot maximise), and ``auto`` must pick one of them."""
    import numpy as np
    import pandas as pd

    from recadapt.tasks.evaluate import monitor_metric, report_from_scores

    base = {"user_id": [0, 1], "history": [np.array([1]), np.array([2])], "target": [3, 4]}
    parts = {
        "next-item": (pd.DataFrame({**base, "candidates": [np.array([3, 4])] * 2}), np.eye(2)),
        "full-ranking": (pd.DataFrame(base), np.random.default_rng(0).random((2, 5))),
        "ctr": (pd.DataFrame({**base, "label": [0, 1]}), np.array([0.2, 0.7])),
        "sampled-ranking": (pd.DataFrame({**base, "candidates": [np.array([3, 4])] * 2}), np.eye(2)),
    }
    assert set(parts) == set(MONITOR_METRICS) == set(PROTOCOLS)
    for protocol, (part, scores) in parts.items():
        report = report_from_scores(scores, part, protocol, n_boot=2)
        assert set(MONITOR_METRICS[protocol]) == set(report) - {"LogLoss", "ValidRatio"}
        assert monitor_metric(protocol) in MONITOR_METRICS[protocol]


# --- duplicate keys, strings YAML would retype ------------------------------------------------------------------


def test_duplicate_keys_name_file_and_both_lines(tmp_path: Path):
    """yaml.safe_load keeps the last of two equal keys, so the first value was silently ignored."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  name: sasrec\ntrain:\n  lr: 0.1\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}:6: field 'train.lr' duplicate key.*line 4"
    ):
        load_config(path)
    path.write_text("train:\n  lr: 0.1\nname: a\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: field 'train' duplicate key.*line 1"):
        load_config(path)


def test_string_fields_keep_the_text_yaml_would_retype(tmp_path: Path):
    """YAML 1.1 reads ``no`` as false and ``007`` as 7; a string field takes the text as written."""
    assert load_config(None, ["model.name=tallrec", "llm.precision=no"]).llm.precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("name: 007\nmodel:\n  name: tallrec\nllm:\n  precision: no\n  crm_run: off\n  dtype: ~\n")
    config = load_config(path)
    assert (config.name, config.llm.precision, config.llm.crm_run, config.llm.dtype) == (
        "007",
        "no",
        "off",
        None,
    )
    assert load_config(None, ["data.data_dir=null"]).data.data_dir is None  # optional strings still take null
    assert load_config(path, ["name=1e3"]).name == "1e3"


# --- run directory names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../x", "a/b", "a\\b", "..", ".", "/abs", "   ", "a\0b", "C:x"])
def test_run_name_is_one_directory_under_output_dir(name: str, tmp_path: Path):
    """``name=../../x`` used to write (and an LLM run to delete files) outside output_dir."""
    if name.strip():  # (YAML reads a blank override as nothing at all: the derived name, see below)
        with pytest.raises(ConfigError, match=r"^<command line>: field 'name'"):
            load_config(None, [f"name={name}"])
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  name: sasrec\nname: {json.dumps(name)}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: field 'name'"):
        load_config(path)


def test_safe_run_names_and_derived_parts():
    assert load_config(None, ["name=my-run.v2"]).run_dir == Path("runs") / "my-run.v2"
    for blank in ("name=", "name=   "):  # nothing given: derived (the bug made a directory named "None")
        assert load_config(None, [blank]).run_name == "sasrec-ml-100k-next-item-s0"
    for override, field in (("model.name=../x", "model.name"), ("data.dataset=../../x", "data.dataset")):
        with pytest.raises(ConfigError, match=rf"^<command line>: field '{re.escape(field)}'.*set name="):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="field 'data.dataset'"):
        load_config(None, ["data.dataset=recbole:a/.."])
    assert load_config(None, ["data.dataset=recbole:a/..", "name=ok"]).run_name == "ok"


def test_recbole_run_name_uses_the_dataset_name():
    """``recbole:path/to/NAME`` used to give the run directory ``path_to_NAME`` (an absolute path: all of it)."""
    from recadapt.data.readers.recbole import locate
    from recadapt.data.registry import RECBOLE_PREFIX as REGISTRY_PREFIX

    assert RECBOLE_PREFIX == REGISTRY_PREFIX
    for dataset in ("recbole:path/to/NAME", "recbole:/abs/path/NAME/", "recbole:NAME"):
        assert load_config(None, [f"data.dataset={dataset}"]).run_name == "sasrec-NAME-next-item-s0"
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "recbole" / "patterns" / "patterns"
    assert dataset_label(f"recbole:{fixture}") == locate(fixture)[1] == "patterns"


# --- the model section (validated by the model's config class) -------------------------------------------------


def test_model_options_name_field_and_line(tmp_path: Path):
    """The CRM trainer's model checks said only ``config`` (unknown key) or nothing at all (n_layers 0)."""
    from recadapt.cf import SASRecConfig

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: sasrec\n  n_layers: 0\n  hidden_size: 32\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}:3: field 'model.n_layers' n_layers must be"
    ):
        model_options(load_config(path), SASRecConfig)
    with pytest.raises(ConfigError, match=r"^<command line>: field 'model.n_heads' n_heads must divide"):
        model_options(load_config(path, ["model.n_layers=1", "model.n_heads=0"]), SASRecConfig)
    with pytest.raises(ConfigError, match=r"^<command line>: field 'model.n_layrs' unknown field for sasrec"):
        model_options(load_config(path, ["model.n_layrs=2"]), SASRecConfig)
    path.write_text("model:\n  name: sasrec\n  hidden_size: many\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}:3: field 'model.hidden_size' expected int"
    ):
        model_options(load_config(path), SASRecConfig)
    assert model_options(load_config(None, ["model.hidden_size=32.0"]), SASRecConfig) == {"hidden_size": 32}


def test_projector_curriculum_objective_and_placement_are_checked_and_name_the_field():
    root = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm\.projector' must be one of"):
        load_config(root / "llara.yaml", ["llm.projector=linear"])
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm\.curriculum' must be one of"):
        load_config(root / "llara.yaml", ["llm.curriculum=cosine"])
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm\.objective' must be one of"):
        load_config(root / "llara.yaml", ["llm.objective=pairwise"])
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm\.item_placement' must be one of"):
        load_config(root / "llara.yaml", ["llm.item_placement=inside"])
    overrides = [
        "llm.projector=scaled",
        "llm.curriculum=hybrid",
        "llm.objective=both",
        "llm.item_placement=before",
    ]
    config = load_config(root / "llara.yaml", overrides)
    assert (config.llm.projector, config.llm.curriculum) == ("scaled", "hybrid")
    assert (config.llm.objective, config.llm.item_placement) == ("both", "before")


def test_sampled_ranking_negatives_are_checked_and_name_the_split() -> None:
    config = load_config(None, ["data.protocol=sampled-ranking", "data.negatives=popularity"])
    assert config.data.protocol_params() == {"negatives": "popularity"}
    assert (
        load_config(None, ["data.protocol=sampled-ranking", "data.n_negatives=19"]).data.protocol_params()
        == {}
    )
    with pytest.raises(ConfigError, match=r"<command line>.*data.negatives.*only sampled-ranking"):
        load_config(None, ["data.protocol=next-item", "data.negatives=popularity"])
    with pytest.raises(ConfigError, match=r"data.negatives.*must be one of"):
        load_config(None, ["data.protocol=sampled-ranking", "data.negatives=hard"])
    with pytest.raises(ConfigError, match=r"data.n_negatives"):
        load_config(None, ["data.protocol=sampled-ranking", "data.n_negatives=0"])
