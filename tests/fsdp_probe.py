"""Run under ``torch.distributed.run`` by tests/train/test_distributed.py: shard a tiny LoRA model's frozen layers
with :func:`recadapt.train.distributed.shard_frozen_layers` and write, per process, what it holds."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tiny_llm import tiny_llama  # noqa: E402

from recadapt.train.distributed import process_state, shard_frozen_layers  # noqa: E402

state = process_state()
model = get_peft_model(
    tiny_llama(300), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
)
full = {name: p.numel() for name, p in model.named_parameters()}
layers = shard_frozen_layers(model, model.base_model.model._no_split_modules)
held, kinds = {}, {}
for name, param in model.named_parameters():
    local = param.to_local() if hasattr(param, "to_local") else param
    held[name], kinds[name] = local.numel(), type(param).__name__
out = Path(sys.argv[1]) / f"rank{state.process_index}.json"
out.write_text(json.dumps({"layers": layers, "full": full, "held": held, "kinds": kinds}))
torch.distributed.destroy_process_group()
