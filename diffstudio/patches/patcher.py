"""Non-destructive weight patches over one ``nn.Module`` (ARCHITECTURE.md, principle 6).

A ``ModulePatcher`` keeps, per parameter name, a list of ``Patch`` objects. Each patch knows how to
compute its float32 delta at strength 1 (``Patch.delta(base)``) and carries its own strength and
mode:

* ``"merged"``: ``W' = W + Σ strength_k · ΔW_k`` is written into the parameter in place (so every
  holder of the parameter sees it). The original is backed up on the first merge and every refresh
  starts from that backup, so changing strengths never drifts, and removing the last patch copies the
  backup back: the base is restored bit for bit.
* ``"on_the_fly"``: the parameter is never touched; a forward hook on its ``nn.Linear`` / ``nn.Conv*``
  adds the patch's contribution to the output at run time, computed in the input's dtype from the
  factors (``x Aᵀ Bᵀ`` for a plain linear LoRA) or from a cached float32 delta. This keeps fp8 / low
  precision bases exact where merging would round the sum. Patches on other modules (norms,
  embeddings) are merged instead.

A patch may target some rows of a parameter (``rows``): FLUX's fused qkv weight receives separate
q, k and v deltas from diffusers-style files.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.errors import LoRAMismatchError

MODES = ("merged", "on_the_fly")

Rows = slice | torch.Tensor | None


@dataclass(eq=False)
class Patch:
    """One delta for one parameter: ``kind`` + ``tensors`` + ``strength`` (+ the rows it covers).

    ``compute(base)`` returns the float32 delta at strength 1 (``base`` is the original weight or its
    rows, needed by DoRA); ``factors`` is ``(down, up, scale)`` for a plain linear LoRA, which the
    on-the-fly mode applies without building ΔW.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    compute: Callable[[torch.Tensor], torch.Tensor]
    strength: float = 1.0
    mode: str = "merged"
    rows: Rows = None
    factors: tuple[torch.Tensor, torch.Tensor, float] | None = None
    source: str = ""  # the file's layer name, for messages

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The float32 delta shaped like ``base`` (the target weight or its rows), at strength 1.

        Recomputed on each call (a matmul of small factors): keeping every delta would cost a float32
        copy of each patched weight.
        """
        delta = self.compute(base)
        if delta.numel() != base.numel():
            raise LoRAMismatchError(f"{self.source}: a {self.kind} delta of shape {tuple(delta.shape)} does not fit "
                                    f"the weight of shape {tuple(base.shape)}; the LoRA was made for another model")
        return delta.reshape(base.shape).to(base.device)


def _rows_of(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return tensor if rows is None else tensor[rows]


def _row_index(rows: Rows, n: int, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(n, device=device)[rows]
    return rows.to(device)


class ModulePatcher:
    """What is applied to one module's weights now: the patch lists in use, the backups of merged
    parameters, the forward hooks. Get it with ``patcher_for(module)``.

    The patch lists themselves belong to a ``Models`` (``models.patches[role]``): several ``Models``
    clones share one module, and ``use(lists)`` switches the module's weights to another clone's
    patches (recomputed from the backups, so switching back and forth never drifts).
    """

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)
        self.patches: dict[str, list[Patch]] = {}  # the lists in use (a Models' own dict)
        self.backups: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._live_cache: dict[str, torch.Tensor] = {}  # on-the-fly summed materialised deltas

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError("the patched module no longer exists")
        return module

    # -- bookkeeping ---------------------------------------------------------------------------
    def add(self, name: str, patch: Patch) -> None:
        if patch.mode not in MODES:
            raise ValueError(f"unknown patch mode {patch.mode!r}; use one of {MODES}")
        owner, _, attr = name.rpartition(".")
        target = self.module.get_submodule(owner) if owner else self.module
        if not isinstance(getattr(target, attr, None), torch.Tensor):
            raise LoRAMismatchError(f"{self.module.__class__.__name__} has no parameter {name!r}")
        if patch.mode == "on_the_fly" and not _supports_hook(target, attr):
            patch.mode = "merged"  # norms, embeddings: nothing to hook, merging is exact enough
        self.patches.setdefault(name, []).append(patch)

    def remove(self, patch: Patch) -> str | None:
        for name, patches in self.patches.items():
            if patch in patches:
                patches.remove(patch)
                return name
        return None

    def use(self, patches: dict[str, list[Patch]]) -> None:
        """Make ``patches`` (a Models' lists for this module) the ones applied to the weights."""
        if patches is self.patches:
            return
        names = set(self.patches) | set(patches)
        self.patches = patches
        self.refresh(names)

    def in_use(self, patches: dict[str, list[Patch]]) -> bool:
        return patches is self.patches

    def is_patched(self) -> bool:
        return any(self.patches.values()) or bool(self.backups)

    # -- applying ------------------------------------------------------------------------------
    def _param(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        return getattr(self.module.get_submodule(owner) if owner else self.module, attr)

    def original(self, name: str) -> torch.Tensor:
        """The unpatched value of a parameter (its backup while merged patches are in it)."""
        return self.backups.get(name, self._param(name))

    @torch.no_grad()
    def refresh(self, names=None) -> None:
        """Recompute the given parameters (default: all) from their original and their patches."""
        for name in list(self.patches) if names is None else names:
            patches = self.patches.get(name, [])
            self._refresh_merged(name, [p for p in patches if p.mode == "merged"])
            self._live_cache.pop(name, None)
            if not patches:
                self.patches.pop(name, None)
        self._sync_hooks()
        if names and getattr(self.module, "frozen_weights", False):  # Models.compile(freeze=True)
            import torch

            torch.compiler.reset()  # the compiled code holds the old weights as constants: compile again

    def _refresh_merged(self, name: str, merged: list[Patch]) -> None:
        param = self._param(name)
        if not merged:
            if name in self.backups:
                param.copy_(self.backups.pop(name))
            return
        if name not in self.backups:
            self.backups[name] = param.detach().clone()
        base = self.backups[name]
        total = base.float().clone()
        for patch in merged:
            if patch.strength == 0:
                continue
            part = _rows_of(base, patch.rows)
            step = patch.delta(part) * patch.strength
            if patch.rows is None:
                total += step
            else:
                total[patch.rows] += step
        param.copy_(total.to(param.dtype))

    # -- on the fly ----------------------------------------------------------------------------
    def _sync_hooks(self) -> None:
        wanted = set()
        for name, patches in self.patches.items():
            if any(p.mode == "on_the_fly" for p in patches):
                wanted.add(name.rpartition(".")[0])
        for owner in list(self._hooks):
            if owner not in wanted:
                self._hooks.pop(owner).remove()
        for owner in wanted - set(self._hooks):
            target = self.module.get_submodule(owner) if owner else self.module
            self._hooks[owner] = target.register_forward_hook(self._hook_for(owner))

    def _hook_for(self, owner: str):
        prefix = f"{owner}." if owner else ""

        def hook(module: nn.Module, args, output):
            x = args[0]
            for attr in ("weight", "bias"):
                live = [p for p in self.patches.get(prefix + attr, ())
                        if p.mode == "on_the_fly" and p.strength != 0]
                if live:
                    output = self._add_live(module, attr, prefix + attr, live, x, output)
            return output

        return hook

    def _add_live(self, module, attr, name, live, x, output):
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        base = self.original(name)
        factored = [p for p in live if attr == "weight" and p.factors is not None and isinstance(module, nn.Linear)]
        rest = [p for p in live if p not in factored]
        for p in factored:  # x Aᵀ Bᵀ · scale · strength, never building ΔW
            down, up, scale = p.factors
            part = F.linear(F.linear(x, down.to(x)), up.to(x)) * (scale * p.strength)
            output = _add_channels(output, part, p.rows, channel_dim, base.shape[0])
        if rest:
            delta = self._live_cache.get(name)
            if delta is None:
                delta = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
                for p in rest:
                    step = p.delta(_rows_of(base, p.rows)) * p.strength
                    if p.rows is None:
                        delta += step
                    else:
                        delta[p.rows] += step
                self._live_cache[name] = delta
            if attr == "bias":
                shape = [1] * output.ndim
                shape[channel_dim] = -1
                output = output + delta.to(output.dtype).reshape(shape)
            elif isinstance(module, nn.Linear):
                output = output + F.linear(x, delta.to(x.dtype)).to(output.dtype)
            else:
                conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[delta.ndim - 2]
                output = output + conv(x, delta.to(x.dtype), None, module.stride, module.padding,
                                       module.dilation, module.groups).to(output.dtype)
        return output


def _supports_hook(module: nn.Module, attr: str) -> bool:
    if attr not in ("weight", "bias"):
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros"


def _add_channels(output: torch.Tensor, part: torch.Tensor, rows: Rows, dim: int, channels: int) -> torch.Tensor:
    if rows is None:
        return output + part.to(output.dtype)
    index = _row_index(rows, channels, output.device)
    return output.index_add(dim % output.ndim, index, part.to(output.dtype))


_ATTR = "_diffstudio_patcher"


def patcher_for(module: nn.Module, create: bool = True) -> ModulePatcher | None:
    """The one patcher of ``module`` (created on first use), kept on the module itself."""
    patcher = module.__dict__.get(_ATTR)
    if patcher is None and create:
        patcher = ModulePatcher(module)
        module.__dict__[_ATTR] = patcher
    return patcher
