"""AnimateDiff motion modules: temporal transformers inserted into a frozen image UNet.

Reference: Guo et al. 2023, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models
without Specific Tuning" (arXiv:2307.04725), section 4.2 and fig. 3: after each spatial stage of
the UNet, a "motion module" treats every spatial position as a sequence over the frame axis:

    x (B*F, C, H, W) -> GroupNorm -> proj_in -> [self-attention over F (+ sinusoidal positions),
    self-attention over F (+ positions), GEGLU feed-forward] x depth -> proj_out -> + x

``proj_out`` starts at zero (section 4.2), so an untrained module leaves the image model unchanged.

Parameter names are the released files' (``mm_sd_v15_v2.ckpt`` ...):
``down_blocks.L.motion_modules.J.temporal_transformer.{norm, proj_in, proj_out,
transformer_blocks.K.{attention_blocks.A.{to_q, to_k, to_v, to_out.0, pos_encoder.pe}, norms.A,
ff.net.0.proj, ff.net.2, ff_norm}}``, ``mid_block.motion_modules.0...`` (v2 only) and
``up_blocks.U.motion_modules.J...`` (U counts from the deepest level, as the UNet's output blocks do).

GroupNorm statistics: the original code normalises each frame separately (its temporal transformer
rearranges ``b c f h w -> (b f) c h w`` before the norm), and so do ComfyUI-AnimateDiff-Evolved and
DiffSynth-Studio. diffusers' ``AnimateDiffTransformer3D`` normalises over all frames together;
``MotionConfig.norm_across_frames=True`` reproduces that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.cpu_linear import Linear
from diffstudio.models.unet import FeedForward, UNetConfig, unet_attention


@dataclass
class MotionConfig:
    """Constructor arguments of `MotionModules`.

    ``level_channels``: the UNet's width at each level (SD 1.5: 320, 640, 1280, 1280; SDXL: 320, 640, 1280).
    ``modules_per_level``: motion modules per level on the down side, one per ResBlock (the up side has
    one more per level, as the UNet's output blocks do).
    """

    level_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    modules_per_level: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    mid_block: bool = False  # v2 has one module between the middle block's transformer and its last ResBlock
    max_frames: int = 32  # rows of the sinusoidal position table (v1: 24; v2, v3, SDXL beta: 32)
    num_heads: int = 8  # every release; shapes cannot reveal it
    transformer_depth: int = 1  # TemporalTransformerBlocks per module (every release: 1)
    norm_groups: int = 32
    norm_across_frames: bool = False  # True: diffusers' GroupNorm over all frames (see module docstring)

    def __post_init__(self) -> None:
        self.level_channels = [int(c) for c in self.level_channels]
        if isinstance(self.modules_per_level, int):
            self.modules_per_level = [self.modules_per_level] * len(self.level_channels)
        self.modules_per_level = [int(n) for n in self.modules_per_level]
        if len(self.modules_per_level) != len(self.level_channels):
            raise ValueError(f"MotionConfig: one modules_per_level entry per level; got {self.modules_per_level} "
                             f"for widths {self.level_channels}")
        for c in self.level_channels:
            if c % self.num_heads or c % self.norm_groups:
                raise ValueError(f"MotionConfig: width {c} does not split into {self.num_heads} heads and "
                                 f"{self.norm_groups} norm groups")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MotionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"MotionConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def sinusoidal_positions(max_frames: int, dim: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """(1, max_frames, dim) table of Vaswani et al. 2017, sec. 3.5: sin on even, cos on odd channels,
    frequencies 10000^(-2i/dim). The released files store exactly this table as ``pos_encoder.pe``.
    ``positions`` (float, one per row) evaluates the same code at other, possibly fractional, positions."""
    position = torch.arange(max_frames, dtype=torch.float32) if positions is None else positions.float()
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, len(position), dim)
    table[0, :, 0::2] = torch.sin(position[:, None] * freqs)
    table[0, :, 1::2] = torch.cos(position[:, None] * freqs)
    return table


class PositionalEncoding(nn.Module):
    """Adds the frame position's code to each token of a frame sequence (N, F, C): row f of the stored table,
    or for ``positions`` (F floats: the sub-frame positions of dilated context windows, video.context) the
    sinusoid at each position plus the table's departure from the sinusoid interpolated linearly between
    rows, which is the stored row itself at whole positions whatever the file holds."""

    def __init__(self, dim: int, max_frames: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_frames, dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        frames, known = x.shape[1], self.pe.shape[1]
        last = frames - 1 if positions is None else float(positions.max())
        if last > known - 1 or (positions is not None and (len(positions) != frames or positions.min() < 0)):
            from diffstudio.errors import InvalidSizeError

            got = f"{frames} frames" if positions is None else f"{frames} frames at positions up to {last:g}"
            raise InvalidSizeError(f"this motion module knows frame positions 0 .. {known - 1}; got {got} in one "
                                   "call. Denoise longer videos in context windows (diffstudio.video.context) of "
                                   "at most that many frames.")
        if positions is None:
            return x + self.pe[:, :frames].to(x.dtype)
        positions = positions.to(self.pe.device, torch.float32)
        departure = self.pe.float() - sinusoidal_positions(known, self.pe.shape[2]).to(self.pe.device)
        below = positions.floor().long().clamp(max=known - 1)
        above = (below + 1).clamp(max=known - 1)
        t = (positions - below)[:, None]
        code = sinusoidal_positions(frames, self.pe.shape[2], positions).to(self.pe.device)
        code = code + (1 - t) * departure[:, below] + t * departure[:, above]
        return x + code.to(x.dtype)


class TemporalAttention(nn.Module):
    """Self-attention among the frames of one spatial position (the original's VersatileAttention in
    "Temporal" mode): x (N, F, C) with N = batch * H * W -> (N, F, C)."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(dim, dim, bias=False)
        self.to_v = Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Identity())  # (projection, dropout) as released
        self.pos_encoder = PositionalEncoding(dim, max_frames)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pos_encoder(x, positions)  # positions enter queries, keys and values alike
        return self.to_out[0](unet_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class TemporalTransformerBlock(nn.Module):
    """Two pre-norm temporal self-attentions, then a pre-norm GEGLU feed-forward; residual around each."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_frames) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        for attention_block, norm in zip(self.attention_blocks, self.norms):
            x = x + attention_block(norm(x), positions)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    """GroupNorm, proj_in, `depth` blocks over the frame axis, proj_out, residual: (B*F, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, depth: int, max_frames: int, groups: int,
                 norm_across_frames: bool):
        super().__init__()
        self.norm_across_frames = norm_across_frames
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, max_frames) for _ in range(depth))
        self.proj_out = Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        bf, c, hgt, wid = x.shape
        b = bf // num_frames
        if self.norm_across_frames:  # statistics over (C/groups, F, H, W) of each video
            h = x.reshape(b, num_frames, c, hgt, wid).transpose(1, 2)
            h = F.group_norm(h, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
            h = h.transpose(1, 2)                                             # (B, F, C, H, W)
        else:  # statistics of each frame alone
            h = F.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
            h = h.reshape(b, num_frames, c, hgt, wid)
        # One sequence of F frames per spatial position: (B, F, C, H, W) -> (B*H*W, F, C).
        h = h.permute(0, 3, 4, 1, 2).reshape(b * hgt * wid, num_frames, c)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, positions)
        h = self.proj_out(h)
        # (B*H*W, F, C) -> (B, H, W, F, C) -> (B*F, C, H, W)
        h = h.view(b, hgt, wid, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, hgt, wid)
        return x + h


class MotionModule(nn.Module):
    """One motion module (the original's VanillaTemporalModule): ``temporal_transformer`` with a
    zero-initialised ``proj_out``, so a fresh module is the identity."""

    def __init__(self, channels: int, config: MotionConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, config.num_heads, config.transformer_depth,
                                                        config.max_frames, config.norm_groups,
                                                        config.norm_across_frames)
        nn.init.zeros_(self.temporal_transformer.proj_out.weight)
        nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions``: the frames' positions (PositionalEncoding); by default 0 .. num_frames - 1."""
        return self.temporal_transformer(x, num_frames, positions)


class MotionLevel(nn.Module):
    """The motion modules of one UNet level (key level ``motion_modules.J``)."""

    def __init__(self, channels: int, count: int, config: MotionConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(MotionModule(channels, config) for _ in range(count))


class MotionModules(nn.Module):
    """Every motion module of a UNet, in the released layout; the UNet finds them with `site`.

    Hook sites (docs/animatediff.md): ``("down", level, j)`` after the j-th ResBlock (+ transformer)
    of a level on the input side; ``("mid", 0, 0)`` between the middle block's transformer and its
    second ResBlock; ``("up", u, j)`` after the j-th ResBlock (+ transformer) of the u-th output level
    (u = 0 is the deepest), before its Upsample.
    """

    def __init__(self, config: MotionConfig):
        super().__init__()
        self.config = config
        c = config
        self.down_blocks = nn.ModuleList(
            MotionLevel(ch, n, c) for ch, n in zip(c.level_channels, c.modules_per_level))
        self.mid_block = MotionLevel(c.level_channels[-1], 1, c) if c.mid_block else None
        self.up_blocks = nn.ModuleList(
            MotionLevel(ch, n + 1, c) for ch, n in zip(reversed(c.level_channels), reversed(c.modules_per_level)))

    def site(self, part: str, level: int, index: int) -> MotionModule | None:
        """The module at a hook site, or None where this release has none (v1/v3: the middle)."""
        if part == "down":
            return self.down_blocks[level].motion_modules[index]
        if part == "up":
            return self.up_blocks[level].motion_modules[index]
        if part == "mid":
            return None if self.mid_block is None else self.mid_block.motion_modules[index]
        raise ValueError(f"unknown motion hook site {part!r}; expected 'down', 'mid' or 'up'")

    def at(self, positions: torch.Tensor) -> MotionAtPositions:
        """These modules with every frame sequence at ``positions`` (sub-frame positions, video.context)."""
        return MotionAtPositions(self, positions)

    def mismatch(self, unet: UNetConfig) -> str | None:
        """Why these modules do not fit a UNet of config `unet` (None when they do)."""
        widths = [m * unet.model_channels for m in unet.channel_mult]
        if widths != self.config.level_channels:
            return (f"the motion modules are made for UNet level widths {self.config.level_channels}, the UNet "
                    f"has {widths}")
        if list(unet.num_res_blocks) != self.config.modules_per_level:
            return (f"the motion modules have {self.config.modules_per_level} modules per level, the UNet has "
                    f"{list(unet.num_res_blocks)} ResBlocks per level")
        return None


class MotionAtPositions:
    """``MotionModules.at(positions)``: passed to the UNet as ``motion=`` like the modules themselves; each hook
    site's module runs with the frame positions given."""

    def __init__(self, modules: MotionModules, positions: torch.Tensor):
        self.modules, self.positions = modules, positions

    def site(self, part: str, level: int, index: int):
        module = self.modules.site(part, level, index)
        return None if module is None else partial(module, positions=self.positions)

    def mismatch(self, unet: UNetConfig) -> str | None:
        return self.modules.mismatch(unet)
