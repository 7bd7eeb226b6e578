"""Weights stored in float8, computed in a higher precision: per-layer upcast at forward time.

``flux1-dev-fp8.safetensors``-style checkpoints store the Linear weights as ``torch.float8_e4m3fn``
(1 byte each: FLUX-dev's 11.9 B parameters take ~12 GB instead of 24 GB in bf16). Matmuls in
float8 are not available on most hardware (and none on CPU), so we keep the weights in float8 and
upcast one layer's weight at a time, inside its forward, to the compute dtype (bf16 / fp32): the
full-precision copy of a weight lives only for the duration of that one matmul.

Only ``nn.Linear`` weights stay in float8 (they are ~99.9% of a DiT's parameters); every other
tensor (norm scales, biases, embeddings, convolutions) is cast to the compute dtype at load.

A model opts in with a class attribute ``lowbit_storage = True``: it promises that no forward
reads a weight's dtype to decide what to compute in (it computes in its input's dtype instead).
Other models (e.g. transformers' T5, which casts activations to its weights' dtype) get their
float8 tensors upcast at load: correct, without the memory saving.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffstudio.models.cpu_linear import Linear, linear

LOWBIT_DTYPES = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


class UpcastLinear(nn.Linear):
    """An ``nn.Linear`` whose (float8) weight is cast to the input's dtype for each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight.to(x.dtype), bias)


def is_lowbit(tensor: torch.Tensor) -> bool:
    return tensor.dtype in LOWBIT_DTYPES


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a loaded model computes in: set by ``cast_keeping_lowbit`` when weights stay in
    float8, else the dtype of its first parameter."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


def cast_keeping_lowbit(module: nn.Module, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                        device, consume: bool = False, lowbit: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict to assign to ``module`` (built, e.g. on the meta device, not yet loaded).

    Floating tensors are cast to ``dtype`` on ``device``, except the float8 weights of ``nn.Linear``
    layers when the module opts in (``lowbit_storage``): those stay float8, and their layers become
    ``UpcastLinear`` (same parameters, forward upcasts). ``module.compute_dtype`` records ``dtype``.

    ``consume=True`` (the loader's own state dicts) pops each tensor from ``state_dict`` as it is
    cast, so a source and its cast copy coexist one tensor at a time, not one model at a time: loading
    T5-XXL from fp16 into bf16 peaks at ~9.5 GB instead of ~19 GB.

    ``lowbit`` (a float8 dtype): store every Linear weight in it, whatever the file holds (``load(...,
    storage="fp8")``), when the module opts in; a plain cast, as the released fp8 files are.
    """
    keep: set[str] = set()
    opted_in = getattr(module, "lowbit_storage", False)
    if lowbit is not None and not opted_in:
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError(f"a {type(module).__name__} computes in its weights' dtype, so it cannot store them "
                                "in float8 (storage='fp8' is for the DiTs: FLUX, SD3, CogVideoX)")
    if opted_in and (lowbit is not None or any(is_lowbit(v) for v in state_dict.values())):
        for name, layer in module.named_modules():
            key = f"{name}.weight" if name else "weight"
            if type(layer) in (nn.Linear, Linear, UpcastLinear) and key in state_dict and (
                    lowbit is not None or is_lowbit(state_dict[key])):
                layer.__class__ = UpcastLinear  # same parameters and state-dict keys, upcasting forward
                keep.add(key)
        module.compute_dtype = dtype
    out = {}
    for key in list(state_dict):
        value = state_dict.pop(key) if consume and isinstance(state_dict, dict) else state_dict[key]
        if key in keep:
            out[key] = value.to(device=device, dtype=lowbit or value.dtype)
        elif value.is_floating_point():
            out[key] = value.to(device=device, dtype=dtype)
        else:
            out[key] = value.to(device)
    return out
