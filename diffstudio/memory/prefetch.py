"""Group offload's transfers: a block's weights go to the device *ahead* of its call, so the copy of the next block
overlaps the computation of the current one.

On CUDA the copies run on a side stream from pinned (page-locked) host memory, which is what lets a host-to-device
copy run asynchronously; the compute stream waits on the copy's event before the block runs, and each device
tensor is marked as used by the compute stream (``record_stream``) so the allocator does not hand its memory to the
next copy while the block still reads it. A block leaves the device by dropping its device copy: the host copy
is kept (pinned once, on the first move), and inference does not change weights, so nothing is copied back.
Weights patched between calls (a LoRA merged into the host copy) are picked up on the next fetch, because the
host copy is whatever the parameter holds when the fetch starts.

On other devices (and on the CPU, where tests run it) the same bookkeeping runs with synchronous copies.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def _tensors(unit: nn.Module) -> list[torch.Tensor]:
    return [*unit.parameters(), *unit.buffers()]


class BlockStream:
    """``fetch(unit)`` starts a block's copy to ``device``; ``ready(unit)`` makes the compute stream wait for it
    (fetching it now if it was not); ``evict(unit)`` drops the device copy. One block may be in flight at a time:
    a new fetch cancels one that was never used (a wrong guess of the next block costs a copy, never memory)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: tuple[nn.Module, object, list] | None = None  # (unit, copy event, [(tensor, host data)])
        self.on_device: dict[int, list] = {}  # id(unit) -> [(tensor, host data)]

    def fetch(self, unit: nn.Module) -> None:
        if id(unit) in self.on_device or (self.pending is not None and self.pending[0] is unit):
            return
        self._cancel()
        pairs = []
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            for tensor in _tensors(unit):
                host = tensor.data
                if self.stream is not None and not host.is_pinned():
                    host = host.pin_memory()
                tensor.data = host.to(self.device, non_blocking=self.stream is not None)
                pairs.append((tensor, host))
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending = (unit, event, pairs)

    def ready(self, unit: nn.Module) -> None:
        if id(unit) in self.on_device:
            return
        self.fetch(unit)
        _, event, pairs = self.pending
        self.pending = None
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor, _ in pairs:
                tensor.data.record_stream(compute)
        self.on_device[id(unit)] = pairs

    def evict(self, unit: nn.Module) -> None:
        for tensor, host in self.on_device.pop(id(unit), ()):
            tensor.data = host

    def _cancel(self) -> None:
        if self.pending is not None:
            for tensor, host in self.pending[2]:
                tensor.data = host  # the copy in flight finishes on the side stream; its memory is freed after
            self.pending = None

    def clear(self) -> None:
        """Every block back to its host copy (the component leaves the device)."""
        self._cancel()
        for pairs in self.on_device.values():
            for tensor, host in pairs:
                tensor.data = host
        self.on_device.clear()

    def blocks_on_device(self) -> int:
        return len(self.on_device) + (self.pending is not None)
