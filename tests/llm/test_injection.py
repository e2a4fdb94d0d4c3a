"""Projected CRM item embeddings at placeholder positions, and LLaRA's curriculum schedule."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import pytest
import torch
from tiny_llm import tiny_llama
from transformers import LlamaForCausalLM

from recadapt.llm.injection import (
    CurriculumSchedule,
    HybridSchedule,
    ItemEmbedder,
    ItemProjector,
    VocabProjector,
    anchor_token_ids,
    build_projector,
    inject_item_embeddings,
)

VOCAB = 40
PLACEHOLDER = VOCAB - 1
HIDDEN = 32
CF_DIM = 8
N_ITEMS = 10


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden_size=HIDDEN)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [2, 12] with placeholders at known positions, their (row, position) pairs and item ids."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB - 1, (2, 12), generator=generator)
    positions = torch.tensor([[0, 2], [0, 5], [0, 6], [1, 1], [1, 9]])
    input_ids[positions[:, 0], positions[:, 1]] = PLACEHOLDER
    item_ids = torch.tensor([3, 0, 3, 9, 5])
    return input_ids, positions, item_ids


def test_injected_rows_are_the_projected_items_and_nothing_else_changes() -> None:
    torch.manual_seed(0)
    embeds = torch.randn(2, 12, HIDDEN)
    _, positions, item_ids = _batch()
    table = torch.randn(N_ITEMS, CF_DIM)
    projector = ItemProjector(CF_DIM, HIDDEN)
    out = inject_item_embeddings(embeds, positions, item_ids, table, projector)
    assert out.shape == embeds.shape and out.dtype == embeds.dtype
    expected = projector(table[item_ids])
    assert torch.equal(out[positions[:, 0], positions[:, 1]], expected)
    untouched = torch.ones(2, 12, dtype=torch.bool)
    untouched[positions[:, 0], positions[:, 1]] = False
    assert torch.equal(out[untouched], embeds[untouched])
    assert not torch.equal(out, embeds)  # out of place: the input is left as it was
    assert inject_item_embeddings(embeds, positions[:0], item_ids[:0], table, projector) is embeds


def test_forward_with_injected_embeddings_trains_the_projector_not_the_crm(model: LlamaForCausalLM) -> None:
    input_ids, positions, item_ids = _batch()
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    table = torch.randn(N_ITEMS, CF_DIM, requires_grad=True)  # even a table that requires grad stays frozen
    projector = ItemProjector(CF_DIM, HIDDEN)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = model.get_input_embeddings()(input_ids)
        embeds = inject_item_embeddings(embeds, positions, item_ids, table, projector)
        assert embeds.dtype == torch.float32  # the embedding layer's dtype, not autocast's
        loss = model(inputs_embeds=embeds, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert table.grad is None
    # the placeholder's own embedding row was replaced everywhere, so it gets no gradient
    assert model.get_input_embeddings().weight.grad[PLACEHOLDER].abs().sum() == 0


def test_user_placeholders_take_the_rows_user_vectors_through_the_same_projector() -> None:
    """``llm.user_token``: a USER_ITEM_ID placeholder gets ``projector(users[row])``, items keep theirs, and a
    batch holding one without user vectors is refused."""
    from recadapt.llm.encoding import EncodedBatch
    from recadapt.llm.prompts import USER_ITEM_ID

    torch.manual_seed(0)
    input_ids, positions, item_ids = _batch()
    item_ids = torch.tensor([USER_ITEM_ID, 0, 3, USER_ITEM_ID, 5])
    batch = EncodedBatch(input_ids, torch.ones_like(input_ids), None, positions, item_ids)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    table, users = torch.randn(N_ITEMS, CF_DIM), torch.randn(2, CF_DIM)
    projector = ItemProjector(CF_DIM, HIDDEN)
    out = ItemEmbedder(embedding, table, projector)(batch, users)
    rows, cols = positions.unbind(1)
    expected = projector(torch.stack([users[0], table[0], table[3], users[1], table[5]]))
    torch.testing.assert_close(out[rows, cols], expected)
    with pytest.raises(ValueError, match="user vector"):
        ItemEmbedder(embedding, table, projector)(batch)


def test_projector_shape_and_dtype() -> None:
    projector = ItemProjector(CF_DIM, HIDDEN).to(torch.bfloat16)
    out = projector(torch.randn(5, CF_DIM))  # fp32 CRM rows into a bf16 projector
    assert out.shape == (5, HIDDEN) and out.dtype == torch.bfloat16
    layers = [type(m).__name__ for m in projector.net]
    assert layers == ["Linear", "GELU", "Linear"]
    embeds = torch.zeros(1, 4, HIDDEN)
    injected = inject_item_embeddings(
        embeds, torch.tensor([[0, 1]]), torch.tensor([2]), torch.randn(N_ITEMS, CF_DIM), projector
    )
    assert injected.dtype == torch.float32


def test_bad_arguments_are_reported() -> None:
    embeds = torch.zeros(2, 12, HIDDEN)
    _, positions, item_ids = _batch()
    table = torch.randn(N_ITEMS, CF_DIM)
    projector = ItemProjector(CF_DIM, HIDDEN)
    with pytest.raises(IndexError, match="PAD"):
        inject_item_embeddings(embeds, positions, torch.tensor([3, 0, 3, N_ITEMS, 5]), table, projector)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        inject_item_embeddings(embeds, positions[:, 0], item_ids, table, projector)
    with pytest.raises(ValueError, match="N = 5"):
        inject_item_embeddings(embeds, positions, item_ids[:4], table, projector)
    with pytest.raises(ValueError, match="hidden size"):
        inject_item_embeddings(embeds, positions, item_ids, table, ItemProjector(CF_DIM, 16))


def test_curriculum_probability_rises_linearly_from_zero_to_one() -> None:
    schedule = CurriculumSchedule(total_steps=200, seed=3)
    assert [schedule.probability(s) for s in (0, 50, 100, 200, 500)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert not any(schedule.use_hybrid(0, sub) for sub in range(50))
    assert all(schedule.use_hybrid(200 + s) for s in range(50))
    # empirical frequency in a window tracks p: steps 140..159 have p ~ 0.75
    hits = sum(schedule.use_hybrid(step, sub) for step in range(140, 160) for sub in range(50))
    assert 0.68 < hits / 1000 < 0.82
    with pytest.raises(ValueError, match="total_steps"):
        CurriculumSchedule(0)
    with pytest.raises(ValueError, match="step"):
        schedule.probability(-1)


def test_curriculum_decisions_are_seeded_and_survive_a_resume() -> None:
    run = CurriculumSchedule(total_steps=100, seed=7)
    decisions = [run.use_hybrid(step) for step in range(100)]
    resumed = CurriculumSchedule(total_steps=100, seed=7)  # a fresh process resuming at step 60
    assert [resumed.use_hybrid(step) for step in range(60, 100)] == decisions[60:]
    assert [run.use_hybrid(step) for step in reversed(range(100))] == decisions[::-1]  # order-free
    other_seed = [CurriculumSchedule(total_steps=100, seed=8).use_hybrid(step) for step in range(100)]
    assert other_seed != decisions
    assert 0 < sum(decisions) < 100


def _clustered_table(n_clusters: int = 4, per_cluster: int = 6, dim: int = 16, seed: int = 0) -> tuple:
    """A CRM-like table of small entries (SASRec's rows have norm ~0.75): tight clusters around random centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=generator)
    rows = centres.repeat_interleave(per_cluster, 0) + 0.3 * torch.randn(
        n_clusters * per_cluster, dim, generator=generator
    )
    table = 0.75 * rows / rows.norm(dim=1, keepdim=True)
    return table, torch.arange(n_clusters).repeat_interleave(per_cluster)


def _cosines(vectors: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(len(clusters), dtype=torch.bool)
    return float(cos[same & off].mean()), float(cos[~same].mean())


def test_mlp_projector_collapses_small_embeddings_and_scaled_keeps_their_geometry() -> None:
    """The measured cause of issue 17: LLaRA's MLP at PyTorch's default init maps unrelated small CRM rows to
    nearly one vector; the scaled projector keeps clusters apart, at the token embeddings' norm."""
    table, clusters = _clustered_table()
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    target = float(embedding.weight.detach().norm(dim=1).mean())
    torch.manual_seed(0)
    mlp = build_projector("mlp", table, embedding)
    scaled = build_projector("scaled", table, embedding)
    with torch.no_grad():
        _, mlp_across = _cosines(mlp(table), clusters)
        scaled_out = scaled(table)
    _, raw_across = _cosines(table, clusters)
    scaled_within, scaled_across = _cosines(scaled_out, clusters)
    assert mlp_across > raw_across + 0.4  # unrelated items end up nearly parallel
    assert scaled_across < raw_across + 0.25 and scaled_within > scaled_across + 0.4
    assert torch.allclose(scaled_out.norm(dim=1), torch.full((len(table),), target), rtol=1e-4)


def test_scaled_projector_standardisation_is_saved_and_blind_to_row_order() -> None:
    """The shuffled-CRM probe permutes the table's rows: the standardisation must not change with it, and a
    reloaded projector must use the statistics it trained with, not the table it is handed."""
    table, _ = _clustered_table()
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    torch.manual_seed(0)
    projector = build_projector("scaled", table, embedding)
    permuted = build_projector("scaled", table[torch.randperm(len(table))], embedding)
    assert torch.allclose(projector.standardise.mean, permuted.standardise.mean, atol=1e-6)
    assert torch.allclose(projector.standardise.std, permuted.standardise.std)
    reloaded = build_projector("scaled", 5 * table + 1, embedding)
    reloaded.load_state_dict(projector.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(table), projector(table))


def test_vocab_projector_mixes_real_tokens_and_shares_them_within_a_cluster() -> None:
    table, clusters = _clustered_table()
    anchors = torch.randn(12, HIDDEN)
    torch.manual_seed(0)
    projector = VocabProjector(table, anchors, sharpness=4.0)
    with torch.no_grad():
        weights = torch.softmax(projector.logits(projector.standardise(table)), dim=-1)
        out = projector(table)
    assert torch.allclose(weights.sum(-1), torch.ones(len(table)))
    assert torch.allclose(out, weights @ anchors, atol=1e-5)
    top = weights.argmax(-1)
    same = clusters[:, None] == clusters[None, :]
    agree = top[:, None] == top[None, :]
    off = ~torch.eye(len(table), dtype=torch.bool)
    assert agree[same & off].float().mean() > agree[~same].float().mean() + 0.3


class _WordTokenizer:
    """A vocabulary of words, fragments and specials, decoded as a byte-level BPE tokenizer decodes them."""

    pieces = [" " + w for w in ("music", "river", "stone", "light", "garden", "window")] + [
        "ab",
        " x",
        "<s>",
        "!!",
    ]
    all_special_ids = [8]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_anchor_tokens_are_seeded_words() -> None:
    tokenizer = _WordTokenizer()
    chosen = anchor_token_ids(tokenizer, k=4, seed=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == 4 and set(chosen) <= set(range(6))
    assert anchor_token_ids(tokenizer, k=4, seed=0) == chosen
    assert set(anchor_token_ids(tokenizer, k=8)) <= set(range(10)) - {8}  # too few words: any non-special id
    with pytest.raises(ValueError, match="fewer than k"):
        anchor_token_ids(tokenizer, k=10)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("linear", torch.zeros(3, 2), torch.nn.Embedding(4, 2))


def test_hybrid_schedule_uses_hybrid_prompts_from_the_first_step() -> None:
    schedule = HybridSchedule(total_steps=10, seed=0)
    assert all(schedule.use_hybrid(step, sub) for step in range(12) for sub in range(3))
    assert schedule.probability(0) == 1.0
