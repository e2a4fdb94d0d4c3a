"""Candidate ranking with a causal LM: every batched, cached mode against a naive one-sequence-at-a-time reference.

A tiny random Llama (vocabulary 100) stands in for the backbone. The references run a full forward over the
unpadded prompt + continuation for every step or candidate, with no cache, so any padding, position or cache
mistake in the batched code shows up as a mismatch.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tiny_llm import tiny_llama
from transformers import LlamaForCausalLM

from recadapt.llm.decoding import (
    GenerateResult,
    constrained_rank,
    first_line,
    generate_rank,
    generated_hits,
    greedy_generate,
    match_candidates,
)
from recadapt.llm.ranking import rank_candidates, yes_probability
from recadapt.llm.scoring import candidate_log_likelihoods, packs_by_default, score_candidates
from recadapt.llm.session import _candidate_tensor
from recadapt.tasks.metrics import target_ranks

VOCAB = 100
HIDDEN = 32
ATOL = 2e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    # ids 0-2 are pad, BOS and EOS (prompts and candidates use 3..VOCAB-1); larger logits than the default init,
    # so greedy choices are decisive rather than near-ties
    return tiny_llama(
        VOCAB,
        hidden_size=HIDDEN,
        seed=seed,
        logit_scale=20.0,
        attn_implementation=attn,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny_llama()


class CharTokenizer:
    """Just what decoding needs: token i is one character, a newline for every 8th id; id 2 is the (special) EOS."""

    eos_token_id = 2
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'-0123456789"

    def piece(self, token: int) -> str:
        if token % 8 == 0:
            return "\n"
        if token < 3:
            return ""
        return self.alphabet[token % len(self.alphabet)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **_: object) -> str:
        return "".join(self.piece(int(t)) for t in ids)


def _prompts(lengths: Sequence[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def _embed_prompts(lengths: Sequence[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=gen) * 0.05 for n in lengths]


def _full_logits(model: LlamaForCausalLM, prompt: torch.Tensor, continuation: Sequence[int]) -> torch.Tensor:
    """Logits [T, V] of one unpadded sequence, no cache: the reference every mode is checked against."""
    cont = torch.tensor(list(continuation), dtype=torch.long)
    with torch.no_grad():
        if prompt.ndim == 2:
            embeds = torch.cat([prompt, model.get_input_embeddings()(cont)])
            return model(inputs_embeds=embeds[None]).logits[0]
        return model(input_ids=torch.cat([prompt, cont])[None]).logits[0]


def _naive_scores(model, prompts, candidates, suffix) -> torch.Tensor:
    scores = torch.zeros(len(prompts), len(candidates[0]))
    for b, prompt in enumerate(prompts):
        for c, cand in enumerate(candidates[b]):
            seq = list(cand) + list(suffix)
            log_probs = _full_logits(model, prompt, seq).log_softmax(-1)
            start = len(prompt) - 1
            scores[b, c] = sum(log_probs[start + j, t] for j, t in enumerate(seq)) / len(seq)
    return scores


def _naive_greedy_walk(model, prompt, candidates) -> tuple[int, int]:
    """The constrained walk done the slow way: full forward at every branching node. (choice, forwards)."""
    prefix: list[int] = []
    alive = list(range(len(candidates)))
    forwards = 0
    while True:
        finished = [c for c in alive if len(candidates[c]) == len(prefix)]
        if finished:
            return finished[0], forwards
        if len(alive) == 1:
            return alive[0], forwards
        children = sorted({candidates[c][len(prefix)] for c in alive})
        if len(children) == 1:
            token = children[0]
        else:
            logits = _full_logits(model, prompt, prefix)[-1]
            forwards += 1
            token = max(children, key=lambda t: float(logits[t]))
        prefix.append(token)
        alive = [c for c in alive if candidates[c][len(prefix) - 1] == token]


def _naive_greedy(model, prompt, max_new_tokens, eos) -> list[int]:
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(_full_logits(model, prompt, out)[-1].argmax())
        if token in eos:
            break
        out.append(token)
    return out


def _random_candidates(n_prompts: int, n_candidates: int, seed: int) -> list[list[list[int]]]:
    """Candidates with shared prefixes (a real trie), different lengths, and a one-token title."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_prompts):
        stems = [rng.integers(3, VOCAB, size=2).tolist() for _ in range(3)]
        sample = []
        for c in range(n_candidates):
            stem = stems[c % 3] if c % 4 else []
            sample.append(stem + rng.integers(3, VOCAB, size=int(rng.integers(1, 4))).tolist())
        out.append(sample)
    return out


class ForwardCounter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------------------------------------------
# score


@pytest.fixture(params=[True, False], ids=["packed", "copied"])
def packed(request: pytest.FixtureRequest) -> bool:
    """Score mode both ways: candidates packed after the prompt (4-D mask) or on copies of its KV cache (the
    path of attention kernels that take no 4-D mask)."""
    return request.param


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_score_equals_naive_per_candidate_forward_with_padding_and_chunks(attn: str, packed: bool) -> None:
    model = _tiny_llama(attn)
    prompts = _prompts([5, 11, 8], seed=1)
    candidates = _random_candidates(3, 6, seed=2)
    suffix = [10]
    expected = _naive_scores(model, prompts, candidates, suffix)
    got = score_candidates(model, prompts, candidates, answer_suffix_ids=suffix, batch_size=2, packed=packed)
    assert got.shape == (3, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_score_with_embedding_prompts_and_a_mixed_batch(model: LlamaForCausalLM, packed: bool) -> None:
    prompts: list[torch.Tensor] = [*_embed_prompts([7, 4], seed=3), *_prompts([9], seed=4)]
    candidates = _random_candidates(3, 5, seed=5)
    expected = _naive_scores(model, prompts, candidates, [10])
    got = score_candidates(model, prompts, candidates, answer_suffix_ids=[10], batch_size=3, packed=packed)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_candidate_likelihoods_carry_the_gradient_of_a_per_candidate_reference(packed: bool) -> None:
    """The listwise objective trains through candidate_log_likelihoods: with gradients on it gives the score
    mode's values (summed) and the same gradient, w.r.t. weights and embedded prompts, as naive forwards."""
    model = _tiny_llama()
    prompts = [p.requires_grad_() for p in _embed_prompts([6, 9], seed=6)]
    candidates = _random_candidates(2, 4, seed=7)
    tokens, lengths = _candidate_tensor(candidates, ())
    target = torch.tensor([1, 3])

    def listwise(scores: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(scores, target)

    got = candidate_log_likelihoods(model, prompts, tokens, packed=packed)
    listwise(got / lengths).backward()
    got_grads = [model.lm_head.weight.grad.clone(), *(p.grad.clone() for p in prompts)]
    model.zero_grad()
    for p in prompts:
        p.grad = None
    rows = []
    for b, prompt in enumerate(prompts):
        row = []
        for cand in candidates[b]:
            cont = torch.tensor(cand)
            embeds = torch.cat([prompt, model.get_input_embeddings()(cont)])
            log_probs = model(inputs_embeds=embeds[None]).logits[0].log_softmax(-1)
            start = len(prompt) - 1
            row.append(sum(log_probs[start + j, t] for j, t in enumerate(cand)))
        rows.append(torch.stack(row))
    naive = torch.stack(rows)
    listwise(naive / lengths).backward()
    torch.testing.assert_close(got.detach(), naive.detach(), atol=ATOL, rtol=0)
    want_grads = [model.lm_head.weight.grad, *(p.grad for p in prompts)]
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(got_grads[0].abs().sum()) > 0


def test_score_packs_by_default_only_on_a_cpu_under_a_4d_mask_kernel() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packs_by_default("sdpa", cpu) and packs_by_default("eager", cpu)
    assert not packs_by_default("flash_attention_2", cpu)
    assert not packs_by_default("sdpa", cuda)  # copies were faster on an H200 (docs/benchmarks.md)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_copied_candidates_agree_under_bf16_autocast(attn: str) -> None:
    # the packed path's additive mask is in the model's dtype (fp32) while autocast computes in bf16
    model = _tiny_llama(attn)
    prompts = _prompts([5, 11, 8], seed=1)
    candidates = _random_candidates(3, 6, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = score_candidates(
            model, prompts, candidates, answer_suffix_ids=[10], batch_size=2, packed=True
        )
        copied = score_candidates(
            model, prompts, candidates, answer_suffix_ids=[10], batch_size=2, packed=False
        )
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed, copied, atol=0.05, rtol=0)
    assert (packed.argmax(1) == copied.argmax(1)).all()


def test_score_sum_is_mean_times_length_and_single_token_candidates_need_one_forward(
    model: LlamaForCausalLM,
) -> None:
    prompts = _prompts([6, 3], seed=6)
    candidates = [[[5, 6, 7], [8]], [[9], [11, 12]]]
    mean = score_candidates(model, prompts, candidates)
    total = score_candidates(model, prompts, candidates, normalise="sum")
    lengths = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    torch.testing.assert_close(total, mean * lengths, atol=ATOL, rtol=0)
    counter = ForwardCounter(model)
    one_token = score_candidates(model, prompts, [[[5], [8]], [[9], [11]]], batch_size=4)
    counter.handle.remove()
    assert counter.calls == 1  # the prompt pass already predicts every first token
    torch.testing.assert_close(one_token, _naive_scores(model, prompts, [[[5], [8]], [[9], [11]]], []))


class _CondRecorder(torch.nn.Module):
    """A causal LM that takes ``cond`` like an adapted model, records it and ignores it."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.seen: list[list[int]] = []

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, *args: Any, cond: torch.Tensor, **kwargs: Any) -> Any:
        self.seen.append(cond[:, 0].long().tolist())
        return self.model(*args, **kwargs)


def test_cond_follows_chunks_finished_rows_and_candidate_copies(
    model: LlamaForCausalLM, packed: bool
) -> None:
    recorder = _CondRecorder(model).eval()
    cond = torch.tensor([[10.0, 0.0], [11.0, 0.0], [12.0, 0.0]])  # row i carries 10 + i
    plain = score_candidates(model, _prompts([4, 5, 6], seed=7), [[[5, 6], [7, 8]]] * 3, batch_size=2)
    scores = score_candidates(
        recorder, _prompts([4, 5, 6], seed=7), [[[5, 6], [7, 8]]] * 3, batch_size=2, cond=cond, packed=packed
    )
    if packed:  # one row per prompt throughout
        assert recorder.seen == [[10, 11], [10, 11], [12], [12]]
    else:  # the candidate pass runs one row per (prompt, candidate), user-major
        assert recorder.seen == [[10, 11], [10, 10, 11, 11], [12], [12, 12]]
    torch.testing.assert_close(scores, plain)
    recorder.seen.clear()
    constrained_rank(recorder, _prompts([4, 5, 6], seed=7), _random_candidates(3, 4, seed=3), cond=cond)
    assert recorder.seen[0] == [10, 11, 12]  # the prompt pass, then the rows still walking
    assert all(set(rows) <= {10, 11, 12} and rows == sorted(rows) for rows in recorder.seen)


def test_scores_rank_with_the_metrics(model: LlamaForCausalLM) -> None:
    prompts = _prompts([5, 7], seed=8)
    candidates = _random_candidates(2, 4, seed=9)
    ranking = rank_candidates("score", model, prompts, candidates, answer_suffix_ids=[10])
    scores = score_candidates(model, prompts, candidates, answer_suffix_ids=[10]).numpy()
    np.testing.assert_allclose(ranking.scores, scores)
    assert ranking.valid.all()
    assert (ranking.predicted == scores.argmax(1)).all()
    ranks = target_ranks(ranking.scores, ranking.predicted)
    assert (ranks == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# constrained


def test_constrained_equals_brute_force_greedy_walk(model: LlamaForCausalLM) -> None:
    prompts: list[torch.Tensor] = [*_prompts([5, 12, 7, 9], seed=10), *_embed_prompts([6, 8], seed=11)]
    candidates = _random_candidates(len(prompts), 8, seed=12)
    expected = [
        _naive_greedy_walk(model, p, [c + [10] for c in cands])
        for p, cands in zip(prompts, candidates, strict=True)
    ]
    counter = ForwardCounter(model)
    got = constrained_rank(model, prompts, candidates, answer_suffix_ids=[10], batch_size=3)
    counter.handle.remove()
    assert got.tolist() == [choice for choice, _ in expected]
    assert ((got >= 0) & (got < 8)).all()
    # one batched forward per step: as many as the longest walk in each chunk of 3
    assert counter.calls == max(f for _, f in expected[:3]) + max(f for _, f in expected[3:])


def test_constrained_stops_as_soon_as_the_title_is_determined(model: LlamaForCausalLM) -> None:
    prompt = _prompts([6], seed=13)
    cases = [
        [[5, 6, 7], [5, 6, 8], [9]],  # branch at the root, then (after forced 6) between 7 and 8
        [[5, 6, 7, 40], [5, 6, 7, 41]],  # forced 5, 6, 7, then one decision
        [[5], [6], [7]],  # one decision, then determined
        [[5, 6], [5, 6]],  # identical: nothing to decide, the lowest index
        [[5, 6], [5, 6, 7]],  # the shorter is complete once 5, 6 are written
        [[33, 34]],  # a single candidate
    ]
    for candidates in cases:
        choice, forwards = _naive_greedy_walk(model, prompt[0], candidates)
        counter = ForwardCounter(model)
        got = constrained_rank(model, prompt, [candidates])
        counter.handle.remove()
        assert got.tolist() == [choice], candidates
        assert counter.calls == forwards, candidates
    assert _naive_greedy_walk(model, prompt[0], [[5, 6], [5, 6]]) == (0, 0)
    assert _naive_greedy_walk(model, prompt[0], [[5, 6, 7, 40], [5, 6, 7, 41]])[1] == 1


def test_constrained_ranking_is_one_hot_for_the_metrics(model: LlamaForCausalLM) -> None:
    prompts = _prompts([5, 6, 7], seed=14)
    candidates = _random_candidates(3, 4, seed=15)
    ranking = rank_candidates("constrained", model, prompts, candidates, answer_suffix_ids=[10])
    assert ranking.scores.sum(axis=1).tolist() == [1.0, 1.0, 1.0]
    targets = ranking.predicted.copy()
    targets[0] = (targets[0] + 1) % 4  # a miss ranks last under pessimistic ties
    ranks = target_ranks(ranking.scores, targets)
    assert ranks.tolist() == [3, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("embeds", [False, True])
def test_greedy_generate_equals_naive_greedy(model: LlamaForCausalLM, embeds: bool) -> None:
    tokenizer = CharTokenizer()
    lengths = [4, 9, 6]
    prompts = _embed_prompts(lengths, seed=16) if embeds else _prompts(lengths, seed=16)
    eos = [2, 85]
    full = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=12, stop_at_newline=False, eos_token_ids=eos, batch_size=2
    )
    expected = [tokenizer.decode(_naive_greedy(model, p, 12, set(eos))) for p in prompts]
    assert full == expected
    early = greedy_generate(model, tokenizer, prompts, max_new_tokens=12, eos_token_ids=eos, batch_size=2)
    assert [first_line(t) for t in early] == [first_line(t) for t in full]
    assert any(len(e) < len(f) for e, f in zip(early, full, strict=True))  # some row stopped at its newline


def test_greedy_generate_matches_transformers_generate(model: LlamaForCausalLM) -> None:
    prompts = _prompts([4, 9, 6], seed=17)
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=2
        )
    tokenizer = CharTokenizer()
    reference = []
    for row in out[:, width:].tolist():
        reference.append(tokenizer.decode(row[: row.index(2)] if 2 in row else row))
    got = greedy_generate(model, tokenizer, prompts, max_new_tokens=10, stop_at_newline=False)
    assert got == reference


def test_generate_rank_applies_the_matching_rule(model: LlamaForCausalLM) -> None:
    tokenizer = CharTokenizer()
    prompts = _prompts([5, 8], seed=18)
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=8)
    line = first_line(texts[0])
    titles = [[line.strip()[:3] or "zz", "qqqqqqq"], ["qqqqqqq", "wwwwwww"]]
    results = generate_rank(model, tokenizer, prompts, titles, max_new_tokens=8)
    assert results[0] == match_candidates(texts[0], titles[0])
    assert results[1].matches == () and results[1].predicted_index == -1
    ranking = rank_candidates(
        "generate", model, prompts, [], tokenizer=tokenizer, candidate_titles=titles, max_new_tokens=8
    )
    assert ranking.texts == [r.text for r in results]
    assert ranking.valid.tolist() == [r.valid for r in results]


# ---------------------------------------------------------------------------------------------------------------
# the papers' matching rule on hand-written answers


TITLES = ["The Beatles", "Heat", "Heat Wave", "Radiohead", "Björk"]


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("Radiohead", (3,)),  # exactly one
        ("radiohead", (3,)),  # case-insensitive
        ("  I would pick THE BEATLES.  ", (0,)),  # substring of a longer answer, spaces stripped
        ("BJÖRK", (4,)),  # lower-casing is unicode-aware
        ("Nirvana", ()),  # none
        ("Radiohead or The Beatles", (0, 3)),  # two: invalid
        ("Heat Wave", (1, 2)),  # a title inside another title: both appear, invalid (the papers' rule)
        ("Heat", (1,)),
        ("\n\n Radiohead\nThe Beatles", (3,)),  # leading blank lines stripped, then the first line only
        ("Nirvana\nRadiohead", ()),  # a match after the first line does not count
    ],
)
def test_match_candidates(text: str, matches: tuple[int, ...]) -> None:
    result = match_candidates(text, TITLES)
    assert result.matches == matches
    assert result.valid == (len(matches) == 1)
    assert result.predicted_index == (matches[0] if len(matches) == 1 else -1)
    assert "\n" not in result.text


def test_match_duplicate_titles_is_invalid_and_empty_titles_are_rejected() -> None:
    assert not match_candidates("Heat", ["Heat", "heat "]).valid
    with pytest.raises(ValueError, match="empty"):
        match_candidates("anything", ["Heat", "  "])


def test_generated_hits_count_invalid_answers_as_misses() -> None:
    results = [
        GenerateResult("a", (1,)),
        GenerateResult("b", (0, 1)),
        GenerateResult("c", ()),
        GenerateResult("d", (2,)),
    ]
    hits = generated_hits(results, [1, 0, 0, 3])
    assert hits.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert hits.mean() == 0.25  # HitRatio@1 = correct / all samples


# ---------------------------------------------------------------------------------------------------------------
# CTR


def test_yes_probability_equals_two_way_softmax(model: LlamaForCausalLM) -> None:
    prompts: list[torch.Tensor] = [*_prompts([3, 10], seed=19), *_embed_prompts([6], seed=20)]
    got = yes_probability(model, prompts, yes_id=41, no_id=42, batch_size=2)
    expected = torch.stack([_full_logits(model, p, [])[-1, [41, 42]].softmax(-1)[0] for p in prompts])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# input checks


def test_input_errors(model: LlamaForCausalLM) -> None:
    prompts = _prompts([4, 5], seed=21)
    with pytest.raises(ValueError, match="same number of candidates"):
        score_candidates(model, prompts, [[[5], [6]], [[7]]])
    with pytest.raises(ValueError, match="no tokens"):
        constrained_rank(model, prompts, [[[5], []], [[7], [8]]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        score_candidates(model, prompts, [[[5], [6]]])
    flash = _CondRecorder(model).eval()
    flash.config = SimpleNamespace(_attn_implementation="flash_attention_2")  # no 4-D masks there
    with pytest.raises(ValueError, match="packed=True needs an attention kernel"):
        score_candidates(flash, prompts, [[[5], [6]], [[7], [8]]], cond=torch.zeros(2, 1), packed=True)
    with pytest.raises(ValueError, match="width"):
        yes_probability(model, [torch.zeros(3, HIDDEN + 1)], 5, 6)
    with pytest.raises(ValueError, match="unknown ranking mode"):
        rank_candidates("beam", model, prompts, [[[5]], [[6]]])  # type: ignore[arg-type]
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            yes_probability(model, prompts, 5, 6)
    finally:
        model.eval()
