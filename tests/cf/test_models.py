"""Contract tests for every registered CRM, plus model-specific checks (SASRec, BERT4Rec, DIN, Caser)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from recadapt.cf import CRM_REGISTRY, BERT4Rec, SequentialRecommender, build_crm

N_ITEMS = 12  # the catalogue of conftest's cases and batches


def test_registry_and_build_errors(all_cases) -> None:
    assert set(CRM_REGISTRY) == {"sasrec", "gru4rec", "caser", "bert4rec", "din"}
    assert {case.name for case in all_cases.values()} == set(CRM_REGISTRY), "a model has no test case"
    for name, model_class in CRM_REGISTRY.items():
        assert model_class.name == name
        model = build_crm(name, n_items=N_ITEMS)
        assert isinstance(model, model_class) and isinstance(model.config, model_class.config_class)
    with pytest.raises(ValueError, match="unknown CRM 'nope'.*'sasrec'"):
        build_crm("nope", n_items=N_ITEMS)
    with pytest.raises(ValueError, match="unknown SASRecConfig field.*'n_heads'"):
        build_crm("sasrec", n_items=N_ITEMS, n_head=2)
    with pytest.raises(ValueError, match="n_heads must divide"):
        build_crm("sasrec", n_items=N_ITEMS, hidden_size=10, n_heads=3)
    with pytest.raises(ValueError, match="n_items"):
        build_crm("gru4rec", n_items=0)
    with pytest.raises(ValueError, match=r"DINConfig.mlp_hidden must be tuple\[int, ...\], got \(200, 'x'\)"):
        build_crm("din", n_items=N_ITEMS, mlp_hidden=[200, "x"])
    with pytest.raises(ValueError, match="SASRecConfig.n_layers must be int, got True"):
        build_crm("sasrec", n_items=N_ITEMS, n_layers=True)
    # JSON-like values are normalised: lists to tuples, ints to floats.
    config = build_crm("din", n_items=N_ITEMS, mlp_hidden=[8], dropout=0).config
    assert config.mlp_hidden == (8,) and isinstance(config.dropout, float)


def test_defaults_follow_the_papers() -> None:
    assert build_crm("sasrec", N_ITEMS).config.hidden_size == 64
    assert build_crm("caser", N_ITEMS).config.max_len == 5
    assert build_crm("bert4rec", N_ITEMS).config.mask_prob == 0.2
    assert build_crm("din", N_ITEMS).config.mlp_hidden == (200, 80)
    assert build_crm("din", N_ITEMS).config.n_negatives == 99


@pytest.mark.parametrize("ctr", [False, True], ids=["next-item", "ctr"])
def test_contract_shapes(case, batch, ctr: bool) -> None:
    model = case.build()
    data = batch(ctr=ctr)
    size, n_candidates = data["candidates"].shape
    d = model.embedding_dim

    loss = model.train().loss(data)
    assert loss.shape == () and torch.isfinite(loss)

    model.eval()
    with torch.no_grad():
        outputs = {
            "sequence_representation": (model.sequence_representation(data), (size, d)),
            "user_representation": (model.user_representation(data), (size, d)),
            "item_embeddings": (model.item_embeddings(), (N_ITEMS, d)),
            "score_all": (model.score_all(data), (size, N_ITEMS)),
            "score_candidates": (model.score_candidates(data, data["candidates"]), (size, n_candidates)),
            "loss": (model.loss(data), ()),
        }
    for what, (value, shape) in outputs.items():
        assert value.shape == shape, what
        assert value.dtype == torch.float32, what
        assert torch.isfinite(value).all(), f"{what} is not finite (row 2 has an empty history)"


def test_score_candidates_agree_with_score_all(case, batch) -> None:
    model = case.build().eval()
    data = batch()
    with torch.no_grad():
        expected = model.score_all(data).gather(1, data["candidates"])
        torch.testing.assert_close(model.score_candidates(data, data["candidates"]), expected)
        # One candidate per row is the CTR path.
        target = data["target"][:, None]
        expected = model.score_all(data).gather(1, target)
        torch.testing.assert_close(model.score_candidates(data, target), expected)


def test_extra_left_padding_changes_nothing(case, batch) -> None:
    model = case.build().eval()
    data = batch()
    padded = dict(data, history=F.pad(data["history"], (6, 0), value=model.pad_id))
    with torch.no_grad():
        torch.testing.assert_close(model.sequence_representation(padded), model.sequence_representation(data))
        torch.testing.assert_close(model.score_all(padded), model.score_all(data))


def test_empty_histories_train_without_nan(case, batch) -> None:
    model = case.build().train()
    data = batch()
    data["history"] = torch.full((4, 3), model.pad_id)
    for kind in (data, dict(data, label=torch.ones(4))):
        model.zero_grad()
        loss = model.loss(kind)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_only_the_last_max_len_items_matter(case, pad_left) -> None:
    model = case.build().eval()
    window = model.config.max_len - (1 if isinstance(model, BERT4Rec) else 0)  # BERT4Rec appends [MASK]
    recent = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3][:window]
    data = {
        "history": pad_left([[7, 7, 7, *recent]]),
        "target": torch.tensor([0]),
        "user_id": torch.tensor([1]),
    }
    older_differ = dict(data, history=pad_left([[0, 11, 2, *recent]]))
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(older_differ), model.score_all(data))
        # ...while the window itself matters.
        changed = data["history"].clone()
        changed[0, -window] = 10
        assert not torch.allclose(model.score_all(dict(data, history=changed)), model.score_all(data))


def test_gradients_reach_every_parameter(case, pad_left) -> None:
    model = case.build().train()
    # Histories fill the whole window, so every positional embedding is in use; twelve rows make it unlikely
    # that a ReLU unit (e.g. a Caser filter) is inactive on all of them.
    histories = [[(start + 5 * i) % N_ITEMS for i in range(model.config.max_len)] for start in range(N_ITEMS)]
    targets = torch.arange(N_ITEMS).flip(0)
    data = {"history": pad_left(histories), "target": targets, "user_id": targets % 5}
    (model.loss(data) + model.loss(dict(data, label=(targets % 2).float()))).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def _successor_task(pad_left) -> dict[str, Tensor]:
    """Histories are runs of consecutive ids (mod N_ITEMS) of length 1..6; the target continues the run."""
    histories, targets = [], []
    for start in range(N_ITEMS):
        for length in range(1, 7):
            histories.append([(start + i) % N_ITEMS for i in range(length)])
            targets.append((start + length) % N_ITEMS)
    targets_t = torch.tensor(targets)
    return {"history": pad_left(histories), "target": targets_t, "user_id": targets_t % 5}


def _train(model: SequentialRecommender, data: dict[str, Tensor], steps: int = 60) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(data).backward()
        optimizer.step()
    if any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        # Dice's batch-norm running statistics trail weights that move this fast: refresh them to evaluate.
        with torch.no_grad():
            for _ in range(20):
                model.loss(data)


@torch.no_grad()
def _next_item_quality(model: SequentialRecommender, data: dict[str, Tensor]) -> tuple[float, float]:
    scores = model.eval().score_all(data)
    accuracy = (scores.argmax(1) == data["target"]).float().mean().item()
    return F.cross_entropy(scores, data["target"]).item(), accuracy


@torch.no_grad()
def _ctr_quality(model: SequentialRecommender, data: dict[str, Tensor]) -> tuple[float, float]:
    logits = model.eval().score_candidates(data, data["target"][:, None]).squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, data["label"]).item()
    return loss, ((logits > 0).float() == data["label"]).float().mean().item()


def test_learns_next_item_task(case, pad_left) -> None:
    data = _successor_task(pad_left)
    model = case.build()
    loss_before, _ = _next_item_quality(model, data)
    _train(model, data)
    loss_after, accuracy = _next_item_quality(model, data)
    assert loss_after < 0.3 * loss_before, (loss_before, loss_after)
    assert accuracy >= 0.75  # chance: 1 / 12


def test_learns_ctr_task(case, pad_left) -> None:
    # Positive pairs continue the run; negatives are any other item.
    data = _successor_task(pad_left)
    label = torch.arange(len(data["target"])) % 2 == 0
    other = (data["target"] + torch.randint(1, N_ITEMS, data["target"].shape)) % N_ITEMS
    data = dict(data, target=torch.where(label, data["target"], other), label=label.float())
    model = case.build()
    loss_before, _ = _ctr_quality(model, data)
    _train(model, data)
    loss_after, accuracy = _ctr_quality(model, data)
    assert loss_after < 0.3 * loss_before, (loss_before, loss_after)
    assert accuracy >= 0.9  # chance: 0.5


def test_sasrec_is_causal(pad_left) -> None:
    model = build_crm("sasrec", N_ITEMS, hidden_size=16, max_len=8).eval()
    history = pad_left([[1, 2, 3, 4, 5, 6]], length=8)
    changed = history.clone()
    changed[0, 5] = 9
    with torch.no_grad():
        before, after = model.encode(history), model.encode(changed)
    torch.testing.assert_close(after[:, :5], before[:, :5])  # earlier positions never see position 5
    assert not torch.allclose(after[:, 5:], before[:, 5:])


def test_bert4rec_cloze_loss_reduces_to_inference_without_history_masking(batch) -> None:
    # With mask_prob 0 only the appended target is masked: exactly the inference input, so the cloze loss
    # equals the cross-entropy of score_all (dropout off).
    model = build_crm("bert4rec", N_ITEMS, hidden_size=16, max_len=8, mask_prob=0.0).eval()
    data = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.loss(data), F.cross_entropy(model.score_all(data), data["target"]))


def test_din_sampled_softmax_negatives_exclude_the_target(batch, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_crm("din", N_ITEMS, hidden_size=8, attention_hidden=[4], mlp_hidden=[8], n_negatives=50)
    seen: list[Tensor] = []
    original = model.score_candidates

    def spy(data: dict[str, Tensor], candidates: Tensor) -> Tensor:
        seen.append(candidates)
        return original(data, candidates)

    monkeypatch.setattr(model, "score_candidates", spy)
    data = batch()
    model.loss(data)
    (candidates,) = seen
    assert candidates.shape == (4, 51)
    assert torch.equal(candidates[:, 0], data["target"])
    assert (candidates[:, 1:] != data["target"][:, None]).all()
    assert candidates.min() >= 0 and candidates.max() < N_ITEMS
    assert len(candidates[:, 1:].unique()) > 8  # spread over the catalogue


def test_din_attention_is_not_normalised() -> None:
    # Without softmax normalisation, repeating the history changes the interest (a softmax would undo it).
    model = build_crm("din", N_ITEMS, hidden_size=8, attention_hidden=[4], mlp_hidden=[8]).eval()
    data = {"history": torch.tensor([[N_ITEMS, N_ITEMS, 3, 4]]), "target": torch.tensor([5])}
    doubled = dict(data, history=torch.tensor([[3, 4, 3, 4]]))
    with torch.no_grad():
        assert not torch.allclose(model.score_all(doubled), model.score_all(data))


def test_user_embeddings_need_user_ids(batch) -> None:
    model = build_crm("caser", N_ITEMS, n_users=3)
    data = batch()
    del data["user_id"]
    with pytest.raises(KeyError, match="user_id"):
        model.score_all(data)
    assert build_crm("caser", N_ITEMS, n_users=3, use_user=False).score_all(data).shape == (4, N_ITEMS)
