"""Mixed precision for the LLM recipes: which ``accelerate`` setting a device gets, and the one rule that makes a
trained run and its reload compute alike (modules without accelerate's wrappers, every forward under one
explicit autocast)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

NATIVE_BF16_ENV = "RECADAPT_NATIVE_BF16"  # 1 / 0: treat the device as running bf16 natively or not


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA with bf16 support, or a CPU with avx512_bf16 or AMX.

    Elsewhere bf16 is emulated; measured on an AVX2-only AMD EPYC, bf16 autocast ran ~7x slower than fp32.
    ``$RECADAPT_NATIVE_BF16`` = 1 or 0 overrides the detection, so one machine can test both choices.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"${NATIVE_BF16_ENV} must be 0 or 1, got {forced!r}")
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch; else read /proc/cpuinfo
    if get_capabilities is not None:
        caps = get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_precision(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """The ``accelerate`` mixed-precision setting (``bf16``, ``fp16`` or ``no``) and why it was chosen."""
    if requested != "auto":
        return requested, "as configured (llm.precision)"
    if native_bf16(device):
        return "bf16", f"{device.type} runs bf16 natively"
    if device.type == "cuda":
        return "fp16", "this GPU lacks bf16"
    return "no", f"{device.type} has no native bf16 (emulated bf16 is slower than fp32)"


def make_accelerator(precision: str, **options: Any) -> Accelerator:
    """An ``Accelerator`` with mixed precision ``precision``. accelerate keeps one process-wide state and refuses
    a second precision in the same process ("AcceleratorState has already been initialized"), so a Python session
    that trains a bf16 run and then an fp32 one resets it first; only in a single-process run, where no other
    rank shares that state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from recadapt.train.distributed import needs_cpu_backend, process_state

    state = process_state()  # first: several CPU processes need the gloo backend before anything else
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision and state.num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=needs_cpu_backend(), **options)
