"""A training job for `torchrun --nproc_per_node N` (tests/test_train_data_parallel.py): a LoRA or a ControlNet.

Arguments: KIND ("lora" or "controlnet") MODEL DATA OUT WORKDIR STEPS STOP_AFTER (0 = run to the end)
[SHARD ("fsdp")]. Checks that the base model is as it was afterwards."""

import sys

import torch

import diffstudio

kind, model, data, out, workdir, steps, stop_after = sys.argv[1:8]
shard = sys.argv[8] if len(sys.argv) > 8 else None
common = {"data": data, "out": out, "model": model, "steps": int(steps), "batch_size": 2, "resolution": 64,
          "checkpoint_every": 1, "workdir": workdir, "buckets": False, "shard": shard}
if kind == "lora":
    from diffstudio.train.lora import LoRATrainConfig, train_lora

    config, run = LoRATrainConfig(**common, rank=4, lr=1e-2), train_lora
else:
    from diffstudio.train.controlnet import ControlNetTrainConfig, train_controlnet

    config, run = ControlNetTrainConfig(**common, lr=1e-3, hint_block_channels=[8, 16, 16, 32]), train_controlnet
models = diffstudio.load(model)
before = {k: v.clone() for k, v in models.denoiser.state_dict().items()}
run(config, models, stop_after=int(stop_after) or None)
after = models.denoiser.state_dict()  # the base is left as it was, sharded or not: plain tensors, same values
assert before.keys() == after.keys()
assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before)
