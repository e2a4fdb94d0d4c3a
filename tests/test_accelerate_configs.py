"""The accelerate launch configs in configs/accelerate/: each loads with accelerate's own reader, its process and
machine counts agree, accelerate's launcher reads it as intended, and docs/scaling.md shows how to use it.

No process is started: a multi-GPU launch needs GPUs, and a CPU config would not start several processes anyway
(``accelerate launch --cpu`` runs a single process unless MPI is used; docs/scaling.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
# process counts the docs promise: one GPU, 8 GPUs on one machine, 2 machines x 8 GPUs
EXPECTED = {"single-gpu.yaml": (1, 1), "multi-gpu.yaml": (8, 1), "multi-node.yaml": (16, 2)}


def test_the_documented_configs_are_shipped() -> None:
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_consistent(path: Path) -> None:
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert (config.num_processes, config.num_machines) == EXPECTED[path.name]
    assert 0 <= config.machine_rank < config.num_machines
    # recadapt averages gradients itself: plain data parallelism only (no FSDP, DeepSpeed, or CPU launcher)
    assert config.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
    assert not config.use_cpu
    # recadapt sets autocast from llm.precision; the file must not suggest otherwise
    assert config.mixed_precision == "no"
    assert not config.fsdp_config and not config.deepspeed_config
    if config.distributed_type == DistributedType.NO:
        assert config.num_processes == 1 and config.num_machines == 1
    else:
        assert config.num_processes >= 2
        assert config.num_processes % config.num_machines == 0  # the same number of GPUs on every machine
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port
        assert "PLACEHOLDER" in path.read_text(encoding="utf-8")  # the values each machine must change


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_reads_config_as_intended(path: Path) -> None:
    """What ``accelerate launch --config_file PATH -m recadapt.cli train`` would run, without running it."""
    parser = launch_command_parser()
    args = parser.parse_args(
        ["--config_file", str(path), "-m", "recadapt.cli", "train", "--config", "x.yaml"]
    )
    args, _, _ = _validate_launch_command(args)
    processes, machines = EXPECTED[path.name]
    # multi_gpu selects accelerate's torchrun launcher; otherwise one plain process
    assert args.multi_gpu == (processes > 1)
    assert not (args.cpu or args.use_deepspeed or args.use_fsdp)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert args.module and args.training_script == "recadapt.cli"
    assert args.training_script_args == ["train", "--config", "x.yaml"]


def test_command_line_overrides_the_multi_node_placeholders() -> None:
    parser = launch_command_parser()
    path = CONFIG_DIR / "multi-node.yaml"
    argv = ["--config_file", str(path), "--machine_rank", "1", "--main_process_ip", "10.1.2.3"]
    args, _, _ = _validate_launch_command(parser.parse_args([*argv, "-m", "recadapt.cli", "train"]))
    assert (args.machine_rank, args.main_process_ip) == (1, "10.1.2.3")


def test_scaling_doc_shows_every_config() -> None:
    doc = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    for path in CONFIGS:
        assert f"configs/accelerate/{path.name}" in doc, path.name
