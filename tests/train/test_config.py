from pathlib import Path

import pytest

from recadapt.errors import ConfigError
from recadapt.train.config import load_config, save_config


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


def test_adapter_kinds_named_in_config_are_the_registry():
    """train/config.py lists the adapter kinds without importing torch; they must be exactly the registry's."""
    from recadapt.adapters import ADAPTERS
    from recadapt.train.config import ADAPTER_KINDS

    assert set(ADAPTER_KINDS) == set(ADAPTERS)


def test_unknown_adapter_and_history_view_name_the_field():
    root = Path(__file__).resolve().parents[2] / "configs"
    for override, field in (("llm.adapter=dora", "llm.adapter"), ("llm.history=oldest", "llm.history")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(root / "ilora.yaml", [override])
