"""Which of our parameters a layer name in a LoRA file means, for any component architecture.

LoRA files name layers in whatever layout their trainer used: diffusers module paths (peft files),
the same paths with ``.`` replaced by ``_`` (kohya), the original release's names (kohya SDXL's
``input_blocks_...``, FLUX's ``double_blocks_...``), HF CLIP paths with or without ``text_model.``.
No literal tables: the names are *generated* by running the component's own converters
(``ARCHS[arch].to_canonical`` / ``to_diffusers``) on a state dict whose tensors encode their
origin. Every tensor of the module becomes ``arange(rows) + offset`` expanded over its other dims
(O(rows) memory, whatever the width), so after any renaming, splitting (FLUX's fused qkv -> to_q,
to_k, to_v) or row permutation the first column of each output tensor says which parameter and
which rows it came from.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from diffstudio.components import ARCHS

Rows = slice | torch.Tensor | None


@dataclass(frozen=True)
class Target:
    """A parameter of the patched module (its name in ``module.state_dict()``) and the rows meant."""

    param: str
    rows: Rows = None


def flatten(name: str) -> str:
    """kohya's spelling of a module path: every ``.`` becomes ``_``."""
    return name.replace(".", "_")


class NameTable:
    """Layer names (every known layout, dotted and kohya-flattened) -> ``Target`` for one module."""

    def __init__(self, params: dict[str, Target], layouts: list[str]):
        self.params = params                     # "<any layout's param name>" -> Target
        self.layouts = layouts                   # which layouts were generated ("module", "canonical", ...)
        self.flat: dict[str, str] = {}           # flatten(module path) -> a dotted module path
        ambiguous = set()
        for name in params:
            module, _, _ = name.rpartition(".")
            key = flatten(module)
            other = self.flat.get(key)
            if other is not None and params.get(other + ".weight") != params.get(module + ".weight"):
                ambiguous.add(key)
            self.flat.setdefault(key, module)
        for key in ambiguous:  # two different layers flatten alike: refuse to guess
            del self.flat[key]

    def lookup(self, module: str, param: str = "weight", flattened: bool = False) -> Target | None:
        """The target of ``<module>.<param>``; ``flattened`` names use ``_`` for ``.`` (kohya)."""
        if flattened:
            dotted = self.flat.get(module)
            if dotted is None:
                return None
            module = dotted
        return self.params.get(f"{module}.{param}")

    def has_module(self, module: str, flattened: bool = False) -> bool:
        return (module in self.flat) if flattened else (f"{module}.weight" in self.params)


def _encode(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """Each tensor -> float64 ``arange(rows) + offset`` expanded to its shape (a view, no copy)."""
    encoded, starts, names = {}, [], []
    offset = 0
    for name, tensor in sd.items():
        shape = tuple(tensor.shape)
        rows = shape[0] if shape else 1
        values = torch.arange(offset, offset + rows, dtype=torch.float64)
        encoded[name] = values.reshape(-1, *([1] * (len(shape) - 1))).expand(shape) if shape else values[0]
        starts.append(offset)
        names.append(name)
        offset += rows
    return encoded, starts, names


def _decode(tensor: torch.Tensor, starts: list[int], names: list[str], sizes: dict[str, int]) -> Target | None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
        return None
    if tensor.ndim == 0:
        first = last = tensor.reshape(1)
    else:
        first = tensor[(slice(None),) + (0,) * (tensor.ndim - 1)]
        last = tensor[(slice(None),) + (-1,) * (tensor.ndim - 1)]
    if not torch.equal(first, last) or not torch.equal(first, first.round()):
        return None  # columns were split or values mixed: not a row-wise rename
    i = bisect.bisect_right(starts, int(first[0])) - 1
    name = names[i]
    rows = (first - starts[i]).long()
    if int(rows.min()) < 0 or int(rows.max()) >= sizes[name]:
        return None  # rows from two parameters (a concatenation): not one target
    n = sizes[name]
    if tensor.ndim == 0 or (rows.numel() == n and torch.equal(rows, torch.arange(n))):
        return Target(name)
    start = int(rows[0])
    if torch.equal(rows, torch.arange(start, start + rows.numel())):
        return Target(name, slice(start, start + rows.numel()))
    return Target(name, rows)


def build_table(module: nn.Module, arch: str | None, config=None) -> NameTable:
    """The name table of ``module`` (a component of architecture ``arch`` with ``config``)."""
    sd = dict(module.state_dict(keep_vars=True))
    sizes = {k: (v.shape[0] if v.ndim else 1) for k, v in sd.items()}
    params = {name: Target(name) for name in sd}
    layouts = ["module"]
    spec = ARCHS.get(arch) if arch else None
    if spec is not None:
        encoded, starts, names = _encode(sd)
        try:
            canonical = spec.to_canonical(encoded)
        except Exception:  # noqa: BLE001 - a converter that cannot run on this module: module names only
            canonical = None
        if canonical is not None:
            layouts.append("canonical")
            _add_decoded(params, canonical, starts, names, sizes)
            diffusers = _diffusers_names(spec, canonical, config, {n for n, _ in module.named_buffers()})
            if diffusers is not None:
                layouts.append("diffusers")
                _add_decoded(params, diffusers, starts, names, sizes)
    return NameTable(params, layouts)


def _diffusers_names(spec, canonical: dict, config, buffers: set[str]) -> dict | None:
    """The encoded state dict in diffusers' names; None when the converter cannot run. A converter that checks
    buffers for equal values (AnimateDiff's position tables, which diffusers keeps once per block) refuses the
    encoded copies: it is run again without the buffers, which no LoRA patches anyway."""
    if config is None:
        return None
    for sd in (canonical, {k: v for k, v in canonical.items() if k not in buffers}):
        try:
            return spec.to_diffusers(sd, config)
        except Exception:  # noqa: BLE001 - e.g. a converter still missing for a new family
            continue
    return None


def _add_decoded(params, sd, starts, names, sizes) -> None:
    for name, tensor in sd.items():
        target = _decode(tensor, starts, names, sizes)
        if target is not None:
            params.setdefault(name, target)


_TABLES: weakref.WeakKeyDictionary[nn.Module, NameTable] = weakref.WeakKeyDictionary()


def table_for(module: nn.Module, arch: str | None, config=None) -> NameTable:
    """``build_table`` cached per module object."""
    table = _TABLES.get(module)
    if table is None:
        table = _TABLES[module] = build_table(module, arch, config)
    return table
