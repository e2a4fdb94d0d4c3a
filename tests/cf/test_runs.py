"""What the LLM and full-ranking methods read from a CRM run: the shuffled-CRM probe's permutation, conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recadapt.cf import build_crm
from recadapt.cf.runs import CondSource, permute_crm_items, shuffled_item_map

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


def test_din_reads_its_target_aware_representation_into_its_logit() -> None:
    """DIN's ``target_representation`` is what its output layer reads (the logit is a linear readout of it), it
    depends on the target, and CRMs without one say so."""
    torch.manual_seed(0)
    din = build_crm("din", n_items=N_ITEMS, n_users=3, hidden_size=8, mlp_hidden=[6, 5]).eval()
    batch = {"history": torch.tensor([[din.pad_id, 3, 7], [5, 2, 9]]), "user_id": torch.tensor([0, 2])}
    target = torch.tensor([4, 1])
    with torch.no_grad():
        representation = din.target_representation(batch, target)
        assert representation.shape == (2, din.target_representation_dim) == (2, 5)
        logit = din.score_candidates(batch, target[:, None])[:, 0]
        torch.testing.assert_close(din.mlp[-1](representation)[:, 0], logit)
        assert not torch.allclose(representation, din.target_representation(batch, torch.tensor([6, 1])))
    sasrec = build_crm("sasrec", n_items=N_ITEMS, hidden_size=8, n_heads=2, max_len=6)
    assert din.target_aware and not sasrec.target_aware
    with pytest.raises(NotImplementedError, match="sasrec has no target-aware representation"):
        sasrec.target_representation(batch, target)


def test_target_conditioning_reads_the_query_item_and_the_probe_permutes_it() -> None:
    """``crm-target`` feeds DIN's representation of (history, query item); the shuffled probe maps the query item
    through the same permutation as the history; rows without a query item (next-item prompts) are refused."""
    torch.manual_seed(0)
    din = build_crm("din", n_items=N_ITEMS, hidden_size=8, mlp_hidden=[6]).eval()
    source = CondSource(kind="crm-target", dim=6, history_len=4, crm=din)
    users, histories = np.array([0, 1]), [np.array([3, 7, 1]), np.array([5, 2, 9, 4, 8])]
    cond = source(users, histories, np.array([4, 1]))
    assert cond.shape == (2, 6)
    assert not torch.allclose(cond[0], source(users, histories, np.array([6, 1]))[0])
    item_map = shuffled_item_map(N_ITEMS, seed=3)
    probe = CondSource(kind="crm-target", dim=6, history_len=4, crm=din, item_map=item_map)
    mapped = source(users, [item_map[h] for h in histories], item_map[np.array([4, 1])])
    torch.testing.assert_close(probe(users, histories, np.array([4, 1])), mapped)
    with pytest.raises(ValueError, match="query item"):
        source(users, histories, np.array([4, -1]))
    with pytest.raises(ValueError, match="query item"):
        source(users, histories)
