"""Shared fixtures for the CRM tests: one tiny configuration per model variant and batch builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from recadapt.cf import SequentialRecommender, build_crm

N_ITEMS = 12
N_USERS = 5
PAD = N_ITEMS


@dataclass(frozen=True)
class Case:
    """A registered model with a tiny configuration."""

    name: str
    n_users: int = N_USERS
    config: dict[str, Any] = field(default_factory=dict)

    def build(self, n_items: int = N_ITEMS) -> SequentialRecommender:
        return build_crm(self.name, n_items=n_items, n_users=self.n_users, **self.config)


CASES = {
    "sasrec": Case("sasrec", config={"hidden_size": 16, "max_len": 8, "n_heads": 2}),
    "gru4rec": Case("gru4rec", config={"hidden_size": 16, "max_len": 8}),
    "caser": Case("caser", config={"hidden_size": 16, "max_len": 4, "n_h": 4, "n_v": 2}),
    "caser-no-users": Case("caser", n_users=0, config={"hidden_size": 16, "max_len": 4, "n_h": 4, "n_v": 2}),
    "bert4rec": Case("bert4rec", config={"hidden_size": 16, "max_len": 8}),
    "din": Case(
        "din",
        config={
            "hidden_size": 16,
            "max_len": 8,
            "attention_hidden": [8],
            "mlp_hidden": [16, 8],
            "chunk_size": 5,
            "n_negatives": 15,
        },
    ),
    "din-dice-no-users": Case(
        "din",
        n_users=0,
        config={
            "hidden_size": 16,
            "max_len": 8,
            "attention_hidden": [8, 4],
            "activation": "dice",
            "chunk_size": 5,
            "n_negatives": 15,
        },
    ),
}


@pytest.fixture(autouse=True)
def _deterministic_single_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(params=list(CASES.values()), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    """Every registered model (some in two variants), tiny."""
    return request.param


@pytest.fixture
def all_cases() -> dict[str, Case]:
    return CASES


def left_pad(histories: list[list[int]], length: int | None = None) -> Tensor:
    """LongTensor of histories left-padded with PAD to ``length`` (default: the longest)."""
    length = max(map(len, histories)) if length is None else length
    return torch.tensor([[PAD] * (length - len(h)) + h for h in histories])


def make_batch(ctr: bool = False) -> dict[str, Tensor]:
    """Four users: short history, full history, no history (all padding), one item."""
    batch = {
        "history": left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [], [9]], length=5),
        "target": torch.tensor([4, 9, 0, 10]),
        "candidates": torch.tensor(
            [[4, 0, 1, 11, 7, 2], [9, 3, 0, 5, 10, 1], [0, 6, 2, 8, 11, 3], [10, 9, 4, 2, 1, 0]]
        ),
        "user_id": torch.tensor([0, 1, 2, 4]),
    }
    if ctr:
        batch["label"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return batch


@pytest.fixture
def batch() -> Callable[..., dict[str, Tensor]]:
    """``batch(ctr=False)``: a fresh batch of four users over N_ITEMS items."""
    return make_batch


@pytest.fixture
def pad_left() -> Callable[..., Tensor]:
    """``pad_left(histories, length=None)``: left-pad lists of item ids with PAD."""
    return left_pad
