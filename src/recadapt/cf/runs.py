"""What the LLM methods read from a trained CRM run: the frozen model, its item table (LLaRA's hybrid item
tokens, ReLLaX's soft prompts) and per-instance conditioning for a personalized adapter (iLoRA's gate input)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from recadapt.data.batching import pad_histories
from recadapt.data.prepare import Prepared
from recadapt.errors import ConfigError

STREAM_COND = 15  # the random stream of the `random` conditioning ablation
STREAM_SHUFFLE = 16  # the random stream of the shuffled-CRM probe


def shuffled_item_map(n_items: int, seed: int) -> np.ndarray:
    """The shuffled-CRM probe's permutation: item ``i`` is read by the CRM as item ``map[i]`` (one per split seed,
    shared by every method so their probes are comparable)."""
    return np.random.default_rng([seed, STREAM_SHUFFLE]).permutation(n_items)


def permute_crm_items(crm: nn.Module, item_map: np.ndarray) -> None:
    """Make a loaded CRM read item ``item_map[i]`` wherever it is given item ``i``: its input item rows are
    permuted in place (PAD and MASK rows stay), so every history, one-item prompt and CF slot sees another item's
    collaborative embedding while titles and ids elsewhere are unchanged. For the full-ranking methods (Laser's
    M-Former input, DARec's injected slots), which read the CRM only through its item embeddings."""
    weight = crm.item_embedding.weight
    index = torch.from_numpy(np.asarray(item_map, dtype=np.int64)).to(weight.device)
    with torch.no_grad():
        weight[: len(index)] = weight[index].clone()


def load_crm_run(
    crm_run: str, prepared: Prepared, dataset: str, device: torch.device
) -> tuple[nn.Module, int | None]:
    """The frozen best model of a CRM run trained on the same dataset, and the history length it trained with
    (``train.max_len`` of its ``config.yaml``; None when the run has no config file)."""
    from recadapt.cf.checkpoint import load_crm

    run = Path(crm_run).expanduser()
    if not (run / "best").is_dir():
        raise ConfigError("config", "llm.crm_run", f"{run} holds no trained CRM (no best/ folder)")
    max_len = None
    config_file = run / "config.yaml"
    if config_file.exists():  # only two fields are needed, so the run's YAML is read as plain data
        crm_config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        trained_on = (crm_config.get("data") or {}).get("dataset")
        max_len = (crm_config.get("train") or {}).get("max_len")
        if trained_on != dataset:
            raise ConfigError(
                "config", "llm.crm_run", f"{run} was trained on {trained_on!r}, this run uses {dataset!r}"
            )
    crm = load_crm(run / "best")
    if crm.n_items != prepared.n_items:
        raise ConfigError(
            "config", "llm.crm_run", f"{run} knows {crm.n_items} items, the dataset has {prepared.n_items}"
        )
    return crm.to(device).eval().requires_grad_(False), None if max_len is None else int(max_len)


def crm_item_table(crm: nn.Module) -> Tensor:
    """The CRM's frozen item embeddings [n_items, d] (LLaRA's hybrid item tokens)."""
    with torch.no_grad():
        return crm.item_embeddings().detach().float()


@dataclass
class CondSource:
    """Per-instance conditioning for a personalized adapter: ``cond`` [rows, d] from each row's user and history.

    ``crm``: the frozen CRM's user representation of each row's most recent ``history_len`` items (iLoRA's
    SASRec sequence representation); ``crm-target``: a target-aware CRM's representation of that history with
    respect to each row's query item (ctr's target; DIN's, standing in for RecLoRA's SIM); ``random``: a fixed
    standard-normal vector per user, drawn from (seed, user) (iLoRA's ablation: a gate that sees no collaborative
    signal).
    """

    kind: str
    dim: int
    history_len: int
    crm: nn.Module | None = None
    seed: int = 0
    item_map: np.ndarray | None = None  # item id -> the id the CRM reads instead (the shuffled-CRM probe)

    def __call__(
        self, users: np.ndarray, histories: Sequence[np.ndarray], query_items: np.ndarray | None = None
    ) -> Tensor:
        """``users`` [rows], each row's whole history (oldest first) and query item -> ``cond`` [rows, dim]."""
        if self.kind == "random":
            vectors = [
                np.random.default_rng([self.seed, STREAM_COND, int(u)]).standard_normal(self.dim)
                for u in users
            ]
            return torch.tensor(np.stack(vectors), dtype=torch.float32)
        assert self.crm is not None
        if self.kind == "crm-target" and (query_items is None or (np.asarray(query_items) < 0).any()):
            raise ValueError("crm-target conditioning needs every row's query item (ctr prompts have one)")
        if self.item_map is not None:
            histories = [self.item_map[np.asarray(h, dtype=np.int64)] for h in histories]
            if query_items is not None and self.kind == "crm-target":
                query_items = self.item_map[np.asarray(query_items, dtype=np.int64)]
        device = next(self.crm.parameters()).device
        batch = {
            "history": torch.from_numpy(
                pad_histories(list(histories), self.history_len, int(self.crm.pad_id))
            ).to(device),
            "user_id": torch.tensor(np.asarray(users, dtype=np.int64), device=device),
        }
        with torch.no_grad():
            if self.kind == "crm-target":
                target = torch.tensor(np.asarray(query_items, dtype=np.int64), device=device)
                return self.crm.target_representation(batch, target).float()
            return self.crm.user_representation(batch).float()
