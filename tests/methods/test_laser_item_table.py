"""Laser's cached item table equals the uncached one (every item through ``user_embeddings``) after the trainable
parts move, and is rebuilt when a frozen part changes. A tiny random Llama and an untrained BERT4Rec."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tiny_llm import byte_tokenizer, tiny_llama

from recadapt.cf import build_crm
from recadapt.cf.runs import permute_crm_items
from recadapt.llm.embedding import HistoryPromptBuilder
from recadapt.methods.laser import Laser, LaserConfig, suffix_initialisation

pytestmark = pytest.mark.usefixtures("single_thread")

# byte tokens: prompt lengths differ, several items share one (batches of 3 within a length)
TITLES = ["Toy Story", "Heat", "Casino", "Jumanji", "Sabrina", "GoldenEye", "Fargo", "Se7en", "Babe",
          "Twelve Monkeys", "Braveheart", "Apollo 13", "Clueless", "Balto"]  # fmt: skip
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _laser(use_prefix: bool = True, **config) -> Laser:
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    llm = tiny_llama(len(tokenizer)).eval()
    crm = build_crm("bert4rec", len(TITLES), hidden_size=16, max_len=6)
    prompts = HistoryPromptBuilder(tokenizer, TITLES, instruction="Taste:", tail=" ->")
    options = LaserConfig(
        n_experts=2, n_queries=3, n_blocks=2, hidden=16, n_heads=2, use_prefix=use_prefix, item_batch_size=3,
        **config,
    )  # fmt: skip
    return Laser(llm, crm, prompts, options, suffix_initialisation(llm, tokenizer)).eval()


def _assert_cached_is_uncached(model: Laser) -> torch.Tensor:
    cached = model.item_table()
    torch.testing.assert_close(cached, model.item_table(use_cache=False), **TOLERANCE)
    assert cached.shape == (len(TITLES), model.suffix.numel()) and cached.dtype == torch.float32
    return cached


def _train_steps(model: Laser, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    histories = [np.array([0, 3]), np.array([5]), np.array([2, 7, 9]), np.array([11, 1])]
    targets = torch.tensor([4, 6, 10, 13])
    for _ in range(steps):
        model.eval()
        table = model.item_table()
        model.train()
        loss, _ = model.loss(histories, targets, table)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("use_prefix", [True, False], ids=["prefix", "no-prefix"])
def test_cached_table_equals_uncached_after_optimizer_steps(use_prefix: bool) -> None:
    model = _laser(use_prefix)
    before = _assert_cached_is_uncached(model)
    cache = model._table_cache
    _train_steps(model)
    after = _assert_cached_is_uncached(model)
    assert model._table_cache is cache, "trainable parameters changed: the frozen cache must be kept"
    assert not torch.allclose(before, after, atol=1e-3), "training must move the table (else this is vacuous)"


@pytest.mark.parametrize("use_prefix", [True, False], ids=["prefix", "no-prefix"])
def test_cached_table_follows_perturbed_parameters(use_prefix: bool) -> None:
    model = _laser(use_prefix)
    model.item_table()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    _assert_cached_is_uncached(model)


def test_the_cache_holds_only_frozen_parts() -> None:
    with_prefix, without = _laser(True), _laser(False)
    with_prefix.item_table()
    without.item_table()
    for model in (with_prefix, without):
        cache = model._table_cache
        assert cache is not None
        items = torch.cat([b.items for b in cache.batches])
        assert sorted(items.tolist()) == list(range(len(TITLES)))
        for batch in cache.batches:  # one prompt length per batch: no padding
            lengths = {len(model.prompts.prompt([int(i)])[0]) for i in batch.items}
            assert len(lengths) == 1 and batch.input_ids.shape == (batch.items.numel(), lengths.pop())
            assert batch.items.numel() <= model.config.item_batch_size
    # with the prefix first, no LLM state is frozen: only the CRM's reading of each item is kept
    assert all(b.past is None and b.crm_states is not None for b in with_prefix._table_cache.batches)
    # without it, the prompt's keys and values are; the shared "Taste:\n1. " once (every byte title starts " ")
    cache = without._table_cache
    assert cache.shared_len == len(without.prompts.instruction) + len(without.prompts.number(1)) + 1
    assert all(b.past is not None and b.crm_states is None for b in cache.batches)
    assert cache.kv_bytes > 0


def test_a_frozen_part_edited_in_place_rebuilds_the_cache() -> None:
    model = _laser(True)
    before = model.item_table()
    # in place, as ``recadapt eval --shuffle-crm`` does after the model is built
    permute_crm_items(model.crm, np.roll(np.arange(len(TITLES)), 1))
    after = _assert_cached_is_uncached(model)
    assert not torch.allclose(before, after, atol=1e-4)

    model = _laser(False)
    before = model.item_table()
    with torch.no_grad():
        model.llm.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # a frozen LLM weight: its keys change
    after = _assert_cached_is_uncached(model)
    assert not torch.allclose(before, after, atol=1e-4)


def test_over_the_memory_budget_the_prompt_states_are_not_cached(monkeypatch) -> None:
    model = _laser(False)
    monkeypatch.setattr(Laser, "kv_cache_max_bytes", 1)
    _assert_cached_is_uncached(model)
    assert all(b.past is None for b in model._table_cache.batches)
    _train_steps(model, 1)
    _assert_cached_is_uncached(model)


def test_a_frozen_part_in_training_mode_bypasses_the_cache() -> None:
    model = _laser(True)
    model.item_table()
    model.crm.train()  # never under Laser.train(); here by hand: CRM dropout would make the cached states stale
    torch.manual_seed(0)
    dropped = model.item_table()
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, model.item_table(use_cache=False), **TOLERANCE)
