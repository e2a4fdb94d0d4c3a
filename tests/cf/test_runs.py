"""What the LLM and full-ranking methods read from a CRM run: the shuffled-CRM probe's permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recadapt.cf import build_crm
from recadapt.cf.runs import permute_crm_items, shuffled_item_map

N_ITEMS = 12


def test_the_probe_permutation_is_seeded_and_a_permutation() -> None:
    first = shuffled_item_map(N_ITEMS, seed=0)
    assert sorted(first) == list(range(N_ITEMS)) and not np.array_equal(first, np.arange(N_ITEMS))
    assert np.array_equal(first, shuffled_item_map(N_ITEMS, seed=0))
    assert not np.array_equal(first, shuffled_item_map(N_ITEMS, seed=1))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_a_permuted_crm_reads_item_i_as_item_map_i(name: str) -> None:
    """After ``permute_crm_items`` the CRM's view of history ``h`` is the original CRM's view of ``map[h]``
    (user representation, history states, item rows), and its PAD row stays zero."""
    torch.manual_seed(0)
    original = build_crm(name, n_items=N_ITEMS, hidden_size=8, n_heads=2, max_len=6).eval()
    permuted = build_crm(name, n_items=N_ITEMS, hidden_size=8, n_heads=2, max_len=6).eval()
    permuted.load_state_dict(original.state_dict())
    item_map = shuffled_item_map(N_ITEMS, seed=3)
    permute_crm_items(permuted, item_map)
    history = torch.tensor([[original.pad_id, 3, 7, 1, 0, 11], [5, 5, 2, 9, 4, 8]])
    mapped = history.clone()
    real = history != original.pad_id
    mapped[real] = torch.from_numpy(item_map)[history[real]]
    with torch.no_grad():
        torch.testing.assert_close(
            permuted.user_representation({"history": history}),
            original.user_representation({"history": mapped}),
        )
        states, mask = permuted.history_states({"history": history})
        expected, expected_mask = original.history_states({"history": mapped})
        torch.testing.assert_close(states, expected)
        assert torch.equal(mask, expected_mask)
        assert torch.equal(permuted.item_embedding.weight[permuted.pad_id], torch.zeros(8))
        assert not torch.equal(permuted.user_representation({"history": history}),
                               original.user_representation({"history": history}))  # fmt: skip
