"""The embedding head of full-ranking LLM recommenders (Laser, DARec): a user or an item is the LLM's final hidden
state at one token of its prompt, so one forward embeds it and the whole catalogue can be scored by a product.

Prompts are assembled from token ids tokenized once per piece (instruction, numbering, each item's title), never
per sample: building a batch is a list concatenation, and every token knows which history item it belongs to
(its *segment*, which DARec's context mask reads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

# Laser's template, shortened: every catalogue item is embedded through it, so its length multiplies the cost of
# an item table (the paper's: "You are an intelligent recommendation assistant. Please summarize the user's
# characteristics into a single token based on the browsing history. In chronological order, ...").
INSTRUCTION = "Summarize the user's taste in one token. Browsed, oldest first:"
TAIL = "\nTaste:"


@dataclass
class EncodedPrompts:
    """Right-padded prompt token ids [B, T], their mask [B, T], each token's segment [B, T] (0 for
    instruction and numbering, s for the tokens of the s-th history item) and each row's length [B]."""

    input_ids: Tensor
    attention_mask: Tensor
    segment_ids: Tensor
    lengths: Tensor

    def to(self, device: torch.device | str) -> EncodedPrompts:
        return EncodedPrompts(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.segment_ids, self.lengths))
        )


class HistoryPromptBuilder:
    """``INSTRUCTION 1. title 2. title ... TAIL`` as token ids, from pieces tokenized once.

    Titles longer than ``max_title_tokens`` are cut, which bounds a prompt at about
    ``len(instruction) + n_items * (max_title_tokens + 3)`` tokens.
    """

    def __init__(
        self,
        tokenizer,
        titles: Sequence[str],
        *,
        instruction: str = INSTRUCTION,
        tail: str = TAIL,
        max_title_tokens: int = 24,
    ) -> None:
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        self.instruction = ids(instruction)
        self.tail = ids(tail)
        self.titles = [ids(" " + t)[:max_title_tokens] for t in titles]
        self._numbers: dict[int, list[int]] = {}
        self._ids = ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def number(self, position: int) -> list[int]:
        if position not in self._numbers:
            self._numbers[position] = self._ids(f"\n{position}.")
        return self._numbers[position]

    def prompt(self, history: Sequence[int]) -> tuple[list[int], list[int]]:
        """Token ids and segment ids of one history (item ids, oldest first)."""
        ids, segments = list(self.instruction), [0] * len(self.instruction)
        for position, item in enumerate(history, start=1):
            number, title = self.number(position), self.titles[int(item)]
            ids += number + title
            segments += [0] * len(number) + [position] * len(title)
        ids += self.tail
        segments += [0] * len(self.tail)
        return ids, segments

    def encode(self, histories: Sequence[Sequence[int]]) -> EncodedPrompts:
        pieces = [self.prompt(h) for h in histories]
        width = max(len(ids) for ids, _ in pieces)
        input_ids = torch.full((len(pieces), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), width), dtype=torch.long)
        segments = torch.zeros((len(pieces), width), dtype=torch.long)
        for row, (ids, seg) in enumerate(pieces):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            segments[row, : len(seg)] = torch.tensor(seg)
        return EncodedPrompts(input_ids, mask, segments, mask.sum(1))


def append_token(
    embeds: Tensor, mask: Tensor, lengths: Tensor, token: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Place ``token`` [H] right after each row's last real position of right-padded ``embeds`` [B, T, H].

    Returns the widened embeddings and mask and the token's index per row (where its hidden state is read).
    """
    batch, width, hidden = embeds.shape
    embeds = torch.cat([embeds, embeds.new_zeros(batch, 1, hidden)], dim=1)
    mask = torch.cat([mask, mask.new_zeros(batch, 1)], dim=1)
    index = lengths.to(embeds.device)
    rows = torch.arange(batch, device=embeds.device)
    placed = torch.zeros(batch, width + 1, 1, dtype=embeds.dtype, device=embeds.device)
    placed[rows, index] = 1
    embeds = embeds * (1 - placed) + placed * token.to(embeds.dtype)  # differentiable in ``token``
    mask = mask.clone()
    mask[rows, index] = 1
    return embeds, mask, index


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: the final hidden states are all the embedding head needs, and
    SmolLM2's 49k-wide output projection would otherwise dominate every forward."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"{type(model).__name__} exposes no decoder (get_decoder()); use a causal LM")
    return decoder


def hidden_at(hidden: Tensor, index: Tensor) -> Tensor:
    """Rows of ``hidden`` [B, T, H] at ``index`` [B]."""
    return hidden[torch.arange(hidden.size(0), device=hidden.device), index.to(hidden.device)]


def embed_in_batches(
    embed: Callable[[np.ndarray], Tensor],
    ids: np.ndarray,
    batch_size: int,
    *,
    desc: str = "embedding",
    progress: bool = False,
) -> Tensor:
    """``embed`` over ``ids`` in batches without gradients; float32 rows in ``ids`` order, on the CPU."""
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress, leave=False):
            out.append(embed(ids[start : start + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
