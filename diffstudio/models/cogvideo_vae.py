"""The causal 3D VAE of CogVideoX (diffusers' ``AutoencoderKLCogVideoX``).

Reference: Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer",
sec. 2.1 ("3D causal VAE"): a video of 1 + 4k frames at H x W becomes 1 + k latent frames at H/8 x W/8 with
16 channels. The first frame is compressed alone (an image is a one-frame video); every later group of four
frames becomes one latent frame. The decoder's norms are spatially conditioned on the latent (Zheng et al.
2022, "MoVQ", eq. 5: GroupNorm whose scale and shift are 1x1x1 convolutions of the resampled latent).

Causality. Every 3x3x3 convolution pads time on the past side only: two copies of the first frame before
the video starts, and later the last two input frames of the previous temporal chunk (the *conv cache*, held
in a `CausalStream`). With the cache a chunked run sees exactly the frames a whole-video run sees. What is not
chunk-invariant is GroupNorm, whose statistics span the (T, H, W) of whatever the network is given; the
release runs its VAE in fixed chunks (decode: 3 latent frames, then 2 at a time; diffusers' encode: 9 or 13
video frames, then 8 at a time), so those chunks are part of the model's definition and are the defaults here.

Temporal resampling, levels 0 and 1 of the encoder and of the decoder (``temporal_compression`` 4):
  encoder  frames (f0, f1, f2, ...) -> (f0, mean(f1, f2), mean(f3, f4), ...)  then a stride-2 2D conv per frame
  decoder  frames (z0, z1, ...)     -> (z0, z1, z1, z2, z2, ...)              (nearest x2), then a 2D conv
The first frame of the *video* is the one kept alone; a later chunk has no such frame.

Parameter names are the diffusers layout (``decoder.up_blocks.0.resnets.0.conv1.conv.weight``), which is
what the released ``vae/`` folders of CogVideoX-2b / -5b / -5b-I2V hold.

Shapes: video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k, H and W multiples of 8  <->  latent (B, 16, 1 + k, H/8,
W/8), unscaled (the caller multiplies by the family's scaling factor: 1.15258426 for 2B, 0.7 for 5B).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.errors import InvalidSizeError
from diffstudio.models.vae import LOGVAR_RANGE, GroupNormAct

# Temporal chunks of the release (the VAE was tuned to these; other sizes change the result slightly).
ENCODE_CHUNK_FRAMES = 8  # video frames per encoder pass after the first pass (which takes 8 + T % 8)
DECODE_CHUNK_FRAMES = 2  # latent frames per decoder pass after the first pass (which takes 2 + L % 2)


@dataclass
class CogVideoXVAEConfig:
    """Hyper-parameters of the CogVideoX VAE (diffusers' config.json fields, renamed where noted)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = field(default=(128, 256, 256, 512))  # encoder order, full res first
    layers_per_block: int = 3  # resnets per encoder level; the decoder has one more
    norm_groups: int = 32  # diffusers' norm_num_groups
    temporal_compression: int = 4  # a power of two; its log2 first levels halve (or double) time

    def __post_init__(self):
        self.block_out_channels = tuple(int(w) for w in self.block_out_channels)
        t = self.temporal_compression
        if t < 1 or t & (t - 1) or self.time_levels > self.levels - 1:
            raise ValueError(f"temporal_compression {t} must be a power of two of at most 2^{self.levels - 1} "
                             f"(one halving per resampling level)")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_levels(self) -> int:
        """How many resampling levels (the first ones) also halve / double time."""
        return int(math.log2(self.temporal_compression))

    @property
    def downscale_factor(self) -> int:
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CogVideoXVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


class CausalStream:
    """What one temporal chunk hands to the next: each causal conv's last input frames, and whether the
    chunk being run starts the video. One stream per (video, spatial tile); `advance()` after each chunk."""

    def __init__(self):
        self.first = True
        self.past: dict[nn.Module, torch.Tensor] = {}

    def advance(self) -> None:
        self.first = False


class CausalConv3d(nn.Module):
    """3D convolution padded in time on the past side only (k_t - 1 frames), zero-padded in space.

    Before the first frame the padding repeats the first frame (the release's "first" padding); after that
    it is the cached tail of the previous chunk, so chunking in time changes nothing this layer computes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        if self.time_pad:
            past = stream.past.get(self)
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)  # (B, C, k_t - 1 + T, H, W)
            # A copy, so the cache does not keep this whole chunk alive.
            stream.past[self] = x[:, :, -self.time_pad:].clone()
        return self.conv(x)


class _LatentCondition:
    """The decoder's latent, resampled (nearest) to each feature map's (T, H, W), once per size per chunk.

    In the chunk holding the video's first frame, latent frame 0 conditions output frame 0 alone and the
    other latent frames are stretched over the remaining frames, mirroring the causal temporal upsampling.
    """

    def __init__(self, z: torch.Tensor, first: bool):
        self.z, self.first = z, first
        self._at: dict[tuple[int, ...], torch.Tensor] = {}

    def at(self, size: tuple[int, int, int]) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if size not in self._at:
            z, (t, h, w) = self.z, size
            if self.first and t > 1:
                head = F.interpolate(z[:, :, :1], size=(1, h, w), mode="nearest")
                tail = F.interpolate(z[:, :, 1:], size=(t - 1, h, w), mode="nearest")
                self._at[size] = torch.cat([head, tail], dim=2)
            else:
                self._at[size] = F.interpolate(z, size=size, mode="nearest")
        return self._at[size]


class SpatialNorm3D(nn.Module):
    """MoVQ's spatially conditioned norm: GroupNorm(f) * conv_y(zq) + conv_b(zq), then SiLU when `act`."""

    def __init__(self, channels: int, zq_channels: int, groups: int, act: bool):
        super().__init__()
        self.norm_layer = GroupNormAct(groups, channels, act=False)
        self.conv_y = CausalConv3d(zq_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, channels, kernel_size=1)
        self.act = act

    def forward(self, f: torch.Tensor, cond: _LatentCondition, stream: CausalStream) -> torch.Tensor:
        zq = cond.at(f.shape[-3:]).to(f.dtype)
        h = self.norm_layer(f).mul_(self.conv_y(zq, stream)).add_(self.conv_b(zq, stream))
        return F.silu(h, inplace=True) if self.act else h


class ResnetBlock3D(nn.Module):
    """h = conv2(act(norm2(conv1(act(norm1(x)))))); out = shortcut(x) + h. Norms are GroupNorm in the encoder
    and SpatialNorm3D (conditioned on the latent) in the decoder; the shortcut is a 1x1x1 conv when widths change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1 = GroupNormAct(groups, in_channels, act=True)
            self.norm2 = GroupNormAct(groups, out_channels, act=True)
        else:
            self.norm1 = SpatialNorm3D(in_channels, zq_channels, groups, act=True)
            self.norm2 = SpatialNorm3D(out_channels, zq_channels, groups, act=True)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor, cond: _LatentCondition | None, stream: CausalStream):
        return norm(x) if cond is None else norm(x, cond, stream)

    def forward(self, x: torch.Tensor, cond: _LatentCondition | None, stream: CausalStream) -> torch.Tensor:
        h = self.conv1(self._norm(self.norm1, x, cond, stream), stream)
        h = self.conv2(self._norm(self.norm2, h, cond, stream), stream)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


def _halve_time(x: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """(f0, f1, f2, ...) -> (f0, mean(f1, f2), ...) when keep_first, else (mean(f0, f1), ...)."""
    head, rest = (x[:, :, :1], x[:, :, 1:]) if keep_first else (x[:, :, :0], x)
    if rest.shape[2] % 2:
        raise InvalidSizeError(f"a temporal chunk reached a time-halving layer with {x.shape[2]} frames; "
                               "chunks after the first must hold a multiple of 4 video frames.")
    return torch.cat([head, (rest[:, :, 0::2] + rest[:, :, 1::2]) * 0.5], dim=2)


def _double_time(x: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """(z0, z1, ...) -> (z0, z1, z1, z2, z2, ...) when keep_first, else every frame twice."""
    if not keep_first:
        return x.repeat_interleave(2, dim=2)
    return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)


class Downsample3D(nn.Module):
    """Optionally halve time (levels below log2(temporal_compression)), then a stride-2 3x3 conv applied to
    every frame after a right/bottom zero pad: (T, H, W) -> (T', H/2, W/2). The conv is 2D (``conv.weight``
    is (C, C, 3, 3)); it runs as a (1, 3, 3) 3D conv so frames need no reshuffling."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        if self.compress_time:
            x = _halve_time(x, keep_first=stream.first)
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2, 2))


class Upsample3D(nn.Module):
    """Optionally double time (keeping the video's first frame single), nearest x2 in space, then a 3x3 conv
    applied to every frame: (T, H, W) -> (T', 2H, 2W)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        if self.compress_time:
            x = _double_time(x, keep_first=stream.first)
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, 1, 1))


class _Block(nn.Module):
    """One level: `resnets`, then `downsamplers.0` or `upsamplers.0` (absent at the last level)."""

    def __init__(self, resnets: list[ResnetBlock3D], sampler_name: str | None = None,
                 sampler: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self._samplers: tuple[nn.Module, ...] = ()
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))
            self._samplers = (sampler,)

    def forward(self, x: torch.Tensor, cond: _LatentCondition | None, stream: CausalStream) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cond, stream)
        for sampler in self._samplers:
            x = sampler(x, stream)
        return x


class Encoder3D(nn.Module):
    """Video (B, in, T, H, W) -> moments (B, 2 * latent, T', H/f, W/f): mean and log-variance."""

    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        self.down_blocks = nn.ModuleList()
        width_in = widths[0]
        for level, width in enumerate(widths):
            resnets = [ResnetBlock3D(width_in if i == 0 else width, width, g) for i in range(cfg.layers_per_block)]
            sampler = Downsample3D(width, level < cfg.time_levels) if level < cfg.levels - 1 else None
            self.down_blocks.append(_Block(resnets, "downsamplers", sampler))
            width_in = width
        self.mid_block = _Block([ResnetBlock3D(widths[-1], widths[-1], g) for _ in range(2)])
        self.norm_out = GroupNormAct(g, widths[-1], act=True)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        h = self.conv_in(x, stream)
        for block in self.down_blocks:
            h = block(h, None, stream)
        h = self.mid_block(h, None, stream)
        return self.conv_out(self.norm_out(h), stream)


class Decoder3D(nn.Module):
    """Latent (B, latent, L, h, w) -> video (B, out, T, h*f, w*f), T = 1 + 4(L - 1) in the chunk that starts
    the video and 4L in later chunks. `up_blocks[0]` is the lowest resolution (diffusers' order)."""

    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        g, z = cfg.norm_groups, cfg.latent_channels
        widths = cfg.block_out_channels[::-1]
        self.conv_in = CausalConv3d(z, widths[0])
        self.mid_block = _Block([ResnetBlock3D(widths[0], widths[0], g, z) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        width_in = widths[0]
        for level, width in enumerate(widths):
            resnets = [ResnetBlock3D(width_in if i == 0 else width, width, g, z)
                       for i in range(cfg.layers_per_block + 1)]
            sampler = Upsample3D(width, level < cfg.time_levels) if level < cfg.levels - 1 else None
            self.up_blocks.append(_Block(resnets, "upsamplers", sampler))
            width_in = width
        self.norm_out = SpatialNorm3D(widths[-1], z, g, act=True)
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        cond = _LatentCondition(z, stream.first)
        h = self.conv_in(z, stream)
        h = self.mid_block(h, cond, stream)
        for block in self.up_blocks:
            h = block(h, cond, stream)
        return self.conv_out(self.norm_out(h, cond, stream), stream)


def chunk_sizes(total: int, per_chunk: int | None) -> list[int]:
    """The release's temporal chunks: `per_chunk` frames each, the first one taking the remainder as well
    (49 video frames by 8: 9, 8, 8, 8, 8, 8; 13 latent frames by 2: 3, 2, 2, 2, 2, 2). None: one chunk."""
    if not per_chunk or total <= per_chunk:
        return [total]
    n = total // per_chunk
    return [total - (n - 1) * per_chunk] + [per_chunk] * (n - 1)


class AutoencoderKLCogVideoX(nn.Module):
    """`encode(video) -> latent mean` and `decode(latent) -> video`, in temporal chunks with a causal cache
    (activation memory independent of the frame count). Spatial tiling: `diffstudio.pipeline.tiled_vae`."""

    def __init__(self, config: CogVideoXVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    @property
    def downscale_factor(self) -> int:
        """Video pixels per latent pixel along one side (8)."""
        return self.config.downscale_factor

    @property
    def temporal_downscale_factor(self) -> int:
        """Video frames per latent frame after the first (4)."""
        return self.config.temporal_compression

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_downscale_factor

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_downscale_factor

    def _check_video(self, video: torch.Tensor, frames_per_chunk: int | None) -> None:
        t, f = self.temporal_downscale_factor, self.downscale_factor
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise InvalidSizeError(f"expected a video (B, {self.config.in_channels}, T, H, W), got shape "
                                   f"{tuple(video.shape)}; add the frame axis (x[:, :, None]) for a single image.")
        frames, height, width = video.shape[2:]
        if (frames - 1) % t:
            raise InvalidSizeError(f"{frames} frames: the CogVideoX VAE takes 1 + {t}k frames (e.g. "
                                   f"{frames - (frames - 1) % t} or {frames - (frames - 1) % t + t}).")
        if height % f or width % f:
            raise InvalidSizeError(f"frame size {height}x{width} is not a multiple of {f}: crop or resize it.")
        if frames_per_chunk is not None and frames_per_chunk % t:
            raise InvalidSizeError(f"frames_per_chunk {frames_per_chunk} must be a multiple of {t}.")

    def _check_latent(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise InvalidSizeError(f"expected latents (B, {self.config.latent_channels}, T', h, w), got shape "
                                   f"{tuple(latents.shape)}.")

    def _prepare(self, x: torch.Tensor, first: nn.Module) -> torch.Tensor:
        ref = next(first.parameters())
        return x.to(device=ref.device, dtype=ref.dtype)

    def encode_chunks(self, video: torch.Tensor, frames_per_chunk: int | None = ENCODE_CHUNK_FRAMES,
                      ) -> Iterator[torch.Tensor]:
        """Yield the moments (B, 2 * latent, t', h, w) chunk by chunk, in order (one causal stream)."""
        self._check_video(video, frames_per_chunk)
        stream, start = CausalStream(), 0
        for size in chunk_sizes(video.shape[2], frames_per_chunk):
            piece = self._prepare(video[:, :, start:start + size], self.encoder.conv_in)
            yield self.encoder(piece, stream)
            stream.advance()
            start += size

    def encode_dist(self, video: torch.Tensor, frames_per_chunk: int | None = ENCODE_CHUNK_FRAMES,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> (mean, logvar), each (B, latent, 1 + k, H/8, W/8).

        `frames_per_chunk` (a multiple of 4; None = all frames in one pass) sets the frames per encoder pass;
        the default is the release's (diffusers').
        """
        self._check_video(video, frames_per_chunk)
        b, _, frames, height, width = video.shape
        f, z = self.downscale_factor, self.config.latent_channels
        mean = logvar = None
        start = 0
        for moments in self.encode_chunks(video, frames_per_chunk):
            if mean is None:
                shape = (b, z, self.latent_frames(frames), height // f, width // f)
                mean = moments.new_empty(shape)
                logvar = moments.new_empty(shape)
            n = moments.shape[2]
            mean[:, :, start:start + n] = moments[:, :z]
            logvar[:, :, start:start + n] = moments[:, z:].clamp(*LOGVAR_RANGE)
            start += n
        return mean, logvar

    def encode(self, video: torch.Tensor, frames_per_chunk: int | None = ENCODE_CHUNK_FRAMES) -> torch.Tensor:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> unscaled latent mean (B, latent, 1 + k, H/8, W/8)."""
        return self.encode_dist(video, frames_per_chunk)[0]

    def decode_chunks(self, latents: torch.Tensor, frames_per_chunk: int | None = DECODE_CHUNK_FRAMES,
                      ) -> Iterator[torch.Tensor]:
        """Yield the video (B, 3, t, H, W) chunk by chunk, in order: 1 + 4(n - 1) frames from the first chunk
        of n latent frames, 4n from each later one. Frames can be written out as they come."""
        self._check_latent(latents)
        stream, start = CausalStream(), 0
        for size in chunk_sizes(latents.shape[2], frames_per_chunk):
            piece = self._prepare(latents[:, :, start:start + size], self.decoder.conv_in)
            yield self.decoder(piece, stream)
            stream.advance()
            start += size

    def decode(self, latents: torch.Tensor, frames_per_chunk: int | None = DECODE_CHUNK_FRAMES) -> torch.Tensor:
        """unscaled latents (B, latent, L, h, w) -> video (B, 3, 1 + 4(L - 1), 8h, 8w), roughly in [-1, 1].

        `frames_per_chunk` latent frames per decoder pass after the first (None = all in one pass); the
        default 2 is the release's.
        """
        self._check_latent(latents)
        b, _, frames, h, w = latents.shape
        f = self.downscale_factor
        video, start = None, 0
        for piece in self.decode_chunks(latents, frames_per_chunk):
            if video is None:
                video = piece.new_empty(b, piece.shape[1], self.video_frames(frames), h * f, w * f)
            video[:, :, start:start + piece.shape[2]] = piece
            start += piece.shape[2]
        return video

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(video))
