"""Several processes, one run: data parallelism for every recipe (LLM, full ranking, CRM).

Launch with ``recadapt train --processes N ...`` (torchrun underneath), ``torchrun --nproc_per_node N -m
recadapt.cli train ...``, or ``accelerate launch`` with a config from ``configs/accelerate/`` (docs/scaling.md).

The rules, the same in every recipe:

- Every process plans the same global batches (the plan depends on the seed and epoch only) and takes a
  contiguous share of each (:func:`shard`): a global batch means the same thing whatever the process count, so
  a run's result does not depend on it (to float tolerance).
- A loss is summed over the share and divided by the count over *all* shares (:func:`global_sum`), and the
  gradients are averaged explicitly (:func:`average_gradients`) after the backward: the update is the one a single
  process computes on the whole batch, even when the shares are uneven or one is empty. No DDP wrapper: the packed
  candidate scoring of the listwise objective calls the model twice per loss, which DDP's reducer refuses.
- Rank 0 writes checkpoints, logs and metrics; every process reads what it wrote after a barrier.

On a machine without a GPU, torchrun's processes get accelerate's CPU backend (gloo): accelerate enables it only
when told (``ACCELERATE_USE_CPU``), and would otherwise run each process as a separate single-process job.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when not launched by torchrun or
    accelerate)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 1


def needs_cpu_backend() -> bool:
    """Whether this process group must run on the CPU: launched with several processes on a machine whose
    accelerator is absent (or hidden)."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's process state, with the CPU backend (gloo) when several processes run without a GPU. Call this
    (or :func:`recadapt.train.precision.make_accelerator`) before anything else touches ``PartialState``: the first
    call fixes the process group."""
    from accelerate import PartialState

    if needs_cpu_backend():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return PartialState(cpu=True)
    return PartialState()


def shard(batch: Sequence[T] | np.ndarray, rank: int, world: int) -> Sequence[T] | np.ndarray:
    """This process's contiguous share of a global batch (sizes differ by at most one; a share may be empty when
    the batch has fewer rows than there are processes). Contiguous keeps length-bucketed rows together."""
    if world == 1:
        return batch
    bounds = np.linspace(0, len(batch), world + 1).round().astype(int)
    return batch[bounds[rank] : bounds[rank + 1]]


def global_sum(value: float | int, device: torch.device | str = "cpu") -> float:
    """``value`` summed over every process (itself when there is one)."""
    if not _distributed():
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total.item())


def average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over every process, in one flat all-reduce; a parameter without a
    gradient on some process (it took no part in that process's forward) counts as zeros there."""
    if not _distributed():
        return
    world = torch.distributed.get_world_size()
    grads: list[Tensor] = []
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    by_type: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for grad in grads:
        by_type.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in by_type.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for grad in group:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def gather_rows(values: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Concatenate each process's ``values`` (first axis, any length) in rank order: every process gets the whole."""
    if not _distributed():
        return values
    from accelerate.utils import gather_object

    parts = [part for part in gather_object([values]) if len(part)]  # an empty share may lack the row shape
    return np.concatenate(parts, axis=0) if parts else values


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def relaunch(argv: Sequence[str], processes: int, *, master_port: int | None = None) -> int:
    """Run ``recadapt ARGV`` as ``processes`` processes on this machine (torchrun's ``--standalone`` rendezvous)
    and return the exit status. Without a GPU each process gets the CPU backend and ``cores / processes``
    threads."""
    import subprocess

    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += ["--standalone"] if master_port is None else ["--master_port", str(master_port)]
    command += ["-m", "recadapt.cli", *argv]
    return subprocess.run(command, env=env, check=False).returncode


def process_rank_and_count() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the process group, (0, 1) without one."""
    if not _distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes a run's files."""
    return process_rank_and_count()[0] == 0


def gather_objects(value: T) -> list[T]:
    """``value`` of every process, in rank order (``[value]`` alone)."""
    if not _distributed():
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preparing a dataset's cache), then the others."""
    rank = process_rank_and_count()[0]
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def restore_rng(saved: dict[str, Any], checkpoint: Path) -> None:
    """Set this process's torch RNG from a checkpoint's ``rng.pt`` (``per_process`` in rank order; a file written
    before it holds one ``torch`` state). Resuming under another process count is refused, naming the way out."""
    from recadapt.errors import ConfigError

    rank, world = process_rank_and_count()
    per_process = saved.get("per_process", [saved["torch"]])
    if len(per_process) != world:
        raise ConfigError(
            checkpoint,
            None,
            f"was written by {len(per_process)} processes, this run has {world}; resume with the same number "
            "or --restart",
        )
    torch.set_rng_state(per_process[rank])


def rng_states() -> dict[str, Any]:
    """What :func:`restore_rng` reads: every process's torch RNG state (collective: all processes call it)."""
    states = gather_objects(torch.get_rng_state())
    return {"torch": states[0], "per_process": states}


def shard_frozen_layers(model: nn.Module, layer_types: Sequence[str]) -> int:
    """Shard the frozen weights of every decoder layer of ``model`` (classes named in ``layer_types``, a
    transformers model's ``_no_split_modules``) across the processes with PyTorch FSDP2; return how many layers.

    The trainable parameters (adapters) are left out (``ignored_params``): they stay whole in every process, so
    saving, loading, the optimizer and :func:`average_gradients` treat them as without sharding, while the base
    weights, which hold the memory of a large backbone, take 1/N per process and are gathered one layer at a time
    in each forward and backward. Every forward is then a collective: all processes must call it alike."""
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    layers = [m for m in model.modules() if type(m).__name__ in set(layer_types)]
    for layer in layers:
        fully_shard(layer, ignored_params=trainable & set(layer.parameters()))
    return len(layers)
