"""The embedding head's prompt assembly (item segments) and token placement, on the byte tokenizer."""

from __future__ import annotations

import torch
from tiny_llm import byte_tokenizer

from recadapt.llm.embedding import HistoryPromptBuilder, append_token, hidden_at


def builder() -> HistoryPromptBuilder:
    return HistoryPromptBuilder(byte_tokenizer(), ["Alpha", "Beta", "Gamma"], instruction="I:", tail=" T")


def test_prompt_ids_decode_to_the_text_and_segments_mark_each_title() -> None:
    prompts = builder()
    ids, segments = prompts.prompt([2, 0])
    tokenizer = byte_tokenizer()
    assert tokenizer.decode(ids) == "I:\n1. Gamma\n2. Alpha T"
    titles = [tokenizer.decode([t for t, s in zip(ids, segments, strict=True) if s == k]) for k in (1, 2)]
    assert titles == [" Gamma", " Alpha"]
    assert tokenizer.decode([t for t, s in zip(ids, segments, strict=True) if s == 0]) == "I:\n1.\n2. T"


def test_encode_right_pads_and_records_lengths() -> None:
    encoded = builder().encode([[0], [1, 2]])
    lengths = encoded.lengths.tolist()
    assert lengths[0] < lengths[1] == encoded.input_ids.size(1)
    assert encoded.attention_mask.sum(1).tolist() == lengths
    assert int(encoded.segment_ids[0, lengths[0] :].abs().sum()) == 0


def test_append_token_goes_right_after_each_rows_last_real_position() -> None:
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    token = torch.full((3,), -1.0, requires_grad=True)
    out, new_mask, index = append_token(embeds, mask, mask.sum(1), token)
    assert index.tolist() == [2, 4] and out.shape == (2, 5, 3)
    assert new_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(hidden_at(out, index), token.detach().expand(2, 3))
    assert torch.equal(out[0, :2], embeds[0, :2]) and torch.equal(out[1, :4], embeds[1])
    hidden_at(out, index).sum().backward()
    assert torch.equal(token.grad, torch.full((3,), 2.0))
