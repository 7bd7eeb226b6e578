"""The temporal blocks of Stable Video Diffusion's spatio-temporal UNet (generative-models' ``VideoUNet``).

Reference: Blattmann et al. 2023, "Stable Video Diffusion: Scaling Latent Video Diffusion Models to Large
Datasets" (arXiv:2311.15127), and its predecessor "Align your Latents" (Blattmann et al. 2023,
arXiv:2304.08818, fig. 4 and eq. 3): every spatial layer of an image UNet is followed by a temporal layer,
and the two are blended with a learned factor alpha = sigmoid(mix_factor):

    out = alpha * spatial + (1 - alpha) * temporal

(alpha = 1 for frames marked as lone images by ``image_only_indicator``).

Parameter names are the release's (``time_stack``, ``time_mixer.mix_factor``, ``time_pos_embed``), so
``svd.safetensors`` / ``svd_xt.safetensors`` load without renaming. The spatial halves are the LDM UNet's
blocks (``models/unet.py``); this file adds only what runs across frames.

Shapes: activations enter as (B*T, C, H, W) with the T frames of each video consecutive; ``frames`` carries
T and the per-frame values every temporal layer needs (`Frames`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.cpu_linear import Linear
from diffstudio.models.layers import timestep_embedding
from diffstudio.models.unet import (
    CrossAttention,
    FeedForward,
    ResBlock,
    SpatialTransformer,
    group_norm,
    silu_,
)

# generative-models' max_ddpm_temb_period: the sinusoid period of the frame-position embedding.
FRAME_EMBED_PERIOD = 10000.0


@dataclass
class Frames:
    """What every temporal layer of one UNet call needs.

    num_frames: T, frames per video (the batch axis holds B*T frames, video by video).
    position_ids: (T,) long, the position each frame's temporal embedding is taken at (0..T-1 by default;
        ExVideo's ping-pong map beyond the base length, models/exvideo.py).
    image_only: (B, T) bool or None; True marks frames trained as lone images (alpha forced to 1).
    """

    num_frames: int
    position_ids: torch.Tensor
    image_only: torch.Tensor | None = None


def blend(mix_factor: torch.Tensor, spatial: torch.Tensor, temporal: torch.Tensor, frames: Frames,
          frame_axis: int) -> torch.Tensor:
    """alpha * spatial + (1 - alpha) * temporal with alpha = sigmoid(mix_factor) ("learned_with_images").

    ``frame_axis``: 2 for (B, C, T, H, W) tensors; 0 for (B*T, N, C) tensors (frames in the batch axis).
    """
    alpha = torch.sigmoid(mix_factor.float())                            # (1,)
    if frames.image_only is not None:
        alpha = torch.where(frames.image_only.bool().to(alpha.device), torch.ones_like(alpha), alpha)  # (B, T)
        if frame_axis == 2:
            alpha = alpha[:, None, :, None, None]
        else:
            alpha = alpha.reshape(-1, 1, 1)
    alpha = alpha.to(spatial.dtype)
    return torch.lerp(temporal, spatial, alpha)  # temporal + alpha * (spatial - temporal)


class AlphaBlender(nn.Module):
    """Holds the learned blend factor (``time_mixer.mix_factor``, initialised to 0.5 like the release)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([0.5]))


class TemporalResBlock(nn.Module):
    """openaimodel.ResBlock with dims=3 and kernel (3, 1, 1): a ResBlock that convolves along time only.

    x (B, C, T, H, W), emb (B, T, E): the time embedding is projected per frame and added along T
    (the release's ``exchange_temb_dims``). Input and output widths are equal (identity skip).
    """

    def __init__(self, channels: int, emb_channels: int, groups: int):
        super().__init__()
        conv = dict(kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels, channels, **conv))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(), nn.Identity(),
                                        nn.Conv3d(channels, channels, **conv))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](silu_(group_norm(self.in_layers[0], x)))            # (B, C, T, H, W)
        h = h + self.emb_layers[1](F.silu(emb)).permute(0, 2, 1)[..., None, None].to(h.dtype)
        h = self.out_layers[3](silu_(group_norm(self.out_layers[0], h)))
        # x first: a sum takes its first operand's memory layout, so the block's output keeps the input's whatever
        # layout the convolution wrote (a channels_last activation would slow every later CPU GroupNorm many times).
        return x + h


class VideoResBlock(ResBlock):
    """generative-models' VideoResBlock: the image ResBlock per frame, then a TemporalResBlock across frames,
    blended by ``time_mixer``. (B*T, C_in, H, W) -> (B*T, C_out, H, W)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__(channels, emb_channels, out_channels, groups)
        self.time_stack = TemporalResBlock(out_channels, emb_channels, groups)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: Frames) -> torch.Tensor:
        h = super().forward(x, emb)                                            # (B*T, C, H, W)
        bt, c, hgt, wid = h.shape
        t = frames.num_frames
        video = h.view(bt // t, t, c, hgt, wid).permute(0, 2, 1, 3, 4)       # (B, C, T, H, W)
        temporal = self.time_stack(video, emb.view(bt // t, t, -1))
        out = blend(self.time_mixer.mix_factor, video, temporal, frames, frame_axis=2)
        return out.permute(0, 2, 1, 3, 4).reshape(bt, c, hgt, wid)


class TemporalTransformerBlock(nn.Module):
    """generative-models' VideoTransformerBlock with ff_in (SVD's extra_ff_mix_layer): each spatial position's
    T frames form one sequence. Feed-forward in, self-attention over frames, cross-attention to the
    conditioning, feed-forward; every step pre-norm and residual.

    x (B*T, N, C) -> (B*T, N, C); time_context (B*N, L, D).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, time_context: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, n, c = x.shape
        b = bt // num_frames
        h = x.view(b, num_frames, n, c).transpose(1, 2).reshape(b * n, num_frames, c)  # (B*N, T, C)
        h = h + self.ff_in(self.norm_in(h))
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), time_context)
        h = h + self.ff(self.norm3(h))
        return h.view(b, n, num_frames, c).transpose(1, 2).reshape(bt, n, c)


class SpatialVideoTransformer(SpatialTransformer):
    """generative-models' SpatialVideoTransformer: after each spatial transformer block, a temporal block
    sees the same tokens plus a per-frame position embedding (``time_pos_embed`` of a sinusoid of the frame
    position), and ``time_mixer`` blends the two (Align your Latents, fig. 4).

    ``exvideo`` (None, or a models.exvideo.ExVideoPositions grafted on) replaces the sinusoid by ExVideo's
    trainable position table and adds its 3x3x3 convolution on the temporal branch's input.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int):
        super().__init__(channels, heads, dim_head, depth, context_dim, True, groups)
        inner = heads * dim_head
        self.time_stack = nn.ModuleList(TemporalTransformerBlock(inner, heads, dim_head, context_dim)
                                        for _ in range(depth))
        self.time_pos_embed = nn.Sequential(Linear(channels, channels * 4), nn.SiLU(), Linear(channels * 4, channels))
        self.time_mixer = AlphaBlender()
        self.exvideo: nn.Module | None = None

    def frame_embedding(self, frames: Frames, dtype: torch.dtype) -> torch.Tensor:
        """(T, C): the position embedding each frame's temporal branch adds."""
        if self.exvideo is not None:
            positions = self.exvideo.position_vectors(frames.position_ids)          # (T, C) trained table
        else:
            positions = timestep_embedding(frames.position_ids, self.time_pos_embed[0].in_features,
                                           max_period=FRAME_EMBED_PERIOD)
        return self.time_pos_embed(positions.to(dtype))

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: Frames) -> torch.Tensor:
        """x (B*T, C, H, W); context (B*T, L, D), each frame's copy of its video's tokens."""
        bt, c, hgt, wid = x.shape
        t = frames.num_frames
        n = hgt * wid
        # The temporal cross-attention sees the first frame's tokens at every spatial position: (B*N, L, D).
        time_context = context[::t].repeat_interleave(n, dim=0)
        h = group_norm(self.norm, x).permute(0, 2, 3, 1).reshape(bt, n, c)
        h = self.proj_in(h)                                                 # (B*T, N, inner)
        emb = self.frame_embedding(frames, h.dtype).repeat(bt // t, 1)[:, None, :]   # (B*T, 1, inner)
        for block, temporal in zip(self.transformer_blocks, self.time_stack):
            h = block(h, context)
            mixed = h + emb
            if self.exvideo is not None:
                mixed = self.exvideo.convolve(mixed, t, hgt, wid)
            mixed = temporal(mixed, time_context, t)
            h = blend(self.time_mixer.mix_factor, h, mixed, frames, frame_axis=0)
        h = self.proj_out(h)
        return x + h.view(bt, hgt, wid, c).permute(0, 3, 1, 2)  # in x's layout, not the permute's channels_last


__all__ = ["AlphaBlender", "Frames", "SpatialVideoTransformer", "TemporalResBlock",
           "TemporalTransformerBlock", "VideoResBlock", "blend"]
