"""Which training samples a run uses and in what batches: a fixed few-shot subset shared by every method and
seed, and length-bucketed batches (similar lengths together, so little compute goes to padding) in a fixed
per-epoch plan that ``accelerate`` can shard and a resumed run can skip into."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

# independent random streams derived from the seeds (13: tasks.evaluate.evaluation_rows)
STREAM_SUBSET, STREAM_ORDER = 11, 12


def training_rows(part: pd.DataFrame, protocol: str, n: int, split_seed: int) -> np.ndarray:
    """Rows of the train part to train on: all when ``n`` is 0, else the first ``n`` of one fixed permutation
    (for ctr, the persisted few-shot set ``shot_rank < n``). Sets are nested in ``n`` and shared by every method and
    training seed, so runs differ only in what they are meant to."""
    if n <= 0 or n >= len(part):
        return np.arange(len(part))
    if protocol == "ctr" and "shot_rank" in part:
        return np.flatnonzero(part["shot_rank"].to_numpy() < n)
    permutation = np.random.default_rng([split_seed, STREAM_SUBSET]).permutation(len(part))
    return np.sort(permutation[:n])


def length_bucketed_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int, epoch: int, chunk_batches: int = 50
) -> list[list[int]]:
    """Batches of positions into ``lengths`` for one epoch, grouped by similar length to limit padding.

    The positions are shuffled with (seed, epoch), cut into chunks of ``chunk_batches`` batches, sorted by length
    (longest first) within each chunk and cut into batches; the full batches are shuffled again and the one short
    batch, if any, goes last (as in a ``BatchSampler``, which ``accelerate`` shards across processes).
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size} and {chunk_batches}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch, STREAM_ORDER])
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    full: list[list[int]] = []
    short: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        for i in range(0, len(part), batch_size):
            batch = part[i : i + batch_size].tolist()
            (full if len(batch) == batch_size else short).append(batch)
    return [full[i] for i in rng.permutation(len(full))] + short


class PlannedBatches(torch.utils.data.Sampler[list[int]]):
    """A fixed list of batches, with the ``batch_size`` and ``drop_last`` that ``accelerate`` reads to shard it."""

    def __init__(self, batches: list[list[int]], batch_size: int) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.drop_last = False

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate_indices(indices: list[int]) -> Tensor:
    return torch.tensor(indices, dtype=torch.long)
