"""Blocks shared by every architecture: one attention function and timestep embeddings.

Keeping attention in one place means a faster kernel, a memory-saving variant or an
attention hook (region masks, IP-Adapter) is written once for every family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.cpu_linear import Linear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    q: (B, Nq, heads*d), k/v: (B, Nk, heads*d) -> (B, Nq, heads*d).
    mask: boolean (True = attend) or additive float, broadcastable to (B, heads, Nq, Nk).
    """
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, inner)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim).

    The LDM convention is ``[cos, sin]`` with frequencies exp(-ln(max_period) * i / half).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1) if flip_sin_to_cos else \
        torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2: the transformer MLP of DiT-style models (MMDiT,
    Hunyuan-DiT), with timm's parameter names (``fc1``, ``fc2``) that their releases keep."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
