"""``nn.Linear`` with a faster fp32 path on the CPU: oneDNN's inner product instead of BLAS.

PyTorch runs a float32 ``F.linear`` on the CPU as a BLAS sgemm (MKL), and bf16 through oneDNN. On the
AMD EPYC (Zen 4) development machine, oneDNN's fp32 inner product takes 0.83-0.86x MKL's CPU time for
transformer-sized matmuls (1536 x 3072 x 3072 .. 12288) and 0.6x for the adaLN modulation's
matrix-vector products (1 x 3072 x 18432); in bf16 the two are equal. A whole FLUX-width forward on a
16-core Intel Xeon took 0.83x diffusers' CPU time in fp32 (docs/benchmarks.md, "FLUX transformer").
Results are the same up to fp32 summation order.

The oneDNN op (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend emits
for linear layers) has no autograd formula, so it is used for inference only: CPU, float32, nothing
that needs a gradient, and a weight large enough (``MIN_WEIGHT_NUMEL``) that the primitive's fixed
cost (~15 us) does not dominate. Everything else goes to ``F.linear``, and so does a forward that torch.compile
traces: inductor lowers ``F.linear`` to the same kernel itself (pre-packing the weight when it freezes them),
while a direct call of the op would defeat its freezing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_WEIGHT_NUMEL = 1 << 18


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _has_onednn_linear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on the CPU in float32 inference, through oneDNN (see the module doc)."""
    if (ONEDNN_LINEAR and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.numel() >= MIN_WEIGHT_NUMEL and not x.is_sparse and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
