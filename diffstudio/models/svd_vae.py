"""The autoencoder of Stable Video Diffusion: the SD image encoder and a decoder with temporal mixing.

Reference: Blattmann et al. 2023, "Stable Video Diffusion: Scaling Latent Video Diffusion Models to Large
Datasets", sec. 4 and appendix D.1 ("we finetune the decoder on video data with temporal layers"), building on
Blattmann et al. 2023, "Align your Latents" (sec. 3.1.1, the temporal decoder, and eq. 1, the learned mix).

The encoder is the LDM encoder of ``models/vae.py`` unchanged. Every ResNet block of the decoder is followed by
a temporal ResNet block over the frame axis (3x1x1 convolutions, the release's ``time_stack``) whose output is
mixed with the spatial one by a learned factor: out = a * temporal + (1 - a) * spatial, a = sigmoid(mix_factor).
The decoder's last convolution is followed by a 3x1x1 Conv3d (``conv_out.time_mix_conv``). The mid-block
attention is the spatial one of the image VAE (the release's ``time_mode="conv-only"``).

Parameter names are those of the original release (generative-models, ``first_stage_model.`` in
``svd.safetensors``): ``decoder.up.3.block.0.time_stack.in_layers.2.weight``, ``decoder.up.3.block.0.mix_factor``,
``decoder.conv_out.time_mix_conv.weight``. The decoder sees ``frames`` consecutive frames as one clip; a video is
decoded clip by clip (`decode_chunks`), so memory does not grow with its length. Frames of different clips do
not see each other, as in the reference pipelines' chunked decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from diffstudio.models.vae import LOGVAR_RANGE, AttnBlock, Encoder, GroupNormAct, ResnetBlock, Upsample, VAEConfig

TEMPORAL_NORM_EPS = 1e-5  # the temporal blocks use the UNet's GroupNorm32 (eps 1e-5), the spatial ones 1e-6


@dataclass
class TemporalVAEConfig:
    """Hyper-parameters of the SVD autoencoder (the ``encoder_config`` / ``decoder_config`` of svd.yaml).

    ``use_quant_conv``: the encoder's 1x1 ``quant_conv`` (diffusers' folders have it; the release's
    ``first_stage_model`` has none, its conditioning encoder ``conditioner.embedders.3.encoder`` has one).
    There is never a ``post_quant_conv``. ``time_kernel``: frames the temporal convolutions see (3).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = field(default=(128, 256, 512, 512))
    num_res_blocks: int = 2
    use_quant_conv: bool = True
    has_encoder: bool = True
    time_kernel: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        self.block_out_channels = tuple(int(w) for w in self.block_out_channels)
        if self.time_kernel % 2 != 1:
            raise ValueError(f"time_kernel must be odd (same-length temporal convolutions), got {self.time_kernel}")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (self.levels - 1)

    def image_vae_config(self) -> VAEConfig:
        """The config of the image VAE whose encoder this one shares (and whose decoder it extends)."""
        return VAEConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                         latent_channels=self.latent_channels, block_out_channels=self.block_out_channels,
                         num_res_blocks=self.num_res_blocks, double_z=True, use_quant_conv=False,
                         mid_attention=True, norm_groups=self.norm_groups)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TemporalVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def to_clips(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W): frames of one clip are consecutive rows."""
    bt, c, h, w = x.shape
    return x.reshape(bt // frames, frames, c, h, w).transpose(1, 2)


def from_clips(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (the UNet's ``GroupNorm32``, which the temporal blocks use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class TemporalResBlock(nn.Module):
    """The ``time_stack``: a ResNet block over (B, C, T, H, W) with 3x1x1 convolutions and no time embedding.

    Named as the UNet's ResBlock (``in_layers`` = norm, SiLU, conv; ``out_layers`` = norm, SiLU, dropout, conv),
    whose 3-D form it is; channels in = out, so the skip is the identity.
    """

    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        conv = dict(kernel_size=(kernel, 1, 1), padding=(kernel // 2, 0, 0))
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels, eps=TEMPORAL_NORM_EPS), nn.SiLU(),
                                       nn.Conv3d(channels, channels, **conv))
        self.out_layers = nn.Sequential(GroupNorm32(groups, channels, eps=TEMPORAL_NORM_EPS), nn.SiLU(),
                                        nn.Dropout(0.0), nn.Conv3d(channels, channels, **conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResnetBlock(ResnetBlock):
    """The image VAE's ResNet block on every frame, then a temporal block mixed in by a learned factor.

    (B*T, C_in, H, W) -> (B*T, C_out, H, W). mix_factor starts at 0 (a = 1/2) in training; the released value
    is learned.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, kernel: int):
        super().__init__(in_channels, out_channels, groups)
        self.time_stack = TemporalResBlock(out_channels, groups, kernel)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        spatial = to_clips(super().forward(x).contiguous(), frames)  # (B, C, T, H, W)
        alpha = torch.sigmoid(self.mix_factor.float()).to(spatial.dtype)
        mixed = alpha * self.time_stack(spatial) + (1 - alpha) * spatial
        return from_clips(mixed)


class TimeMixedConv(nn.Conv2d):
    """A Conv2d on every frame followed by a Conv3d over (T, 1, 1) (``conv_out`` + ``conv_out.time_mix_conv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return from_clips(self.time_mix_conv(to_clips(super().forward(x), frames)))


class _Stage(nn.Module):
    """One decoder level: `block` (VideoResnetBlocks), an empty `attn` list and, but at level 0, `upsample`."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _VideoMid(nn.Module):
    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        self.block_1 = VideoResnetBlock(channels, channels, groups, kernel)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = VideoResnetBlock(channels, channels, groups, kernel)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, frames)), frames)


class TemporalDecoder(nn.Module):
    """Latents (B*T, z, h, w) of clips of T frames -> images (B*T, out, h*f, w*f). ``up`` is indexed by level."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        g, k, widths = cfg.norm_groups, cfg.time_kernel, cfg.block_out_channels
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = _VideoMid(block_in, g, k)
        levels: list[_Stage] = []
        for level in reversed(range(cfg.levels)):
            stage = _Stage()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(VideoResnetBlock(block_in, widths[level], g, k))
                block_in = widths[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNormAct(g, block_in, act=True)
        self.conv_out = TimeMixedConv(block_in, cfg.out_channels, k)

    def forward(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.mid(self.conv_in(z), frames)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, frames)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h).contiguous()
        return self.conv_out(self.norm_out(h), frames)


class TemporalAutoencoderKL(nn.Module):
    """`encode` images in [-1, 1] to unscaled latents; `decode` clips of latents back to frames.

    Latent scaling (0.18215) belongs to the family's latent format, as for the image VAE.
    """

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = config
        if config.has_encoder:
            self.encoder = Encoder(config.image_vae_config())
            if config.use_quant_conv:
                z2 = 2 * config.latent_channels
                self.quant_conv = nn.Conv2d(z2, z2, 1)
        self.decoder = TemporalDecoder(config)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def _first_param(self, module: nn.Module) -> torch.Tensor:
        return next(module.parameters())

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, z, H/f, W/f)."""
        if not self.config.has_encoder:
            from diffstudio.errors import InvalidInputError
            raise InvalidInputError("this temporal VAE has no encoder (a decoder-only file): load the full "
                                    "checkpoint to encode images")
        f = self.downscale_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            from diffstudio.errors import InvalidSizeError
            raise InvalidSizeError(f"image size {tuple(images.shape[-2:])} is not a multiple of {f}: "
                                   f"crop or resize it to a multiple of {f} pixels before encoding.")
        ref = self._first_param(self.encoder)
        moments = self.encoder(images.to(device=ref.device, dtype=ref.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(*LOGVAR_RANGE).contiguous()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> unscaled latent mean (B, z, H/f, W/f)."""
        return self.encode_dist(images)[0]

    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Unscaled latents (B*T, z, h, w), clips of ``num_frames`` (default: all rows, one clip) ->
        frames (B*T, 3, h*f, w*f), roughly in [-1, 1]."""
        frames = latents.shape[0] if num_frames is None else int(num_frames)
        if frames < 1 or latents.shape[0] % frames:
            from diffstudio.errors import InvalidInputError
            raise InvalidInputError(f"{latents.shape[0]} latent frames do not split into clips of {frames}")
        ref = self._first_param(self.decoder)
        return self.decoder(latents.to(device=ref.device, dtype=ref.dtype), frames)

    def decode_chunks(self, latents: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
        """The frames of one video's latents (T, z, h, w), decoded ``chunk`` frames at a time (each chunk one
        clip; the last may be shorter). Yields float32 CPU tensors (n, 3, H, W): what is alive at a time is one
        chunk's activations, whatever T."""
        if chunk < 1:
            from diffstudio.errors import InvalidInputError
            raise InvalidInputError(f"decode_chunk_size must be at least 1, got {chunk}")
        for start in range(0, latents.shape[0], chunk):
            part = latents[start:start + chunk]
            yield self.decode(part, part.shape[0]).float().cpu()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of one clip through the posterior mean."""
        return self.decode(self.encode(images))

