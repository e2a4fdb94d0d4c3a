"""FastDropout against nn.Dropout's contract: drop rate, scaling, gradient, eval identity, reproducibility."""

from __future__ import annotations

import pytest
import torch
from tiny_llm import tiny_llama
from torch import nn

from recadapt.adapters import LoRAConfig, attach_adapters
from recadapt.adapters.build import with_lora
from recadapt.adapters.dropout import FastDropout, _uniform_int16, dropout_threshold, set_lora_dropout
from recadapt.train.config import LLMConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_16_bit_lane_is_uniform() -> None:
    # a lane that is not (the sign lane of random_() without bounds is always >= 0) would drop nothing or everything
    torch.manual_seed(0)
    lanes = _uniform_int16(torch.Size([400_000]), torch.device("cpu")).view(-1, 4)
    for lane in range(4):
        values = lanes[:, lane].float()
        assert abs(float((values < 0).float().mean()) - 0.5) < 0.005, lane
        assert abs(float((values < dropout_threshold(0.1)).float().mean()) - 0.1) < 0.003, lane


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_scaling_match_nn_dropout(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 128, 97) + 1.0  # no zeros of its own; an odd size leaves a partial 64-bit draw
    out = FastDropout(p).train()(x)
    dropped = out == 0
    assert abs(float(dropped.float().mean()) - p) < 0.005
    kept_ratio = out[~dropped] / x[~dropped]
    torch.testing.assert_close(kept_ratio, torch.full_like(kept_ratio, 1 / (1 - p)), rtol=1e-4, atol=0)
    # the expectation is preserved, as with inverted dropout
    assert abs(float(out.mean() / x.mean()) - 1.0) < 0.01


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 33, requires_grad=True)
    out = FastDropout(0.25).train()(x)
    out.backward(torch.ones_like(out))
    expected = torch.where(out != 0, torch.tensor(1 / 0.75), torch.tensor(0.0))
    torch.testing.assert_close(x.grad, expected)


def test_eval_mode_and_p_zero_are_the_identity_and_seeds_reproduce() -> None:
    x = torch.randn(4, 16)
    assert FastDropout(0.3).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    first = FastDropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(first, FastDropout(0.3).train()(x))
    assert not torch.equal(first, FastDropout(0.3).train()(x))
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_bf16_inputs_stay_bf16() -> None:
    torch.manual_seed(0)
    out = FastDropout(0.1).train()(torch.ones(4, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(1 / 0.9, dtype=torch.bfloat16).item()}


def test_peft_lora_and_recadapt_adapters_use_it() -> None:
    peft_model = with_lora(tiny_llama(64), LLMConfig(lora_dropout=0.1))
    peft_dropouts = [
        m for name, m in peft_model.named_modules() if name.split(".")[-2:-1] == ["lora_dropout"]
    ]
    assert peft_dropouts and all(isinstance(m, FastDropout) and m.p == 0.1 for m in peft_dropouts)
    assert set_lora_dropout(peft_model, nn.Dropout) == len(peft_dropouts)  # back to PEFT's own, same p
    restored = [m for name, m in peft_model.named_modules() if name.split(".")[-2:-1] == ["lora_dropout"]]
    assert all(type(m) is nn.Dropout and m.p == 0.1 for m in restored)

    adapted = attach_adapters(tiny_llama(64), LoRAConfig(r=2, dropout=0.2))
    layer_dropouts = [m.dropout for m in adapted.modules() if hasattr(m, "lora_A") and hasattr(m, "dropout")]
    assert layer_dropouts and all(isinstance(m, FastDropout) and m.p == 0.2 for m in layer_dropouts)
