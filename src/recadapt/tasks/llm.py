"""Evaluation of an LLM recommender on a protocol part: rank each row's candidates in the configured modes
(next-item) or score p(Yes) (ctr), then report the protocol's metrics with bootstrap intervals. The training
recipe and a reloaded run (``recadapt eval``) both call :func:`row_outputs` then :func:`report_outputs`, so they
score alike (a run of several processes scores a share of the rows in each and gathers them before the report)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recadapt.cf.runs import CondSource
from recadapt.llm.encoding import EncodedBatch, ItemTokenizer
from recadapt.llm.injection import ItemEmbedder
from recadapt.llm.prompts import EVAL_TEMPLATE_INDEX
from recadapt.llm.samples import PromptDataset, PromptFactory, SampleKey, conditioning_inputs
from recadapt.progress import progress_bar
from recadapt.tasks.evaluate import RANKING_KS
from recadapt.tasks.metrics import Estimate, ctr_report, mean_with_ci, ranking_report, target_ranks

EVAL_CHUNK = 64  # test samples whose prompts are built (and embedded) at once


def prompt_inputs(
    batch: EncodedBatch,
    embedder: ItemEmbedder | None,
    *,
    grad: bool = False,
    users: Tensor | None = None,
) -> list[Tensor]:
    """One unpadded prompt per row: token ids, or input embeddings [T, H] for hybrid prompts (differentiable
    with ``grad``, as the listwise objective trains the projector through them; ``users``: the rows' CRM user
    vectors, for prompts with a user token)."""
    mask = batch.attention_mask.bool()
    if embedder is None or not batch.item_ids.numel():
        return [batch.input_ids[r][mask[r]] for r in range(len(mask))]
    with torch.set_grad_enabled(grad):
        embeds = embedder(batch, users)
    return [embeds[r][mask[r]] for r in range(len(mask))]


def row_outputs(
    model: nn.Module,
    encoder: ItemTokenizer,
    factory: PromptFactory,
    rows: np.ndarray,
    *,
    modes: Sequence[str],
    embedder: ItemEmbedder | None,
    max_tokens: int,
    batch_size: int,
    max_new_tokens: int,
    autocast: Callable[[], Any],
    progress: bool = False,
    cond_source: CondSource | None = None,
    retrieved: bool = False,
) -> dict[str, np.ndarray]:
    """What the metrics are computed from, one entry per row of ``rows``: ``p_yes`` [n] (ctr), or per mode
    ``scores/MODE`` [n, C] and ``valid/MODE`` [n] (next-item).

    Next-item: each mode's :class:`~recadapt.llm.ranking.Ranking` of the row's candidates. Prompts use the
    evaluation template, hybrid when ``embedder`` is given, and the same history truncation as in training. Every
    forward (the projection of CRM items, the adapter, the backbone) runs under ``autocast``, as in training; the
    caller passes modules without accelerate's wrappers, so a trained and a reloaded run score alike.
    """
    from recadapt.llm.ranking import RankingMode, rank_candidates, yes_probability

    model.eval()
    hybrid = embedder is not None
    scores: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    valid: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    probs: list[np.ndarray] = []
    if factory.protocol == "ctr":
        yes_id, no_id = (
            encoder.answer_token_ids(a)[0]
            for a in (factory.domain.ctr.answer_yes, factory.domain.ctr.answer_no)
        )
        if yes_id == no_id:
            raise ValueError("the Yes and No answers start with the same token; CTR cannot be scored")
    samples = PromptDataset(factory, encoder, max_tokens)
    chunks = [rows[i : i + EVAL_CHUNK] for i in range(0, len(rows), EVAL_CHUNK)]
    for chunk in progress_bar(chunks, desc="evaluate", enabled=progress):  # minutes: lines in a log too
        chunk_rows = [int(r) for r in chunk]
        # the history fitted with the answer counted, as in training; ranking then reads the prompts alone
        records = samples.records([SampleKey(r, EVAL_TEMPLATE_INDEX, hybrid, retrieved) for r in chunk_rows])
        device = next(model.parameters()).device
        cond = cond_source(*conditioning_inputs(records)).to(device) if cond_source is not None else None
        with (
            autocast()
        ):  # the one precision rule: projection, adapter and backbone all under the run's autocast
            inputs = prompt_inputs(samples.prompt_batch(records).to(device), embedder, users=cond)
            if factory.protocol == "ctr":
                probs.append(
                    yes_probability(model, inputs, yes_id, no_id, batch_size=batch_size, cond=cond).numpy()
                )
                continue
            titles = [[factory.titles[i] for i in factory.candidates[r]] for r in chunk_rows]
            token_ids = [[encoder.candidate_token_ids(t) for t in row] for row in titles]
            for mode in modes:
                ranking = rank_candidates(
                    typing.cast(RankingMode, mode),
                    model,
                    inputs,
                    token_ids,
                    tokenizer=encoder.tokenizer,
                    candidate_titles=titles,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    cond=cond,
                )
                scores[mode].append(ranking.scores)
                valid[mode].append(ranking.valid)
    if factory.protocol == "ctr":
        return {"p_yes": np.concatenate(probs) if probs else np.zeros(0)}
    n_candidates = len(factory.candidates[0]) if len(factory.candidates) else 0  # an empty share's shape
    outputs: dict[str, np.ndarray] = {}
    for mode in modes:
        outputs[f"scores/{mode}"] = (
            np.concatenate(scores[mode]) if scores[mode] else np.zeros((0, n_candidates))
        )
        outputs[f"valid/{mode}"] = np.concatenate(valid[mode]) if valid[mode] else np.zeros(0, dtype=bool)
    return outputs


def report_outputs(
    factory: PromptFactory,
    rows: np.ndarray,
    outputs: dict[str, np.ndarray],
    *,
    modes: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, Estimate]]:
    """The metrics of :func:`row_outputs` (of all ``rows``, in order), with bootstrap intervals over users.

    Next-item: HR@K, NDCG@K and MRR (for ``generate`` and ``constrained`` a top-1 only, so HR@K = HR@1), and
    ValidRatio; ``score`` also reports AnswerNLL, the target's negative log-likelihood per answer token (the probe
    of whether an input is used reads it beside HR@1)."""
    users = factory.users[rows]
    if factory.protocol == "ctr":
        assert factory.labels is not None
        return {"ctr": ctr_report(factory.labels[rows], outputs["p_yes"], users, n_boot=n_boot, seed=seed)}
    candidates = np.stack([factory.candidates[r] for r in rows])
    target_index = (candidates == factory.targets[rows][:, None]).argmax(axis=1)
    reports: dict[str, dict[str, Estimate]] = {}
    for mode in modes:
        mode_scores = outputs[f"scores/{mode}"]
        ranks = target_ranks(mode_scores, target_index)
        # generate and constrained name one candidate, so only HitRatio@1 is defined for them
        ks = RANKING_KS[factory.protocol] if mode == "score" else (1,)
        report = ranking_report(ranks, users, ks=ks, n_boot=n_boot, seed=seed)
        if mode != "score":
            report = {"HR@1": report["HR@1"]}
        else:  # score mode's scores are log-likelihoods per answer token: the target's is the trained loss
            target_scores = mode_scores[np.arange(len(rows)), target_index]
            report["AnswerNLL"] = mean_with_ci(-target_scores, users, n_boot, seed)
        report["ValidRatio"] = mean_with_ci(outputs[f"valid/{mode}"].astype(np.float64), users, n_boot, seed)
        reports[mode] = report
    return reports


def score_rows(
    model: nn.Module,
    encoder: ItemTokenizer,
    factory: PromptFactory,
    rows: np.ndarray,
    *,
    embedder: ItemEmbedder | None,
    max_tokens: int,
    batch_size: int,
    autocast: Callable[[], Any],
    cond_source: CondSource | None = None,
    retrieved: bool = False,
) -> list[np.ndarray]:
    """Per row of ``factory``: its candidates' ``score``-mode scores (next-item) or ``[p(Yes)]`` (ctr), with
    prompts, conditioning and precision as :func:`row_outputs` builds them, all rows in batched forwards (what
    serving calls; rows may have different numbers of candidates)."""
    from recadapt.llm.scoring import score_candidates

    model.eval()
    samples = PromptDataset(factory, encoder, max_tokens)
    hybrid = embedder is not None
    if factory.protocol == "ctr":
        yes_id, no_id = (
            encoder.answer_token_ids(a)[0]
            for a in (factory.domain.ctr.answer_yes, factory.domain.ctr.answer_no)
        )
    out: list[np.ndarray] = []
    for start in range(0, len(rows), EVAL_CHUNK):
        chunk = [int(r) for r in rows[start : start + EVAL_CHUNK]]
        records = samples.records([SampleKey(r, EVAL_TEMPLATE_INDEX, hybrid, retrieved) for r in chunk])
        device = next(model.parameters()).device
        cond = cond_source(*conditioning_inputs(records)).to(device) if cond_source is not None else None
        with autocast():
            inputs = prompt_inputs(samples.prompt_batch(records).to(device), embedder, users=cond)
            if factory.protocol == "ctr":
                from recadapt.llm.ranking import yes_probability

                probs = yes_probability(
                    model, inputs, yes_id, no_id, batch_size=batch_size, cond=cond
                ).numpy()
                out.extend(probs[n : n + 1].astype(np.float64) for n in range(len(chunk)))
                continue
            token_ids = [
                [encoder.candidate_token_ids(factory.titles[i]) for i in factory.candidates[r]] for r in chunk
            ]
            groups: dict[int, list[int]] = {}
            for n, ids in enumerate(token_ids):  # one packed layout per candidate count
                groups.setdefault(len(ids), []).append(n)
            chunk_scores: list[np.ndarray] = [np.zeros(0)] * len(chunk)
            for members in groups.values():
                scores = score_candidates(
                    model,
                    [inputs[n] for n in members],
                    [token_ids[n] for n in members],
                    batch_size=batch_size,
                    cond=None if cond is None else cond[members],
                ).numpy()
                for row, n in enumerate(members):
                    chunk_scores[n] = scores[row].astype(np.float64)
            out.extend(chunk_scores)
    return out
