"""The LLM recipe: ``zero-shot`` (no training), ``tallrec`` (text prompts + LoRA), ``llara`` (hybrid prompts +
LoRA + curriculum over a frozen CRM's item embeddings), ``ilora`` (a mixture-of-experts LoRA gated per instance by
the CRM's sequence representation), ``reclora``, ``rella`` and ``rellax``: one function that checks the config,
assembles the parts and runs the loop (:mod:`recadapt.train.llm_loop`), then evaluates the test part
(:mod:`recadapt.tasks.llm`) and writes ``metrics.json`` as the CRM recipe writes it.

The parts live below: samples and prompts in :mod:`recadapt.llm.samples`, the adapter in
:mod:`recadapt.adapters.build`, the CRM's item table and conditioning in :mod:`recadapt.cf.runs`, precision in
:mod:`recadapt.train.precision`. ``evaluate_llm_run`` evaluates a finished run again from what it saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recadapt.adapters.build import (
    ADAPTER_FILE,
    FINAL_DIR,
    PERSONAL_ADAPTER_DIR,
    attach_adapter,
    has_adapter,
    load_weights,
)
from recadapt.cf.checkpoint import saved_crm_class
from recadapt.cf.runs import CondSource, crm_item_table, load_crm_run, shuffled_item_map
from recadapt.data.prepare import Prepared
from recadapt.data.samplers import training_rows
from recadapt.data.splits import CANDIDATE_PROTOCOLS
from recadapt.data.store import prepared_for
from recadapt.errors import ConfigError
from recadapt.io import atomic_directory, write_json_atomic
from recadapt.llm.encoding import ItemTokenizer
from recadapt.llm.injection import ItemEmbedder, build_projector
from recadapt.llm.samples import PromptFactory, item_titles, resolve_domain
from recadapt.methods.registry import method
from recadapt.tasks.evaluate import evaluation_rows
from recadapt.tasks.llm import report_outputs, row_outputs
from recadapt.tasks.metrics import Estimate
from recadapt.train.config import (
    LLMConfig,
    RunConfig,
    TrainConfig,
    coerce,
    run_fingerprints,
    save_config,
)
from recadapt.train.distributed import gather_rows, process_state, shard
from recadapt.train.llm_loop import CHECKPOINT_DIR, LLMTrainerState, read_checkpoint_state, train_loop
from recadapt.train.precision import make_accelerator, select_precision
from recadapt.train.runlock import run_dir_lock
from recadapt.train.state import rounded_train_seconds

log = logging.getLogger(__name__)


# train.* fields an LLM run reads; the others belong to the CRM recipe and must stay at their defaults
TRAIN_FIELDS_USED = ("seed", "max_len", "n_boot", "num_threads")
# llm.* fields that may change between a checkpoint and its resumption (they do not affect training)
_EVAL_ONLY_FIELDS = ("eval_modes", "eval_samples", "eval_batch_size", "max_new_tokens", "log_every")
# --- configuration ------------------------------------------------------------------------------------------------


def _check_config(config: RunConfig, llm: LLMConfig) -> None:
    """Everything about an LLM run's config that can be known before any work: the method's traits
    (:mod:`recadapt.methods.registry`) against the protocol and the llm section, the adapter kind against
    :data:`recadapt.adapters.ADAPTERS` and its options against the kind's typed config. Errors name the field and
    where it was set."""
    from recadapt.adapters import adapter_kind

    name, protocol = config.model_name, config.data.protocol
    spec = method(name)
    extra = sorted(set(config.model) - {"name"})
    if extra:
        raise config.error(f"model.{extra[0]}", f"{name} takes its settings from the llm section")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in TRAIN_FIELDS_USED and getattr(config.train, f.name) != getattr(defaults, f.name):
            raise config.error(
                f"train.{f.name}",
                f"has no effect on LLM runs (they read train.{', train.'.join(TRAIN_FIELDS_USED)}); "
                f"set the llm section instead",
            )
    if protocol not in spec.protocols:
        raise config.error("data.protocol", f"{name} supports {' and '.join(spec.protocols)}, not {protocol}")
    if spec.needs_crm and not llm.crm_run:
        raise config.error("llm.crm_run", f"{name} needs a trained CRM run directory (e.g. SASRec)")
    if llm.history != "recent" and protocol != "ctr":
        raise config.error(
            "llm.history",
            "retrieval (SUBR) ranks history items by similarity to the target item, which only ctr gives; "
            f"use llm.history=recent for {protocol}",
        )
    if llm.objective != "generative" and protocol not in CANDIDATE_PROTOCOLS:
        raise config.error(
            "llm.objective",
            f"{llm.objective} ranks a sample's persisted candidates (next-item, sampled-ranking); "
            f"{protocol} trains generative",
        )
    if llm.cond == "crm-target" and protocol != "ctr":
        raise config.error(
            "llm.cond",
            f"crm-target conditions on the item a ctr prompt asks about; {protocol}'s target is the answer",
        )
    if llm.cond == "crm-target" and llm.crm_run:
        crm_class = saved_crm_class(Path(llm.crm_run).expanduser() / "best")
        if crm_class is not None and not crm_class.target_aware:
            raise config.error(
                "llm.cond",
                f"crm-target needs a target-aware CRM run (din), {llm.crm_run} is {crm_class.name}",
            )
    if llm.init_lora_from and llm.adapter not in ("cf-lora", "moe-lora"):
        raise config.error(
            "llm.init_lora_from",
            f"starts cf-lora or moe-lora from a trained LoRA, not {llm.adapter}",
        )
    try:
        kind = adapter_kind(llm.adapter)
    except ValueError as err:
        raise config.error("llm.adapter", str(err)) from None
    if llm.user_token:
        from recadapt.adapters import ConditionedConfig

        conditioned = llm.adapter != "lora" and issubclass(kind.config, ConditionedConfig)
        if protocol not in CANDIDATE_PROTOCOLS or not spec.hybrid or not conditioned or llm.cond != "crm":
            raise config.error(
                "llm.user_token",
                "puts the CRM user vector that conditions the adapter into hybrid next-item prompts: it needs a "
                "hybrid method (llara, ilora, rellax), a conditioned adapter with llm.cond=crm, and next-item or "
                f"sampled-ranking (got {name}, {llm.adapter}, llm.cond={llm.cond}, {protocol})",
            )
    if llm.gradient_checkpointing and not kind.supports_gradient_checkpointing:
        raise config.error(
            "llm.gradient_checkpointing",
            f"adapter {llm.adapter} does not support it (its per-instance mix is not there when the backward pass "
            "recomputes a layer)",
        )
    if llm.adapter != "lora":
        if not spec.trains:
            raise config.error("llm.adapter", f"{name} trains no adapter; leave it at lora")
        hints = typing.get_type_hints(kind.config)
        for key, value in llm.adapter_options.items():  # typed per kind, before any work
            dotted = f"llm.adapter_options.{key}"
            if key not in hints or key == "kind":
                known = ", ".join(sorted(f.name for f in dataclasses.fields(kind.config)))
                raise config.error(dotted, f"unknown option of adapter {llm.adapter} (known: {known})")
            try:
                coerce(value, hints[key], "config", dotted)
            except ConfigError as exc:
                raise config.error(dotted, exc.message) from None
        if kind.config.needs_cond and llm.cond != "random" and not llm.crm_run:
            raise config.error(
                "llm.crm_run",
                f"adapter {llm.adapter} is conditioned on a CRM: name a trained CRM run",
            )
    if llm.fsdp and llm.quantization != "none":
        raise config.error(
            "llm.fsdp", "shards full-precision weights; a 4-bit base (llm.quantization) cannot be"
        )
    if llm.fsdp and not spec.trains:
        raise config.error("llm.fsdp", f"{name} trains nothing; it has no use for sharded training")
    if spec.trains and llm.max_steps == 0 and llm.epochs == 0:
        raise config.error("llm.epochs", "set llm.epochs or llm.max_steps > 0 to train")


def _evaluation_settings(config: RunConfig, llm: LLMConfig) -> dict[str, Any]:
    """What the test metrics depend on beyond the trained weights (recorded in ``metrics.json``)."""
    return {
        "modes": list(llm.eval_modes),
        "samples": llm.eval_samples,
        "max_new_tokens": llm.max_new_tokens,
        "n_boot": config.train.n_boot,
    }


# --- training -----------------------------------------------------------------------------------------------------


def train_llm(config: RunConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (``tallrec``, ``llara``) or just evaluate (``zero-shot``) an LLM recommender; returns the metrics
    JSON payload, also written to ``RUN_DIR/metrics.json``.

    With ``resume`` a run directory holding a checkpoint continues from it (a finished run returns its metrics);
    without, training starts over. The main process holds the run directory's lock throughout.
    """
    if not process_state().is_main_process:
        return _train_llm(config, resume, progress)
    with run_dir_lock(config.run_dir):
        return _train_llm(config, resume, progress)


def _train_llm(config: RunConfig, resume: bool, progress: bool) -> dict[str, Any]:
    from recadapt.llm.backbone import load_backbone

    method_name = config.model_name
    spec = method(method_name)
    if spec.recipe != "llm":
        raise config.error("model.name", f"{method_name!r} is not trained by the LLM recipe ({spec.recipe})")
    llm = config.llm or LLMConfig()
    config = dataclasses.replace(config, llm=llm)
    _check_config(config, llm)
    data, tc = config.data, config.train
    run_dir, ckpt_dir = config.run_dir, config.run_dir / CHECKPOINT_DIR
    fingerprints = run_fingerprints(config, llm, ignore=_EVAL_ONLY_FIELDS)
    fingerprint = fingerprints[0]

    precision, why = select_precision(process_state().device, llm.precision)
    accelerator = make_accelerator(precision)
    main = accelerator.is_main_process
    log.info("%s: mixed precision %s (%s)", run_dir, precision, why)
    if progress and main:
        tqdm.write(f"{config.run_name}: mixed precision {precision} ({why}), device {accelerator.device}")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)

    state = read_checkpoint_state(ckpt_dir) if resume else None
    if state is not None and state.fingerprint not in fingerprints:
        raise ConfigError(
            ckpt_dir, None, "was written under a different training config; run with --restart to start over"
        )
    if main:  # only after the check, so a refused run leaves the existing run's config.yaml alone
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    evaluation = _evaluation_settings(config, llm)
    if state is not None and state.finished and (run_dir / "metrics.json").exists():
        previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if previous.get("evaluation") == evaluation:
            return previous
        log.info("%s: evaluation settings changed; evaluating the trained model again", run_dir)
    if state is not None and state.num_processes != accelerator.num_processes:
        raise ConfigError(
            ckpt_dir,
            None,
            f"was written by {state.num_processes} processes, this run has {accelerator.num_processes}; "
            "resume with the same number or --restart",
        )
    if state is None and main:
        for stale in (run_dir / "metrics.json", run_dir / "log.csv", run_dir / FINAL_DIR):  # an earlier run's
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)

    with accelerator.main_process_first():
        prepared = prepared_for(data)
    domain = resolve_domain(data.dataset, llm.domain)
    torch.manual_seed(tc.seed)  # LoRA and projector initialisation (a resumed run loads them anyway)
    backbone = load_backbone(
        llm.backbone, dtype=llm.dtype, device=accelerator.device, quantization=llm.quantization
    )
    backbone.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    encoder = ItemTokenizer(backbone.tokenizer, model=backbone.model)
    item_vectors = _retrieval_vectors(config, backbone, prepared, progress and main)
    item_table, cond_source = _collaborative_inputs(config, prepared, accelerator.device)
    projector = _projector(llm, item_table, backbone, accelerator.device)

    started = time.time()
    train_factory = PromptFactory(
        prepared, "train", domain, tc.max_len, llm.item_tags, llm.item_placement, llm.user_token
    )
    if item_vectors is not None:
        apply_retrieval(train_factory, item_vectors)
    subset = training_rows(prepared.parts["train"], data.protocol, llm.train_samples, data.split_seed)
    model: nn.Module = backbone.model
    if spec.trains:

        def validate(adapted: nn.Module, projector: nn.Module | None) -> float:
            return _validation_metric(
                config,
                adapted,
                encoder,
                prepared,
                item_table,
                projector,
                accelerator,
                cond_source,
                item_vectors,
            )

        model, projector, state = train_loop(
            accelerator,
            config,
            llm,
            backbone.model,
            encoder,
            train_factory,
            subset,
            item_table,
            projector,
            state or LLMTrainerState(fingerprint=fingerprint, num_processes=accelerator.num_processes),
            cond_source=cond_source,
            validate=validate if llm.valid_every else None,
            progress=progress,
        )
    train_seconds = time.time() - started

    if not spec.trains and main:  # nothing to train: the checkpoint records that the run is done
        state = LLMTrainerState(
            finished=True, num_processes=accelerator.num_processes, fingerprint=fingerprint
        )
        with atomic_directory(ckpt_dir) as tmp:
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")

    # every process scores its share of the test rows; rank 0 writes the report
    rows, reports = _evaluate_part(
        config,
        model,
        encoder,
        prepared,
        "test",
        item_table=item_table,
        projector=projector,
        modes=llm.eval_modes,
        autocast=accelerator.autocast,
        n_boot=tc.n_boot,
        progress=progress and main,
        cond_source=cond_source,
        item_vectors=item_vectors,
    )
    payload: dict[str, Any] = {}
    if main:
        headline = "ctr" if data.protocol == "ctr" else llm.eval_modes[0]
        payload = {
            "run": config.run_name,
            "model": method_name,
            "dataset": data.dataset,
            "protocol": data.protocol,
            "seed": tc.seed,
            "split_seed": data.split_seed,
            "backbone": llm.backbone,
            "precision": precision,
            "processes": accelerator.num_processes,
            "optimizer_steps": state.step if state is not None else 0,
            "train_tokens": state.tokens if state is not None else 0,
            "train_samples": len(subset) if spec.trains else 0,
            "test_samples": len(rows),
            "ranking_mode": None if data.protocol == "ctr" else headline,
            "train_seconds": rounded_train_seconds(state) if spec.trains else 0.0,
            "train_seconds_this_process": round(train_seconds, 1),
            "evaluation": evaluation,
            "test": {k: v.to_dict() for k, v in reports[headline].items()},
        }
        if spec.trains and llm.valid_every and state is not None and state.best_value is not None:
            payload["model_selection"] = {
                "metric": _VALID_METRIC[data.protocol == "ctr"],
                "best_step": state.best_step,
                "best_valid": state.best_value,
                "valid_samples": llm.valid_samples,
            }
        if data.protocol != "ctr":
            payload["test_by_mode"] = {m: {k: v.to_dict() for k, v in r.items()} for m, r in reports.items()}
        write_json_atomic(run_dir / "metrics.json", payload)
    accelerator.wait_for_everyone()
    if not main:
        payload = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return payload


# the validation metric of model selection (llm.valid_every), higher is better: next-item ranks, ctr classifies
_VALID_METRIC = {False: "MRR", True: "AUC"}


def _validation_metric(
    config: RunConfig,
    adapted: nn.Module,
    encoder: ItemTokenizer,
    prepared: Prepared,
    item_table: Tensor | None,
    projector: nn.Module | None,
    accelerator: Any,
    cond_source: CondSource | None,
    item_vectors: np.ndarray | None,
) -> float:
    """Model selection's score of the current adapter: score-mode MRR (ctr: AUC) on ``llm.valid_samples``
    validation rows, each process scoring a share."""
    llm = config.llm or LLMConfig()
    ctr = config.data.protocol == "ctr"
    _, reports = _evaluate_part(
        dataclasses.replace(config, llm=dataclasses.replace(llm, eval_samples=llm.valid_samples)),
        adapted,
        encoder,
        prepared,
        "valid",
        item_table=item_table,
        projector=projector,
        modes=["score"],
        autocast=accelerator.autocast,
        n_boot=0,
        progress=False,
        cond_source=cond_source,
        item_vectors=item_vectors,
    )
    return float(reports["ctr" if ctr else "score"][_VALID_METRIC[ctr]].value)


def _collaborative_inputs(
    config: RunConfig, prepared: Prepared, device: torch.device, *, shuffle_crm: bool = False
) -> tuple[Tensor | None, CondSource | None]:
    """What a method takes from its CRM run: the item table (hybrid prompts) and the adapter's cond source.

    ``shuffle_crm``: the probe of whether the method uses them. Item ids are permuted (seeded by the split seed)
    on the CRM's side only: every placeholder gets another item's embedding and the conditioning CRM reads
    other items' histories, while prompts, titles and candidates stay as they are. A method that uses its CRM
    input must score worse."""
    llm = config.llm or LLMConfig()
    spec = method(config.model_name)
    hybrid = spec.hybrid
    conditioned = llm.adapter != "lora" and spec.trains
    crm, crm_len = None, None
    if llm.crm_run and (hybrid or (conditioned and llm.cond != "random")):
        crm, crm_len = load_crm_run(llm.crm_run, prepared, config.data.dataset, device)
    item_table = crm_item_table(crm) if hybrid and crm is not None else None
    item_map = None
    if shuffle_crm:
        item_map = shuffled_item_map(prepared.n_items, config.data.split_seed)
        if item_table is not None:
            item_table = item_table[torch.from_numpy(item_map).to(item_table.device)]
    cond_source = None
    if conditioned:
        from recadapt.adapters import ConditionedConfig, adapter_kind

        if issubclass(adapter_kind(llm.adapter).config, ConditionedConfig):
            if crm is None:
                dim = int(llm.adapter_options.get("cond_dim", 64))
            elif llm.cond == "crm-target":
                dim = int(crm.target_representation_dim)
            else:
                dim = int(crm.embedding_dim)
            cond_source = CondSource(
                kind=llm.cond,
                dim=dim,
                history_len=llm.cond_history_len or crm_len or TrainConfig().max_len,
                crm=crm if llm.cond != "random" else None,
                seed=config.train.seed,
                item_map=item_map,
            )
    return item_table, cond_source


def _projector(
    llm: LLMConfig, item_table: Tensor | None, backbone: Any, device: torch.device
) -> nn.Module | None:
    """The ``llm.projector`` for a hybrid method's item table (None without one), built before any adapter so
    the ``vocab`` kind reads the backbone's own token embeddings."""
    if item_table is None:
        return None
    embedding = backbone.model.get_input_embeddings()
    return build_projector(llm.projector, item_table, embedding, backbone.tokenizer).to(device)


def _retrieval_vectors(
    config: RunConfig, backbone: Any, prepared: Prepared, progress: bool
) -> np.ndarray | None:
    """SUBR's item vectors (the backbone's mean last hidden state of each title, PCA-reduced), computed with the
    plain backbone before any adapter is attached and cached per dataset and backbone; None without retrieval."""
    llm = config.llm or LLMConfig()
    if llm.history == "recent":
        return None
    from recadapt.llm.retrieval import backbone_item_vectors

    titles = item_titles(prepared.items, prepared.n_items)
    return backbone_item_vectors(
        backbone, config.data.dataset, titles, dim=llm.retrieval_dim, progress=progress
    )


def apply_retrieval(factory: PromptFactory, item_vectors: np.ndarray) -> None:
    """Each row's retrieved view: its train.max_len history items most similar to the target (time order)."""
    from recadapt.llm.retrieval import retrieval_positions

    positions = retrieval_positions(
        factory.full_histories, factory.targets, item_vectors, factory.history_len
    )
    factory.set_retrieval(positions)


def _evaluate_part(
    config: RunConfig,
    model: nn.Module,
    encoder: ItemTokenizer,
    prepared: Prepared,
    part: str,
    *,
    item_table: Tensor | None,
    projector: nn.Module | None,
    modes: Sequence[str],
    autocast: Callable[[], Any],
    n_boot: int,
    progress: bool,
    cond_source: CondSource | None = None,
    item_vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, dict[str, Estimate]]]:
    """Rank (or score, for CTR) the evaluation rows of ``part`` with ``model``; returns the rows and the reports."""
    llm = config.llm or LLMConfig()
    embedder = (
        ItemEmbedder(model.get_input_embeddings(), item_table, projector)
        if item_table is not None and projector is not None
        else None
    )
    domain = resolve_domain(config.data.dataset, llm.domain)
    factory = PromptFactory(
        prepared, part, domain, config.train.max_len, llm.item_tags, llm.item_placement, llm.user_token
    )
    if item_vectors is not None:  # ReLLa evaluates on the retrieved view (recent, mixed: trained on both)
        apply_retrieval(factory, item_vectors)
    rows = evaluation_rows(len(factory), llm.eval_samples, config.data.split_seed)
    state = process_state()
    # this process's share of the rows, gathered in rank order: each row once; under llm.fsdp every forward is
    # collective (the sharded layers gather their weights), so every process scores every row alike
    split = state.num_processes > 1 and not llm.fsdp
    outputs = row_outputs(
        model,
        encoder,
        factory,
        np.asarray(shard(rows, state.process_index, state.num_processes) if split else rows),
        modes=modes,
        embedder=embedder,
        max_tokens=llm.max_prompt_tokens,
        batch_size=llm.eval_batch_size,
        max_new_tokens=llm.max_new_tokens,
        autocast=autocast,
        progress=progress,
        cond_source=cond_source,
        retrieved=item_vectors is not None,
    )
    if split:
        outputs = {key: gather_rows(value) for key, value in outputs.items()}
    reports = report_outputs(factory, rows, outputs, modes=modes, n_boot=n_boot, seed=config.train.seed)
    return rows, reports


@dataclasses.dataclass
class LoadedLLMRun:
    """A finished LLM run rebuilt from what it saved, ready to score: what evaluation and serving both read."""

    run_dir: Path
    config: RunConfig
    prepared: Prepared
    model: nn.Module
    encoder: ItemTokenizer
    item_table: Tensor | None
    projector: nn.Module | None
    cond_source: CondSource | None
    item_vectors: np.ndarray | None
    autocast: Callable[[], Any]

    @property
    def llm(self) -> LLMConfig:
        return self.config.llm or LLMConfig()

    @property
    def embedder(self) -> ItemEmbedder | None:
        """The hybrid prompts' item embedder (None for text-only methods)."""
        if self.item_table is None or self.projector is None:
            return None
        return ItemEmbedder(self.model.get_input_embeddings(), self.item_table, self.projector)


def load_llm_run(run_dir: Path, *, shuffle_crm: bool = False, progress: bool = False) -> LoadedLLMRun:
    """Rebuild a finished LLM run from ``config.yaml`` and its ``final`` adapter and projector: the backbone, the
    CRM's item table and conditioning (``shuffle_crm``: the shuffled-table probe, see
    :func:`_collaborative_inputs`), ReLLa's retrieval vectors, in the run's precision."""
    from recadapt.llm.backbone import load_backbone
    from recadapt.train.config import load_config

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(config_file)
    spec, llm = method(config.model_name), config.llm or LLMConfig()
    if spec.recipe != "llm":
        raise ConfigError(config_file, "model.name", f"{spec.name!r} is not an LLM method")
    final = run_dir / FINAL_DIR
    if spec.trains and not has_adapter(final):
        raise FileNotFoundError(
            f"{run_dir} has no trained adapter in {final} (expected {ADAPTER_FILE} or {PERSONAL_ADAPTER_DIR}/); "
            "train it first"
        )
    accelerator = make_accelerator(select_precision(process_state().device, llm.precision)[0])
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    prepared = prepared_for(config.data)
    torch.manual_seed(config.train.seed)  # as in training: the same resized-embedding initialisation
    backbone = load_backbone(
        llm.backbone, dtype=llm.dtype, device=accelerator.device, quantization=llm.quantization
    )
    encoder = ItemTokenizer(backbone.tokenizer, model=backbone.model)
    model: nn.Module = backbone.model
    item_vectors = _retrieval_vectors(config, backbone, prepared, progress)
    item_table, cond_source = _collaborative_inputs(
        config, prepared, accelerator.device, shuffle_crm=shuffle_crm
    )
    projector = _projector(llm, item_table, backbone, accelerator.device)
    if spec.trains:
        adapted = attach_adapter(backbone.model, llm, cond_source.dim if cond_source else 0)
        load_weights(final, adapted, projector)
        model = adapted
    if projector is not None:
        projector.eval()
    model.eval()
    return LoadedLLMRun(
        run_dir, config, prepared, model, encoder, item_table, projector, cond_source, item_vectors,
        accelerator.autocast,
    )  # fmt: skip


def evaluate_llm_run(
    run_dir: Path,
    *,
    part: str = "test",
    modes: Sequence[str] | None = None,
    n_boot: int | None = None,
    progress: bool = True,
    shuffle_crm: bool = False,
) -> dict[str, dict[str, Estimate]]:
    """Evaluate a finished LLM run again from what it saved (``config.yaml`` and the ``final`` adapter and
    projector), with any ranking modes: ``recadapt eval RUN_DIR --mode constrained``. ``shuffle_crm``: the
    shuffled-table probe (see :func:`_collaborative_inputs`).

    Returns one report per mode (next-item) or ``{"ctr": ...}``. The run's own settings decide the prompts, the
    evaluation rows and the bootstrap seed, so the same modes reproduce ``metrics.json``.
    """
    run = load_llm_run(run_dir, shuffle_crm=shuffle_crm, progress=progress)
    config, llm = run.config, run.llm
    modes = list(modes or llm.eval_modes)
    if config.data.protocol == "ctr":
        modes = list(llm.eval_modes)  # CTR has one scoring rule; the modes do not apply
    _, reports = _evaluate_part(
        config,
        run.model,
        run.encoder,
        run.prepared,
        part,
        item_table=run.item_table,
        projector=run.projector,
        modes=modes,
        autocast=run.autocast,
        n_boot=config.train.n_boot if n_boot is None else n_boot,
        progress=progress,
        cond_source=run.cond_source,
        item_vectors=run.item_vectors,
    )
    return reports
