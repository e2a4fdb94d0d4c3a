"""Adding an adapter kind takes one module, one registry row and one config: here a kind that exists only in this
test (LoRA with a trainable output bias) trains through the LLM recipe, is saved, and a reloaded run reproduces
its metrics, with no change anywhere in recadapt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch.nn.functional as F
from tiny_llm import save_tiny_backbone
from torch import Tensor, nn

from recadapt.adapters import ADAPTERS
from recadapt.adapters.base import AdapterConfig, AdapterLayer, kaiming_uniform_
from recadapt.adapters.lora import no_conditioner
from recadapt.adapters.registry import AdapterKind
from recadapt.cli import main

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"

pytestmark = pytest.mark.usefixtures("single_thread")


# --- the module: a config and a layer ---------------------------------------------------------------------------
@dataclass
class BiasLoRAConfig(AdapterConfig):
    kind: ClassVar[str] = "bias-lora"


class BiasLoRALayer(AdapterLayer):
    """``delta = B A x + bias``: LoRA plus a trainable shift of each output."""

    def __init__(self, base_layer: nn.Linear, config: BiasLoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.lora_A = kaiming_uniform_(self.new_parameter(self.r, self.in_features))
        self.lora_B = nn.init.zeros_(self.new_parameter(self.out_features, self.r))
        self.bias = nn.init.zeros_(self.new_parameter(self.out_features))

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) + self.bias


# --- the config -------------------------------------------------------------------------------------------------
CONFIG = """\
model:
  name: tallrec
llm:
  adapter: bias-lora
  lora_r: 4
  lora_target_modules: [q_proj, v_proj]
  lr: 1.0e-2
  batch_size: 4
  grad_accum: 2
  train_samples: 16
  epochs: 1
  eval_samples: 12
  eval_modes: [score]
  checkpoint_every: 50
train:
  n_boot: 20
  num_threads: 1
"""


def test_a_kind_defined_in_a_test_trains_saves_and_reloads(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(
        ADAPTERS, "bias-lora", AdapterKind(BiasLoRAConfig, BiasLoRALayer, no_conditioner)
    )  # the row
    (tmp_path / "bias-lora.yaml").write_text(CONFIG)
    save_tiny_backbone(tmp_path / "backbone")
    args = [
        "train",
        "--config",
        str(tmp_path / "bias-lora.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"output_dir={tmp_path / 'runs'}",
        "name=bias",
        f"llm.backbone={tmp_path / 'backbone'}",
    ]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "bias"
    saved = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == "bias-lora"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "score": metrics["test_by_mode"]["score"]
    }
