"""``benchmarks/gate_spread.py``'s member spread: 0 for a bank of equal members, larger as they part."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import benchmark_module


def test_member_spread_is_zero_for_equal_members_and_grows_as_they_part() -> None:
    with benchmark_module("gate_spread") as gate_spread:
        b = torch.randn(1, 6, 2).expand(8, 6, 2).clone()
        equal = {"layer.lora_B": b, "layer.lora_A": torch.randn(8, 2, 5), "conditioner.x": torch.randn(3)}
        assert gate_spread.member_spread(equal) == pytest.approx(0.0, abs=1e-6)
        parted = {"layer.lora_B": b + 0.5 * torch.randn_like(b)}
        spread = gate_spread.member_spread(parted)
        assert 0.2 < spread < 1.0
        centred = {"layer.lora_B": torch.stack([b[0], -b[0]])}  # mean 0: members as far apart as can be
        assert gate_spread.member_spread(centred) > 1e3
