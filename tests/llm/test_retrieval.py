"""ReLLa's semantic user behaviour retrieval: item embeddings, PCA, cosine top-K retrieval, the cache, ReiT views.

Embeddings come from a tiny random Llama with a byte tokenizer (``tiny_llm``) and are checked against a one-text,
unpadded forward. Retrieval is checked on hand-built vectors whose answer is known and against a naive loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_llm import byte_tokenizer, tiny_llama

from recadapt.llm import retrieval
from recadapt.llm.backbone import Backbone
from recadapt.llm.retrieval import (
    backbone_item_vectors,
    embed_item_texts,
    item_vectors,
    mixed_view,
    pca_reduce,
    retrieval_positions,
    retrieve,
    retrieve_many,
)

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN = 32
TEXTS = [
    "Heat",
    "Here is a movie. Its title is Toy Story (1995). Its genre is Animation.",
    "Jumanji (1995)",
    "A much longer description of a film about a board game that comes to life, with jungle animals.",
    "Up",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=HIDDEN, seed=3).eval()
    return model, tokenizer


def reference_embedding(model: torch.nn.Module, tokenizer: object, text: str) -> np.ndarray:
    """One unpadded text through the full causal LM: mean over its tokens of the last (normed) hidden state."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return hidden[0].mean(dim=0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# embed_item_texts


def test_embeddings_match_a_single_unpadded_forward_in_input_order(tiny) -> None:
    model, tokenizer = tiny
    out = embed_item_texts(model, tokenizer, TEXTS, batch_size=64)
    assert out.shape == (len(TEXTS), HIDDEN)
    assert out.dtype == np.float32
    expected = np.stack([reference_embedding(model, tokenizer, t) for t in TEXTS])
    np.testing.assert_allclose(out, expected, atol=2e-5)
    # distinct texts give distinct vectors, so a row swap would not go unnoticed
    assert np.abs(out[0] - out[4]).max() > 1e-3


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_embeddings_do_not_depend_on_batch_size(tiny, batch_size: int) -> None:
    model, tokenizer = tiny
    full = embed_item_texts(model, tokenizer, TEXTS, batch_size=len(TEXTS))
    np.testing.assert_allclose(
        embed_item_texts(model, tokenizer, TEXTS, batch_size=batch_size), full, atol=2e-5
    )


def test_a_short_text_padded_among_long_ones_equals_it_alone(tiny) -> None:
    model, tokenizer = tiny
    alone = embed_item_texts(model, tokenizer, ["Heat"])
    batched = embed_item_texts(model, tokenizer, [TEXTS[3], "Heat", TEXTS[1]], batch_size=8)
    np.testing.assert_allclose(batched[1], alone[0], atol=2e-5)


def test_tokenizer_without_pad_token_pads_with_eos(tiny) -> None:
    model, _ = tiny
    tokenizer = byte_tokenizer()
    expected = embed_item_texts(model, tokenizer, TEXTS)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    np.testing.assert_allclose(embed_item_texts(model, tokenizer, TEXTS, progress=True), expected, atol=2e-5)


def test_model_without_decoder_falls_back_to_hidden_states(tiny) -> None:
    _, tokenizer = tiny
    model = tiny_llama(len(tokenizer), hidden_size=HIDDEN, seed=3).eval()
    expected = embed_item_texts(model, tokenizer, TEXTS)
    model.get_decoder = lambda: None  # as for a wrapper that exposes no decoder
    np.testing.assert_allclose(embed_item_texts(model, tokenizer, TEXTS), expected, atol=2e-5)


def test_empty_text_is_refused(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no tokens"):
        embed_item_texts(model, tokenizer, ["Heat", ""])
    assert embed_item_texts(model, tokenizer, []).shape == (0, HIDDEN)


# ---------------------------------------------------------------------------------------------------------------
# pca_reduce


def anisotropic(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * np.linspace(5.0, 0.5, d) + rng.standard_normal(d) * 10


def test_pca_components_are_orthogonal_and_ordered_by_variance() -> None:
    z = pca_reduce(anisotropic(), 4)
    assert z.shape == (60, 4)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    gram = z.T.astype(np.float64) @ z
    off_diagonal = gram - np.diag(np.diag(gram))
    assert np.abs(off_diagonal).max() < 1e-3 * np.diag(gram).max()
    variances = np.diag(gram)
    assert np.all(np.diff(variances) < 0)


def test_full_pca_is_a_rotation_of_the_centred_data() -> None:
    x = anisotropic()
    z = pca_reduce(x, 8).astype(np.float64)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(z @ z.T, centred @ centred.T, rtol=1e-4, atol=1e-3)


def test_pca_sign_convention_and_determinism() -> None:
    x = anisotropic()
    z = pca_reduce(x, 3)
    np.testing.assert_array_equal(pca_reduce(x, 3), z)
    centred = x - x.mean(axis=0)
    loadings = np.linalg.lstsq(centred, z.astype(np.float64), rcond=None)[0]  # [d, k]: z = centred @ loadings
    largest = np.abs(loadings).argmax(axis=0)
    assert np.all(loadings[largest, np.arange(3)] > 0)
    # negating the data negates the SVD, which the convention must undo in the components
    np.testing.assert_allclose(pca_reduce(-x, 3), -z, atol=1e-4)


@pytest.mark.parametrize(("shape", "dim", "expected"), [((20, 5), 512, 5), ((3, 10), 8, 3), ((30, 10), 4, 4)])
def test_pca_dimension_is_clamped(shape: tuple[int, int], dim: int, expected: int) -> None:
    x = np.random.default_rng(1).standard_normal(shape)
    assert pca_reduce(x, dim).shape == (shape[0], expected)


def test_pca_refuses_bad_dim() -> None:
    with pytest.raises(ValueError):
        pca_reduce(anisotropic(), 0)


# ---------------------------------------------------------------------------------------------------------------
# retrieve


def angle_vectors(degrees: list[float], norms: list[float] | None = None) -> np.ndarray:
    radians = np.deg2rad(degrees)
    scale = np.ones(len(degrees)) if norms is None else np.asarray(norms)
    return (np.stack([np.cos(radians), np.sin(radians)], axis=1) * scale[:, None]).astype(np.float32)


def test_retrieve_keeps_the_most_similar_in_chronological_order() -> None:
    # item 0 is the target; item i sits at the angle below, so cosine to the target falls with the angle
    vectors = angle_vectors([0, 80, 10, 60, 30, 170, 5])
    history = np.array([1, 2, 3, 4, 5, 6])  # oldest first
    np.testing.assert_array_equal(retrieve(history, 0, vectors, 3), [2, 4, 6])
    np.testing.assert_array_equal(retrieve(history[::-1], 0, vectors, 3), [6, 4, 2])


def test_retrieve_ranks_by_cosine_not_dot_product() -> None:
    # item 1 is far longer but 40 degrees off; item 2 is short but 5 degrees off
    vectors = angle_vectors([0, 40, 5, 90], norms=[1.0, 100.0, 0.1, 1.0])
    np.testing.assert_array_equal(retrieve(np.array([1, 2, 3]), 0, vectors, 1), [2])


def test_short_histories_come_back_unchanged() -> None:
    vectors = angle_vectors([0, 90, 45, 10])
    history = np.array([1, 2, 3])
    np.testing.assert_array_equal(retrieve(history, 0, vectors, 3), history)
    np.testing.assert_array_equal(retrieve(history, 0, vectors, 10), history)
    assert retrieve(np.array([], dtype=np.int64), 0, vectors, 2).shape == (0,)
    assert retrieve(history, 0, vectors, 0).shape == (0,)


def test_ties_go_to_the_most_recent() -> None:
    vectors = angle_vectors([0, 20, 70, 20, 20])  # items 1, 3, 4 tie
    np.testing.assert_array_equal(retrieve(np.array([1, 2, 3, 4]), 0, vectors, 2), [3, 4])
    # the same item repeated: its later occurrences win
    np.testing.assert_array_equal(
        retrieval_positions([np.array([1, 2, 1, 2, 1])], [0], vectors, 2)[0], [2, 4]
    )
    # a zero target vector is equally (un)like everything: the most recent items
    vectors[0] = 0.0
    np.testing.assert_array_equal(retrieve(np.array([4, 3, 2, 1]), 0, vectors, 2), [2, 1])


def naive_retrieve(history: np.ndarray, target: int, vectors: np.ndarray, k: int) -> np.ndarray:
    if len(history) <= k:
        return history
    v = vectors.astype(np.float64)
    sims = [float(v[i] @ v[target] / (np.linalg.norm(v[i]) * np.linalg.norm(v[target]))) for i in history]
    best = sorted(range(len(history)), key=lambda p: (-sims[p], -p))[:k]
    return history[sorted(best)]


def test_retrieve_many_equals_a_naive_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "_RETRIEVE_CHUNK", 7)  # several chunks of different widths
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    histories = [rng.integers(0, 200, size=rng.integers(0, 60)) for _ in range(50)]
    targets = rng.integers(0, 200, size=50)
    got = retrieve_many(histories, targets, vectors, 10)
    assert len(got) == len(histories)
    for h, t, g in zip(histories, targets, got, strict=True):
        np.testing.assert_array_equal(g, naive_retrieve(h, int(t), vectors, 10))
        np.testing.assert_array_equal(g, retrieve(h, int(t), vectors, 10))


def test_positions_select_aligned_columns() -> None:
    vectors = angle_vectors([0, 80, 10, 60, 30])
    history = np.array([1, 2, 3, 4])
    ratings = np.array([1.0, 2.0, 3.0, 4.0])
    (positions,) = retrieval_positions([history], [0], vectors, 2)
    np.testing.assert_array_equal(ratings[positions], [2.0, 4.0])


def test_retrieve_refuses_ids_outside_the_vectors() -> None:
    vectors = angle_vectors([0, 10, 20])
    with pytest.raises(ValueError, match="item ids"):
        retrieve(np.array([1, -1, 2]), 0, vectors, 1)
    with pytest.raises(ValueError, match="item ids"):
        retrieve(np.array([1, 2]), 3, vectors, 1)
    with pytest.raises(ValueError, match="targets"):
        retrieve_many([np.array([1, 2])], [0, 1], vectors, 1)


# ---------------------------------------------------------------------------------------------------------------
# cached item vectors


class CountingCompute:
    def __init__(self, n: int, d: int = 12) -> None:
        self.calls = 0
        self.raw = np.random.default_rng(n).standard_normal((n, d)).astype(np.float32)

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.raw


def test_cache_hit_skips_compute_and_stores_safetensors(tmp_path: Path) -> None:
    texts = ["a", "b", "c", "d", "e"]
    compute = CountingCompute(len(texts))
    first = item_vectors("org/model", "ml-1m", texts, compute, dim=3, cache_dir=tmp_path)
    second = item_vectors("org/model", "ml-1m", texts, compute, dim=3, cache_dir=tmp_path)
    assert compute.calls == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, pca_reduce(compute.raw, 3))
    (path,) = tmp_path.glob("*.safetensors")
    assert path.name.startswith("ml-1m-org_model-")
    with safe_open(str(path), framework="numpy") as handle:
        np.testing.assert_array_equal(handle.get_tensor("vectors"), first)
        assert handle.metadata()["dim"] == "3"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize(
    "change",
    [
        {"texts": ["a", "b", "c", "d", "E"]},
        {"dim": 2},
        {"backbone_name": "org/other"},
        {"dataset_key": "ml-100k"},
    ],
)
def test_changed_inputs_recompute(tmp_path: Path, change: dict) -> None:
    args = {
        "backbone_name": "org/model",
        "dataset_key": "ml-1m",
        "texts": ["a", "b", "c", "d", "e"],
        "dim": 3,
    }
    compute = CountingCompute(5)
    item_vectors(compute=compute, cache_dir=tmp_path, **args)
    changed = item_vectors(compute=compute, cache_dir=tmp_path, **{**args, **change})
    assert compute.calls == 2
    assert changed.shape == (5, change.get("dim", 3))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_corrupt_cache_is_recomputed(tmp_path: Path) -> None:
    compute = CountingCompute(4)
    expected = item_vectors("m", "d", list("wxyz"), compute, dim=2, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    np.testing.assert_array_equal(
        item_vectors("m", "d", list("wxyz"), compute, dim=2, cache_dir=tmp_path), expected
    )
    assert compute.calls == 2


def test_compute_must_match_the_texts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compute"):
        item_vectors("m", "d", ["a", "b"], CountingCompute(3), dim=2, cache_dir=tmp_path)


def test_default_cache_dir_is_under_the_recadapt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    item_vectors("m", "d", ["a", "b", "c"], CountingCompute(3), dim=2)
    assert len(list((tmp_path / "recadapt" / "retrieval").glob("d-m-*.safetensors"))) == 1


def test_backbone_item_vectors_embed_then_reduce(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    backbone = Backbone(
        model=model,
        tokenizer=tokenizer,
        name="tiny",
        device=torch.device("cpu"),
        dtype=torch.float32,
        hidden_size=HIDDEN,
        autocast_dtype=None,
    )
    got = backbone_item_vectors(backbone, "toy", TEXTS, dim=512, cache_dir=tmp_path)
    assert got.shape == (len(TEXTS), len(TEXTS))  # clamped by the number of items
    expected = pca_reduce(embed_item_texts(model, tokenizer, TEXTS), 512)
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# ReiT views


def test_mixed_view_is_deterministic_balanced_and_redrawn_each_epoch() -> None:
    epoch0 = [mixed_view(i, seed=7, epoch=0) for i in range(1000)]
    assert epoch0 == [mixed_view(i, seed=7, epoch=0) for i in range(1000)]
    assert all(isinstance(v, bool) for v in epoch0)
    assert 450 <= sum(epoch0) <= 550
    epoch1 = [mixed_view(i, seed=7, epoch=1) for i in range(1000)]
    other_seed = [mixed_view(i, seed=8, epoch=0) for i in range(1000)]
    assert 400 <= sum(a != b for a, b in zip(epoch0, epoch1, strict=True)) <= 600
    assert 400 <= sum(a != b for a, b in zip(epoch0, other_seed, strict=True)) <= 600
