"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3): the CPU fp32 speed-up of ``Models.winograd()``.

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks". A 3x3 convolution's output is cut into
4x4 tiles; each tile needs the 6x6 input patch around it. In the transformed domain the convolution of a patch
``d`` with a kernel ``g`` is an elementwise product, so

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

and summed over input channels the 36 elementwise products become 36 matrix products (out x in) @ (in x tiles):
2.25 multiplications per output value and input channel instead of 9. The three stages here:

1. input transform ``V = Bᵀ d B`` of every 6x6 patch (stride 4) for every channel: one convolution of each channel
   with the 36 fixed 6x6 kernels ``B[:, u] B[:, v]ᵀ`` (stride 4), which oneDNN runs at full speed;
2. 36 matrix products ``U[k] @ V[k]`` with the transformed kernels ``U = G g Gᵀ``, kept per weight version
   (4x the layer's weight memory; transforming them at every call costs about what the products save);
3. output transform ``Y = Aᵀ M A``: one (16 x 36) matrix product, then the 4x4 tiles put back in place.

The matrices are Lavin & Gray's for the interpolation points 0, ±1, ±2 (and ∞). The arithmetic differs from a
direct convolution: in fp32 the relative error against a float64 reference is about 3e-6 (a direct convolution's
about 2e-7); docs/benchmarks.md has the speed. Used only where it wins: float32 on the CPU, inference, at least
``MIN_IN_CHANNELS`` input channels and ``MIN_MACS`` of work; other calls run the normal convolution.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

M, R = 4, 3  # output tile side, kernel side
A_SIDE = M + R - 1  # input patch side (6)
MIN_IN_CHANNELS = 128  # fewer, or less work than MIN_MACS a picture: the transforms cost more than they save
MIN_MACS = 2 ** 26  # multiply-adds of the direct convolution, per picture
# Kernels (in x out) of the widest layer switched by default. The kept kernels take 4x a layer's weights, and the
# wide layers (SD's and SDXL's 1280-channel levels) hold most of a UNet's weights but, at low resolution, little of
# its convolution time: switching them too (wide=True) costs 8.3 GB more for SD 1.5 in fp32, 5 GB for SDXL
NARROW_KERNELS = 1920 * 640
BAND_COLUMNS = 512  # tiles (over the batch) per matrix product: larger maps are done in bands of tile rows

# Lavin & Gray's F(4, 3) matrices (points 0, 1, -1, 2, -2, infinity)
B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@functools.cache
def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(36, 1, 6, 6) input-transform kernels and the (16, 36) output transform, built in float64."""
    b_t, a_t = torch.tensor(B_T, dtype=torch.float64), torch.tensor(A_T, dtype=torch.float64)
    patch = torch.einsum("ui,vj->uvij", b_t, b_t).reshape(A_SIDE * A_SIDE, 1, A_SIDE, A_SIDE)
    tile = torch.einsum("iu,jv->ijuv", a_t, a_t).reshape(M * M, A_SIDE * A_SIDE)
    return patch.to(dtype=dtype, device=device), tile.to(dtype=dtype, device=device)


@functools.cache
def _kernel_transform(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """G ⊗ G as (36, 9): ``U[6a + b] = Σ_jk G[a, j] G[b, k] g[3j + k]``."""
    g = torch.tensor(G, dtype=torch.float64)
    return torch.kron(g, g).to(dtype=dtype, device=device)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``U = G g Gᵀ`` of every (out, in) 3x3 kernel, as (36, out, in) in the weight's dtype: one matrix product."""
    out, inputs = weight.shape[:2]
    flat = weight.detach().reshape(out * inputs, R * R)
    return (_kernel_transform(weight.dtype, weight.device) @ flat.T).view(A_SIDE * A_SIDE, out, inputs)


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` given as ``u = transform_weight(weight)``.
    Large maps are done in bands of tile rows, so that each band's transformed tiles stay in cache."""
    n, _, h, w = x.shape
    rows, cols = -(-h // M), -(-w // M)  # tiles
    padded = F.pad(x, (1, 1 + cols * M - w, 1, 1 + rows * M - h))
    band = max(1, BAND_COLUMNS // (n * cols))
    if band >= rows:
        return _tiles(padded, u, bias)[:, :, :h, :w]
    out = x.new_empty(n, u.shape[1], h, w)
    for first in range(0, rows, band):
        last = min(rows, first + band)
        part = _tiles(padded[:, :, first * M:last * M + R - 1], u, bias)
        out[:, :, first * M:last * M] = part[:, :, :h - first * M, :w]
    return out


def _tiles(padded: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The convolution of a padded map whose sides are 4k + 2 (every output tile whole)."""
    n, c, height, width = padded.shape
    rows, cols = (height - R + 1) // M, (width - R + 1) // M
    tiles = rows * cols
    patch, tile = _transforms(padded.dtype, padded.device)
    v = F.conv2d(padded.reshape(n * c, 1, height, width), patch, stride=M)  # (n c, 36, rows, cols)
    v = v.view(n, c, A_SIDE * A_SIDE, tiles).permute(2, 1, 0, 3).reshape(A_SIDE * A_SIDE, c, n * tiles)
    products = torch.matmul(u, v)  # (36, out, n tiles)
    out = u.shape[1]
    y = (tile @ products.view(A_SIDE * A_SIDE, out * n * tiles)).view(M, M, out, n, rows, cols)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, out, rows * M, cols * M)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def eligible(conv: nn.Module) -> bool:
    """A 3x3, stride-1, padding-1 convolution without groups or dilation, zero padded."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state dict) whose large fp32 CPU inference calls run
    ``winograd_conv3x3`` with its transformed kernels kept between calls (per weight version: a merged LoRA or a
    move to another device transforms them again); made by ``use_winograd`` from a plain one. Layers with more than
    ``NARROW_KERNELS`` kernels (in x out) keep torch's convolution unless ``wide``."""

    wide: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dim() != 4 or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
                or self.in_channels < MIN_IN_CHANNELS
                or (not self.wide and self.in_channels * self.out_channels > NARROW_KERNELS)
                or 9 * self.in_channels * self.out_channels * x.shape[-2] * x.shape[-1] < MIN_MACS):
            return super().forward(x)
        key = (weight._version, weight.data_ptr(), weight.device)
        kept = self.__dict__.get("_winograd_kernels")
        if kept is None or kept[0] != key:
            kept = (key, transform_weight(weight))
            self.__dict__["_winograd_kernels"] = kept
        return winograd_conv3x3(x, kept[1], self.bias)


def use_winograd(module: nn.Module, enabled: bool = True, wide: bool = False) -> int:
    """Switch every eligible 3x3 convolution in ``module`` to ``WinogradConv2d`` (or back with ``enabled=False``,
    dropping the kept kernels); ``wide``: see ``WinogradConv2d``. Returns how many were switched."""
    switched = 0
    for conv in module.modules():
        if enabled and (eligible(conv) or type(conv) is WinogradConv2d):
            conv.__class__ = WinogradConv2d
            conv.wide = wide
            conv.__dict__.pop("_winograd_kernels", None)  # made again on the next call that uses them
            switched += 1
        elif not enabled and type(conv) is WinogradConv2d:
            conv.__class__ = nn.Conv2d
            conv.__dict__.pop("_winograd_kernels", None)
            conv.__dict__.pop("wide", None)
            switched += 1
    return switched
