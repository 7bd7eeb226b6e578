"""Memory per process of ``train.loop.train``: plain data parallelism against FSDP2 sharding (``shard="fsdp"``).

A stack of residual MLP blocks (``--blocks`` x two ``--width`` x ``--width`` Linear layers, all trained with AdamW;
the loss calls the blocks, not the module's forward, as the trainers' pipelines do) trains for a few steps. Each
process reports what its parameters, gradients and optimizer state hold at the last step, its peak resident
memory (``ru_maxrss``) then, and its peak at the end (after the last checkpoint, gathered on process 0, and the
model given back whole). Under torchrun (gloo on a CPU):

    torchrun --nproc_per_node 2 benchmarks/shard_memory.py --shard fsdp
    torchrun --nproc_per_node 2 benchmarks/shard_memory.py            # every process holds everything
    python benchmarks/shard_memory.py                                 # one process
"""

from __future__ import annotations

import argparse
import resource
import tempfile

import torch
from torch import nn

import diffstudio.train.loop as loop


def mib(tensors) -> float:
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--shard", choices=["fsdp"])
    args = p.parse_args()
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(args.width, args.width), nn.GELU(),
                                         nn.Linear(args.width, args.width)) for _ in range(args.blocks))
    model = nn.Module()
    model.blocks = blocks
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(1))
    rows = loop.data_parallel_rows(args.batch)
    optimizers, report = [], {}
    make = loop._optimizer
    loop._optimizer = lambda *a, **k: optimizers.append(make(*a, **k)) or optimizers[-1]  # to count its state

    def loss_fn(m, step):
        if step == args.steps - 1:  # the previous step has made the gradients and the optimizer state
            params = list(m.parameters())
            state = [v for s in optimizers[0].state.values() for v in s.values()]
            report.update(params=mib(params), optimizer=mib(state), training_peak=peak_rss_mib())
        h = x[rows]
        for block in blocks:
            h = h + block(h)
        return h.pow(2).mean()

    with tempfile.TemporaryDirectory() as out:
        loop.train(model, loss_fn, steps=args.steps, out_dir=out, lr=1e-4, progress=False, shard=args.shard)
    rank, world = loop.process_rank()
    n = sum(q.numel() for q in model.parameters())
    print(f"process {rank} of {world}, shard={args.shard}, {n / 1e6:.1f}M parameters: parameters {report['params']:.0f}"
          f" MiB, optimizer state {report['optimizer']:.0f} MiB, peak RSS in training {report['training_peak']:.0f}"
          f" MiB, at the end {peak_rss_mib():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
