"""Offload: a model's components live on the host and move to the compute device for their calls.

* ``"model"``: a whole component moves to the device when one of its calls starts (the text encoders while the
  prompts are encoded, the denoiser while sampling, the VAE while decoding) and stays there until another
  component's call needs the device, which sends it back to the host first. The device holds one component at
  a time; each moves twice per generation.
* ``"sequential"``: the VAE as above; the denoiser's and the text encoders' blocks (``sequential_units``: the
  items of their ModuleLists, and any other top-level child holding a tenth of the parameters, such as a UNet's
  middle block) move to the device one at a time, for their call, and back after it. What is not in a block
  (embeddings, the final layer) moves with the component's first call and stays until another component's.
  Every block crosses the bus twice per call: slow, the last resort. Blocks are not prefetched.
* ``"group"``: the blocks of ``"sequential"``, streamed: when a block starts, the copy of the block that came
  after it in the previous call (the next registered one the first time) starts too, on a side stream from
  pinned host memory on CUDA (memory/prefetch.py), so the bus works while the device computes. A block leaves
  by dropping its device copy (the host copy stays, pinned). The device holds the running block and the next one,
  as the planner assumes for both blockwise modes; the host's weights become pinned memory.

Add-ons follow the component they serve (``join``): a ControlNet, a motion module and an IP-Adapter's
projections are called between the denoiser's own calls at every step, so they travel with the denoiser (on the
device whenever it is, moved whole in either mode) instead of sending it away mid-step. An IP-Adapter's image
encoder runs once per generation, like a text encoder, and is a component of its own (``add``).

Hooks do the moving, so the pipeline, the families and the models know nothing of it: a forward pre-hook on a
component and on each of its direct children (``vae.decode`` is not ``forward``, but it calls children) moves
the component when needed, and the tensors of the call's arguments to the device. The results stay on the
device; callers already move what they keep (latents live on the host).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from diffstudio.errors import InvalidInputError
from diffstudio.memory.prefetch import BlockStream

MODES = ("model", "group", "sequential")
BLOCKWISE = ("group", "sequential")
BLOCK_SHARE = 0.1  # a top-level child with at least this share of the parameters is a block of its own


def sequential_units(module: nn.Module) -> list[nn.Module]:
    """The blocks sequential offload moves one at a time, in the order they are registered: the items of the
    module's ModuleLists, and each other child holding ``BLOCK_SHARE`` of its parameters, itself, or, when that
    child directly holds a ModuleList (T5's encoder stack), its blocks found the same way."""
    total = sum(p.numel() for p in module.parameters()) or 1
    units = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            units += list(child)
        elif sum(p.numel() for p in child.parameters()) >= BLOCK_SHARE * total:
            holds_list = any(isinstance(c, nn.ModuleList) for c in child.children())
            units += sequential_units(child) if holds_list else [child]
    return list({id(unit): unit for unit in units}.values())  # a module registered twice (T5's shared embedding)


class Offloader:
    """Moves ``components`` (role -> module) between ``host`` and ``device`` as their calls need them.
    ``move(module_or_tensor, device)`` does each move and returns the moved object (tests record it)."""

    def __init__(self, components: dict[str, nn.Module], device, mode: str, blockwise=(),
                 host="cpu", move: Callable | None = None):
        """``blockwise``: the roles that sequential offload moves block by block (the others move whole)."""
        if mode not in MODES:
            raise InvalidInputError(f"offload {mode!r}: choose one of {', '.join(MODES)} (or None)")
        self.device, self.host, self.mode = torch.device(device), torch.device(host), mode
        self.move = move or (lambda module, where: module.to(where))
        self.current: str | None = None
        self.components = components
        self.handles = []
        self._resident: dict[str, list] = {}
        self._streamers: dict[str, BlockStream] = {}  # group offload: role -> its blocks' transfers
        self._entries: dict[str, Callable] = {}  # role -> the pre-hook that brings it (and its add-ons) in
        self.companions: dict[str, dict[str, nn.Module]] = {}  # role -> {add-on key: module} (join)
        self._companion_handles: dict[tuple[str, str], list] = {}
        for role, module in components.items():
            self.move(module, self.host)
            if mode in BLOCKWISE and role in blockwise and sequential_units(module):
                self._hook_blocks(role, module)
            else:
                self._hook_component(role, module)

    def add(self, role: str, module: nn.Module) -> None:
        """A component of its own, moved whole for its calls (an IP-Adapter's image encoder); a module already
        known is kept, a role name already taken gets a number."""
        if any(known is module for known in self.components.values()):
            return
        base, n = role, 1
        while role in self.components:
            role, n = f"{base}#{n}", n + 1
        self.components[role] = module
        self.move(module, self.host)
        self._hook_component(role, module)

    def join(self, role: str, key: str, module: nn.Module) -> None:
        """Let ``module`` travel with ``role``: on the device whenever ``role`` is, and its calls bring ``role``
        in. ``key`` names the add-on's slot (a ControlNet's path, "motion"): joining a key again replaces the
        module that held it."""
        slot = self.companions.setdefault(role, {})
        if slot.get(key) is module:
            return
        if key in slot:
            self.move(slot[key], self.host)
            for handle in self._companion_handles.pop((role, key)):
                handle.remove()
        slot[key] = module
        self.move(module, self.device if self.current == role else self.host)
        entry = self._entries[role]
        self._companion_handles[(role, key)] = [target.register_forward_pre_hook(entry, with_kwargs=True)
                                                for target in (module, *module.children())]

    def _inputs(self, args, kwargs):
        return tree_map(lambda v: self.move(v, self.device) if isinstance(v, torch.Tensor) else v, (args, kwargs))

    def _hook_component(self, role: str, module: nn.Module) -> None:
        def enter(_, args, kwargs):
            self.activate(role)
            return self._inputs(args, kwargs)

        self._entries[role] = enter
        for target in (module, *module.children()):
            self.handles.append(target.register_forward_pre_hook(enter, with_kwargs=True))

    def _hook_blocks(self, role: str, module: nn.Module) -> None:
        units = sequential_units(module)
        in_units = {id(t) for unit in units for t in (*unit.parameters(), *unit.buffers())}
        resident = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in in_units]

        def enter(_, args, kwargs):  # the component's call: its resident part to the device, once
            if self.current != role:
                self.activate(role, whole=False)
                for tensor in resident:
                    tensor.data = self.move(tensor.data, self.device)
            return self._inputs(args, kwargs)

        self._entries[role] = enter
        if self.mode == "group":
            block_in, block_out = self._streamed_blocks(role, units)
        else:
            def block_in(unit, args, kwargs):
                self.move(unit, self.device)
                return self._inputs(args, kwargs)

            def block_out(unit, args, kwargs, output):
                self.move(unit, self.host)

        for target in (module, *module.children()):  # children too: vae.decode-like entry points
            self.handles.append(target.register_forward_pre_hook(enter, with_kwargs=True))
        for unit in units:
            self.handles.append(unit.register_forward_pre_hook(block_in, with_kwargs=True))
            self.handles.append(unit.register_forward_hook(block_out, with_kwargs=True))
        self._resident[role] = resident

    def _streamed_blocks(self, role: str, units: list[nn.Module]):
        """Group offload's block hooks: run a block once its copy has arrived, and start the copy of the block
        that followed it last time (learned per call order; the next registered one until then, and after the
        last block the first, for the next step's call)."""
        streamer = self._streamers[role] = BlockStream(self.device)
        following = {id(a): b for a, b in zip(units, units[1:] + units[:1])}  # the last: the next call's first
        previous: list[nn.Module | None] = [None]

        def block_in(unit, args, kwargs):
            streamer.ready(unit)
            if previous[0] is not None:
                following[id(previous[0])] = unit
            previous[0] = unit
            upcoming = following.get(id(unit))
            if upcoming is not None and upcoming is not unit:
                streamer.fetch(upcoming)
            return self._inputs(args, kwargs)

        def block_out(unit, args, kwargs, output):
            streamer.evict(unit)

        return block_in, block_out

    def activate(self, role: str, whole: bool = True) -> None:
        """Make ``role`` the component on the device, sending the one there back to the host."""
        if self.current == role:
            return
        self.release()
        if whole:
            self.move(self.components[role], self.device)
        for module in self.companions.get(role, {}).values():
            self.move(module, self.device)
        self.current = role

    def release(self) -> None:
        """Send the component on the device back to the host (e.g. after a generation)."""
        if self.current is None:
            return
        for tensor in self._resident.get(self.current, ()):
            tensor.data = self.move(tensor.data, self.host)
        if self.current in self._streamers:
            self._streamers[self.current].clear()  # a block fetched ahead for a call that did not come
        if self.current not in self._resident:
            self.move(self.components[self.current], self.host)
        for module in self.companions.get(self.current, {}).values():
            self.move(module, self.host)
        self.current = None

    def remove(self) -> None:
        """Take the hooks off; every component stays on the host."""
        self.release()
        for handle in (*self.handles, *(h for hs in self._companion_handles.values() for h in hs)):
            handle.remove()
        self.handles.clear()
        self._companion_handles.clear()
