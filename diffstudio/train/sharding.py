"""Sharded data parallelism for ``train.loop.train`` on torch's own engine: FSDP2 (``torch.distributed.fsdp.
fully_shard``), ZeRO-3 style: each of N processes keeps 1/N of every parameter (frozen ones included), of every
gradient and of the optimizer state, and gathers a block's full weights only while that block runs.

Two things make it fit a loop whose losses call the network through the pipeline rather than the module's
forward:

* FSDP2 hooks each sharded module's ``__call__``. Every element of a ``ModuleList`` that holds parameters
  (the networks' blocks) becomes its own unit, innermost first; the parameters outside every block belong to the
  root unit, ``_Step``, whose forward *is* the loss (``step(loss_fn, i)`` calls ``loss_fn(model, i)``), so they
  are gathered for the whole step and their gradients reduced after its backward.
* ``ShardedModel.restore()`` gives the module back as it came (its own classes, hooks and ``Parameter``
  objects, with the trained values): a trainer reads and exports its weights as after an unsharded run, and the
  base model may be used again.

Gradients are averaged over the processes by FSDP's reduce-scatter (each process back-propagates the mean loss of
its equal share of the batch, ``train.loop.data_parallel_rows``), so N sharded processes follow the 1-process run
up to fp32 summation order. Checkpoints hold full tensors (gathered, then written by process 0) in the format an
unsharded run writes, so a run resumes under any process count, sharded or not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffstudio.errors import InvalidInputError
from diffstudio.train.options import SHARD_MODES


def check_shard(shard: str | None) -> None:
    if shard is not None and shard not in SHARD_MODES:
        raise InvalidInputError(f"unknown sharding mode {shard!r}; known: {', '.join(SHARD_MODES)}")


class _Step(nn.Module):
    """The root unit: a step's loss is computed inside its forward, so FSDP sees the whole step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn, step: int) -> torch.Tensor:
        return loss_fn(self.model, step)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of every ``ModuleList`` that hold parameters, innermost first (FSDP wraps bottom-up)."""
    found = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
             if next(child.parameters(), None) is not None]
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found, key=lambda m: -order[id(m)])


class ShardedModel:
    """``model`` sharded in place over the default process group; ``step`` runs a step's loss, ``restore()``
    undoes the sharding."""

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import fully_shard

        dtypes = {p.dtype for p in model.parameters()}
        if len(dtypes) > 1:
            raise InvalidInputError(f"sharded training needs one parameter dtype, this model holds "
                                    f"{sorted(map(str, dtypes))}; train in fp32 (--precision fp32)")
        # What fully_shard changes on each module (its class, hooks and parameters), to put back in restore().
        self._saved = [(m, type(m), {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
                       for m in model.modules()]
        self.step = _Step(model)
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(self.step)
        self._originals = [(m, name, p) for m, _, saved in self._saved
                           for name, p in saved["_parameters"].items() if p is not None]
        for _, _, p in self._originals:  # each process now keeps only its shards: the full copies go
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore(self) -> None:
        """Gather every parameter's full trained value into the module's own ``Parameter`` objects and remove
        the sharding (a collective: every process calls it)."""
        self.step.reshard()
        for m, name, original in self._originals:
            original.data = full_tensor(m._parameters[name]).detach().clone()
        for m, cls, saved in self._saved:
            m.__class__ = cls
            vars(m).clear()
            vars(m).update(saved)


def full_tensor(t):
    """The whole of a sharded tensor (a collective), or ``t`` itself when it is not sharded."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_state(state, keep: bool):
    """``state`` (a model or optimizer state dict, nested) with every sharded tensor gathered whole, one at a time
    (a collective: every process calls it); only where ``keep`` (the process that writes it) are they kept."""
    if isinstance(state, dict):
        return {k: gather_state(v, keep) for k, v in state.items()}
    if isinstance(state, list):
        return [gather_state(v, keep) for v in state]
    whole = full_tensor(state)
    return whole if keep or whole is state else None


def shard_optimizer_state(state: dict, params: list) -> dict:
    """An optimizer state dict of full tensors (a checkpoint) cut to this process's shards of ``params``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    per_param = {}
    for index, values in state["state"].items():
        p = params[int(index)]
        per_param[index] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in values.items()}
    return {**state, "state": per_param}
