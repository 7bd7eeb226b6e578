"""A LoRA training job for `torchrun --nproc_per_node N` (tests/test_train_data_parallel.py,
tests/test_train_sharded.py).

Arguments: MODEL DATA OUT WORKDIR STEPS STOP_AFTER (0 = run to the end) [SHARD ("fsdp")].
Checks that the base model is as it was afterwards."""

import sys

import torch

import diffstudio
from diffstudio.train.lora import LoRATrainConfig, train_lora

model, data, out, workdir, steps, stop_after = sys.argv[1:7]
shard = sys.argv[7] if len(sys.argv) > 7 else None
config = LoRATrainConfig(data=data, out=out, model=model, rank=4, steps=int(steps), batch_size=2, lr=1e-2,
                         resolution=64, checkpoint_every=1, workdir=workdir, buckets=False, shard=shard)
models = diffstudio.load(model)
before = {k: v.clone() for k, v in models.denoiser.state_dict().items()}
train_lora(config, models, stop_after=int(stop_after) or None)
after = models.denoiser.state_dict()  # the base is left as it was, sharded or not: plain tensors, same values
assert before.keys() == after.keys()
assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before)
