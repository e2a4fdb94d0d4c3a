"""The ``score`` ranking mode: every candidate's log-likelihood after the shared prompt, a full ranking.

Its own module because of its layout choice: the candidates of a prompt are either packed side by side after it
in one row under a 4-D attention mask, or run on one copy of the prompt's KV cache each
(:func:`packs_by_default` picks by device and attention kernel). Conventions: :mod:`recadapt.llm.ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from recadapt.llm.session import (
    Prompt,
    _as_prompts,
    _candidate_tensor,
    _check_batch,
    _check_eval,
    _chunks,
    _Session,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Normalise = Literal["mean", "sum"]

# prompts per forward in score mode, whose logits are prompts x candidates x tokens
DEFAULT_SCORE_BATCH_SIZE = 4
# attention kernels that take a ready 4-D mask (see recadapt.llm.masking): score mode packs the candidates of a
# prompt into one row under them, and otherwise copies the prompt's KV cache once per candidate
PACKED_ATTENTION = ("sdpa", "eager")


def packs_by_default(kernel: str | None, device: torch.device) -> bool:
    """Whether :func:`score_candidates` packs the candidates when not told: on a CPU, under a 4-D-mask kernel."""
    return kernel in PACKED_ATTENTION and device.type == "cpu"


@torch.inference_mode()
def score_candidates(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    candidate_token_ids: Sequence[Sequence[Sequence[int]]],
    *,
    answer_suffix_ids: Sequence[int] = (),
    normalise: Normalise = "mean",
    batch_size: int = DEFAULT_SCORE_BATCH_SIZE,
    cond: torch.Tensor | None = None,
    packed: bool | None = None,
) -> torch.Tensor:
    """Log-likelihood of every candidate (+ suffix) after its prompt: float32 scores [B, C] on the CPU.

    ``normalise="mean"`` divides by the candidate's token count, so long titles are not penalised for their
    length; ``"sum"`` is the total log-probability. Each prompt is run once; then all its candidates' tokens are
    scored in one forward: ``packed`` side by side after the prompt under a 4-D mask, or on one copy of the
    prompt's KV cache per candidate (C times the cache, and attention over C copies of the prompt). The default
    packs on a CPU when the model's attention kernel takes a 4-D mask (:data:`PACKED_ATTENTION`): there compute
    is the bottleneck and packing was 1.5x faster; on an accelerator the copies cost little and the unmasked
    kernels win (copied 1.2x faster on an H200, docs/benchmarks.md). The logits of that
    forward, ``batch_size`` x C x longest candidate x vocabulary, bound the memory.
    """
    _check_eval(model)
    _check_batch(prompts, candidate_token_ids, "candidate lists")
    if normalise not in ("mean", "sum"):
        raise ValueError(f"normalise must be 'mean' or 'sum', got {normalise!r}")
    tensors = _as_prompts(model, prompts)
    tokens, lengths = _candidate_tensor(candidate_token_ids, answer_suffix_ids)
    scores = torch.zeros(len(tensors), tokens.shape[1], dtype=torch.float32)
    kernel = getattr(model.config, "_attn_implementation", None)
    if packed is None:
        packed = packs_by_default(kernel, model.device)
    elif packed and kernel not in PACKED_ATTENTION:
        raise ValueError(
            f"packed=True needs an attention kernel that takes a 4-D mask {PACKED_ATTENTION}, got {kernel!r}"
        )
    for chunk in _chunks(len(tensors), batch_size):
        chunk_cond = cond[list(chunk)] if cond is not None else None
        total = candidate_log_likelihoods(
            model, [tensors[i] for i in chunk], tokens[list(chunk)], cond=chunk_cond, packed=packed
        )
        if normalise == "mean":
            total = total / lengths[list(chunk)].to(total.device)
        scores[list(chunk)] = total.float().cpu()
    return scores


def candidate_log_likelihoods(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    packed: bool = True,
) -> torch.Tensor:
    """The summed log-likelihood [b, C] (float32, on the model's device) of each candidate's tokens ``tokens``
    [b, C, L] (padded with -1) after its prompt (ids [T] or embeddings [T, H]; ``cond`` [b, d] per prompt).

    One prefill of the prompts, then every candidate in one forward, ``packed`` side by side under a 4-D mask
    or on a copy of the prompt's cache each. Differentiable when gradients are enabled: the listwise objective
    (``llm.objective``) trains through the same computation score mode ranks with.
    """
    n_prompts, n_candidates, longest = tokens.shape
    session = _Session(model, cond)
    last = session.prefill(list(prompts), torch.arange(n_prompts))[:, -1].float()
    tokens = tokens.to(last.device)
    total = last.log_softmax(dim=-1).gather(1, tokens[:, :, 0])  # the first token, from the prompt
    if longest == 1:
        return total
    rows = n_prompts * n_candidates
    inputs = tokens[:, :, :-1]
    targets = tokens[:, :, 1:].reshape(rows, longest - 1)
    valid = targets >= 0  # position j is real and predicts a real token j + 1
    if packed:
        logits = session.extend_packed(inputs.clamp(min=0), valid.view(n_prompts, n_candidates, -1))
        logits = logits.float().view(rows, longest - 1, -1)
    else:
        session.repeat(n_candidates)
        logits = session.extend(inputs.reshape(rows, longest - 1).clamp(min=0), valid, logits_to_keep=0)
        logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    log_probs = (picked - logits.logsumexp(dim=-1)).masked_fill(~valid, 0.0)
    return total + log_probs.sum(dim=1).view(n_prompts, n_candidates)
