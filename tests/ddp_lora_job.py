"""A LoRA training job for `torchrun --nproc_per_node N` (tests/test_train_data_parallel.py).

Arguments: MODEL DATA OUT WORKDIR STEPS STOP_AFTER (0 = run to the end)."""

import sys

from diffstudio.train.lora import LoRATrainConfig, train_lora

model, data, out, workdir, steps, stop_after = sys.argv[1:7]
config = LoRATrainConfig(data=data, out=out, model=model, rank=4, steps=int(steps), batch_size=2, lr=1e-2,
                         resolution=64, checkpoint_every=1, workdir=workdir, buckets=False)
train_lora(config, stop_after=int(stop_after) or None)
