"""ReLLa's semantic user behaviour retrieval (SUBR) and the mixed training views of its instruction tuning (ReiT).

A long history does not fit an LLM prompt, and the K most recent items are often unrelated to the target. SUBR
instead keeps the K history items whose text is semantically closest to the target's:

1. :func:`embed_item_texts` encodes every item's text with the backbone: the mean over the real tokens of the
   final-layer hidden state (after the final norm).
2. :func:`pca_reduce` projects those vectors onto their top principal components (512 in ReLLa, or fewer when the
   hidden size is smaller); :func:`item_vectors` caches the result per dataset, backbone and texts.
3. :func:`retrieve` / :func:`retrieve_many` rank a history by cosine similarity to the target and keep the top K,
   back in chronological order (ties go to the more recent item).

ReiT trains on both views of a sample; :func:`mixed_view` draws, per sample and epoch, which one it gets.

Two defects of the published code are avoided: item ids index the vectors directly (both 0-based), and the score
is always the cosine, never a raw dot product.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from recadapt import paths

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from recadapt.llm.backbone import Backbone

log = logging.getLogger(__name__)

DEFAULT_DIM = 512  # ReLLa's PCA dimension; pca_reduce clamps it to the hidden size
DEFAULT_BATCH_SIZE = 64  # item texts per forward
# Bump when the embedding or PCA recipe changes: cached vectors computed the old way then stop matching.
CACHE_FORMAT = 1
_STREAM_REIT = (
    16  # random stream of the ReiT view draw (keyed [seed, 16, epoch, sample]; the probe's is [seed, 16])
)
_RETRIEVE_CHUNK = 1024  # samples per vectorised step of retrieve_many (1024 x 50 x 512 floats ~ 100 MB)


# ---------------------------------------------------------------------------------------------------------------
# item embeddings


def embed_item_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> np.ndarray:
    """Mean-pooled final hidden states of ``texts``, float32 ``[len(texts), hidden]``, in input order.

    Texts are batched by token length (least padding), right-padded and masked, so a text's vector does not
    depend on its batch beyond floating point. Runs under ``torch.inference_mode`` in whatever precision the
    caller sets up (e.g. ``backbone.autocast()``); pooling is done in float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(texts) == 0:
        return np.zeros((0, _hidden_size(model)), dtype=np.float32)
    encoded = tokenizer(list(texts))["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise ValueError(f"{len(empty)} item texts have no tokens (first at index {empty[0]})")
    pad_id = _pad_token_id(tokenizer)
    device = _model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.zeros((len(encoded), _hidden_size(model)), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="embed items", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            input_ids, mask = _right_pad([encoded[i] for i in rows], pad_id, device)
            hidden = _final_hidden_states(model, input_ids, mask).float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            out[rows] = pooled.cpu().numpy()
    return out


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, else EOS's: padded slots are masked, so any id works, but it must exist in the vocabulary."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return int(pad_id)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden_size(model: PreTrainedModel) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _right_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask: with right padding the real tokens keep positions 0..n-1."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids.to(device), mask.to(device)


def _final_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, T, H]`` after the final norm. The decoder alone is run where the model exposes it, which skips the
    LM head (for SmolLM2 a 49k-wide projection per token); otherwise the last of ``hidden_states``, which
    transformers takes after the final norm."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, torch.nn.Module):
        output = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is not None:
            return hidden
    output = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
    )
    return output.hidden_states[-1]


# ---------------------------------------------------------------------------------------------------------------
# PCA


def pca_reduce(x: np.ndarray, dim: int) -> np.ndarray:
    """The rows of ``x`` projected on their top ``min(dim, n_features, n_samples)`` principal components, float32.

    Centred, then an SVD in float64. Each component's sign is fixed so that its largest-magnitude loading is
    positive: an SVD's signs are arbitrary, and a cached vector set must not flip between library versions.
    Columns are ordered by decreasing variance.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"pca_reduce needs a non-empty 2-D array, got shape {data.shape}")
    n_components = min(dim, data.shape[1], data.shape[0])
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:n_components]
    largest = np.abs(components).argmax(axis=1)
    signs = np.sign(components[np.arange(n_components), largest])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return (centred @ components.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# retrieval


def retrieve(history: np.ndarray, target: int, item_vectors: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` items of ``history`` (oldest first) most cosine-similar to ``target``, kept in history order.

    A history of at most ``k`` items is returned unchanged. Equal similarities go to the more recent item.
    """
    return retrieve_many([history], [target], item_vectors, k)[0]


def retrieve_many(
    histories: Sequence[np.ndarray], targets: Sequence[int] | np.ndarray, item_vectors: np.ndarray, k: int
) -> list[np.ndarray]:
    """:func:`retrieve` for many samples at once (vectors are normalised once; samples go in chunks)."""
    positions = retrieval_positions(histories, targets, item_vectors, k)
    return [np.asarray(h)[p] for h, p in zip(histories, positions, strict=True)]


def retrieval_positions(
    histories: Sequence[np.ndarray], targets: Sequence[int] | np.ndarray, item_vectors: np.ndarray, k: int
) -> list[np.ndarray]:
    """Per sample, the ascending positions in its history that :func:`retrieve_many` keeps.

    Positions rather than items, so that columns aligned with the history (its ratings) can be selected too.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    target_ids = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(target_ids) != len(histories):
        raise ValueError(f"{len(histories)} histories but {len(target_ids)} targets")
    unit = _unit_rows(item_vectors)
    hist_arrays = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    _check_ids(hist_arrays, target_ids, len(unit))
    result = [np.arange(len(h), dtype=np.int64) for h in hist_arrays]
    long_rows = [i for i, h in enumerate(hist_arrays) if len(h) > k]
    for start in range(0, len(long_rows), _RETRIEVE_CHUNK):
        rows = long_rows[start : start + _RETRIEVE_CHUNK]
        chosen = _top_k_chunk([hist_arrays[i] for i in rows], target_ids[rows], unit, k)
        for row, positions in zip(rows, chosen, strict=True):
            result[row] = positions
    return result


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (cosine 0 with everything)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"item vectors must be 2-D, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _check_ids(histories: Sequence[np.ndarray], targets: np.ndarray, n_items: int) -> None:
    """Ids must index the vectors: numpy would silently wrap a negative one (e.g. a padding -1)."""
    lows = [int(h.min()) for h in histories if len(h)] + ([int(targets.min())] if len(targets) else [])
    highs = [int(h.max()) for h in histories if len(h)] + ([int(targets.max())] if len(targets) else [])
    if lows and (min(lows) < 0 or max(highs) >= n_items):
        raise ValueError(f"item ids must be in 0..{n_items - 1}, got range {min(lows)}..{max(highs)}")


def _top_k_chunk(
    histories: Sequence[np.ndarray], targets: np.ndarray, unit: np.ndarray, k: int
) -> list[np.ndarray]:
    """Top-k positions of histories that are all longer than k, by cosine then recency, sorted ascending.

    The similarity is an element-wise product summed over the last axis, so an item scores bit-identically
    wherever it sits (a repeated item ties exactly) and whatever the chunk's padding.
    """
    lengths = np.array([len(h) for h in histories])
    width = int(lengths.max())
    padded = np.zeros((len(histories), width), dtype=np.int64)
    valid = np.arange(width)[None, :] < lengths[:, None]
    padded[valid] = np.concatenate(histories)
    sims = (unit[padded] * unit[targets][:, None, :]).sum(axis=-1)
    sims[~valid] = -np.inf
    # Stable sort of the time-reversed row: among equal similarities the later position comes first.
    reversed_order = np.argsort(-sims[:, ::-1], axis=1, kind="stable")[:, :k]
    chosen = np.sort(width - 1 - reversed_order, axis=1)
    return list(chosen)


# ---------------------------------------------------------------------------------------------------------------
# cached item vectors


def item_vectors(
    backbone_name: str,
    dataset_key: str,
    texts: Sequence[str],
    compute: Callable[[], np.ndarray],
    *,
    dim: int = DEFAULT_DIM,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """PCA-reduced item vectors, float32 ``[len(texts), <= dim]``, from the cache or from ``compute()``.

    ``compute`` returns the raw embeddings ``[len(texts), hidden]`` (e.g. :func:`embed_item_texts`); it runs only
    on a cache miss. The file ``<cache_dir>/<dataset_key>-<backbone>-<hash>.safetensors`` is keyed by a hash of
    the backbone name, the texts and ``dim``: any change recomputes. The name stands for the weights, so a local
    model folder whose weights change needs a new name or a cleared cache. ``cache_dir`` defaults to
    ``<recadapt cache>/retrieval``.
    """
    texts = list(texts)
    folder = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "retrieval"
    digest = cache_key(backbone_name, texts, dim)
    path = folder / f"{_slug(dataset_key)}-{_slug(backbone_name)}-{digest[:16]}.safetensors"
    cached = _load_vectors(path, digest, len(texts))
    if cached is not None:
        return cached
    raw = np.asarray(compute())
    if raw.ndim != 2 or raw.shape[0] != len(texts):
        raise ValueError(f"compute() must return [{len(texts)}, hidden] embeddings, got shape {raw.shape}")
    vectors = pca_reduce(raw, dim)
    _save_vectors(path, vectors, digest, backbone_name, dataset_key, dim)
    return vectors


def backbone_item_vectors(
    backbone: Backbone,
    dataset_key: str,
    texts: Sequence[str],
    *,
    dim: int = DEFAULT_DIM,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """:func:`item_vectors` with the embeddings of a loaded backbone, computed in its autocast precision."""

    def compute() -> np.ndarray:
        with backbone.autocast():
            return embed_item_texts(
                backbone.model, backbone.tokenizer, texts, batch_size=batch_size, progress=progress
            )

    return item_vectors(backbone.name, dataset_key, texts, compute, dim=dim, cache_dir=cache_dir)


def cache_key(backbone_name: str, texts: Sequence[str], dim: int) -> str:
    """SHA-256 over the recipe version, backbone, ``dim`` and every text (length-prefixed, so no two text lists
    hash alike by concatenation)."""
    digest = hashlib.sha256()
    for part in (f"recadapt-subr-{CACHE_FORMAT}", backbone_name, str(dim), str(len(texts)), *texts):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _slug(name: str) -> str:
    """A file-name-safe tail of ``name`` (a hub id or path may hold slashes); the hash carries the full name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return slug[-60:] or "unnamed"


def _load_vectors(path: Path, digest: str, n_items: int) -> np.ndarray | None:
    """The cached vectors, or None when absent, unreadable or not the expected key and row count."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            vectors = handle.get_tensor("vectors")
    except Exception as err:  # a torn or foreign file is recomputed, not trusted
        log.warning("ignoring unreadable retrieval cache %s: %s", path, err)
        return None
    if metadata.get("key") != digest or vectors.ndim != 2 or vectors.shape[0] != n_items:
        log.warning("ignoring retrieval cache %s: it does not match these texts", path)
        return None
    return vectors.astype(np.float32, copy=False)


def _save_vectors(
    path: Path, vectors: np.ndarray, digest: str, backbone_name: str, dataset_key: str, dim: int
) -> None:
    """Write safetensors (never pickle) to a temporary file beside ``path``, then rename it into place."""
    from safetensors.numpy import save

    metadata = {"key": digest, "backbone": backbone_name, "dataset": dataset_key, "dim": str(dim)}
    payload = save({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# ReiT: mixed training views


def mixed_view(sample_index: int, seed: int, epoch: int) -> bool:
    """True when training sample ``sample_index`` uses its retrieved history this epoch, False for the recent one.

    A fair coin seeded by (seed, epoch, sample): the same on every run and after resuming, independent of the
    order samples are visited in, and redrawn each epoch so every sample sees both views over training.
    """
    rng = np.random.default_rng([seed, _STREAM_REIT, epoch, sample_index])
    return bool(rng.random() < 0.5)
