"""Measuring memory: the peak of live tensor bytes (what a GPU allocator's ``max_memory_allocated`` reports),
and a process's peak resident set size.

``TensorPeak`` counts, while it is active, every tensor storage an operation creates and forgets it when the
storage is freed, so its ``peak`` is the most bytes the operations inside held at once above what existed before
(weights, inputs). It sees storages, not views, so a view or an in-place result is not counted twice. Buffers an
operator allocates and frees inside its own kernel (an attention kernel's workspace) are not seen; they are small
next to its outputs.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """``with TensorPeak() as peak: model(x)`` -> ``peak.peak`` bytes (and ``peak.current`` at the end)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}  # id of a storage we count -> its bytes
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for value in tree_flatten(out)[0]:
            # a view or in-place result shares an input's storage: new only if that storage is new
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and \
                    id(value.untyped_storage()) not in inputs:
                self._count(value.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)


def process_memory() -> dict[str, int]:
    """This process's resident set now (``VmRSS``) and at its peak (``VmHWM``), in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields
