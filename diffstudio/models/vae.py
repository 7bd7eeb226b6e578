"""The LDM KL-regularised autoencoder (the "VAE" of Stable Diffusion, SDXL, SD3 and FLUX).

Reference: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
sec. 3 and appendix G (the first-stage autoencoder), building on Esser et al. 2021 (VQGAN).

Parameter names are those of the original LDM release (``encoder.down.0.block.1.conv1``,
``decoder.up.3.upsample.conv``, ``encoder.mid.attn_1.q`` ...), so a single-file checkpoint loads
after stripping only its ``first_stage_model.`` / ``vae.`` prefix. SD3/FLUX use the same network
with 16 latent channels and no ``quant_conv`` / ``post_quant_conv``.

Speed notes (CPU, see docs/benchmarks.md, "VAE decode"): activations run in ``channels_last`` (oneDNN's fast
layout, bf16 convolutions included); GroupNorm runs in the activation dtype (the CPU kernel
accumulates in fp32 anyway) and SiLU is applied in place; the nearest-x2-then-3x3 upsample is
computed as an equivalent 2x2 sub-pixel convolution at low resolution (2.25x fewer FLOPs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.layers import attention

NORM_EPS = 1e-6  # LDM's Normalize(): GroupNorm(32, C, eps=1e-6, affine=True)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of DiagonalGaussianDistribution in the LDM release


@dataclass
class VAEConfig:
    """Hyper-parameters of an LDM AutoencoderKL (the ``ddconfig`` of the release's yaml).

    ``block_out_channels`` are the widths of the levels, full resolution first: LDM's ``ch * ch_mult``
    (128 x (1, 2, 4, 4) for every released SD / SDXL / SD3 / FLUX VAE), diffusers' ``block_out_channels``.
    Any widths work, multiples of the first or not (e.g. (32, 48, 80)).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # z_channels: 4 for SD 1.x / SDXL, 16 for SD3 / FLUX
    block_out_channels: tuple[int, ...] = field(default=(128, 256, 512, 512))  # one width per level
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    double_z: bool = True  # encoder outputs mean and logvar
    use_quant_conv: bool = True  # 1x1 quant_conv / post_quant_conv (absent in SD3 / FLUX)
    mid_attention: bool = True  # the single self-attention block in each mid block
    norm_groups: int = 32

    def __post_init__(self):
        self.block_out_channels = tuple(int(w) for w in self.block_out_channels)

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along one side (8 for every released LDM VAE)."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Also reads the widths as LDM's ``ch`` and ``ch_mult`` (keys ``base_channels``, ``channel_mult``)."""
        d = dict(d)
        if "block_out_channels" not in d and "channel_mult" in d:
            d["block_out_channels"] = [int(d["base_channels"]) * int(m) for m in d["channel_mult"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _cast_for(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Cast `x` to the dtype of `module`'s weights (a no-op unless precision is mixed per level)."""
    dtype = next(module.parameters()).dtype
    return x if x.dtype == dtype else x.to(dtype)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (eps 1e-6) optionally followed by SiLU, computed in the activation's dtype.

    On CPU the bf16 group_norm kernel accumulates its statistics in fp32, so there is no need to
    upcast the whole activation (which would cost two extra passes over the largest tensors).
    """

    def __init__(self, num_groups: int, num_channels: int, act: bool):
        super().__init__(num_groups, num_channels, eps=NORM_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type != "cpu":
            h = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                             self.eps).to(x.dtype)
        else:
            h = F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return F.silu(h, inplace=True) if self.act else h


class ResnetBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))); out = shortcut(x) + h (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNormAct(groups, in_channels, act=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormAct(groups, out_channels, act=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # LDM names the 1x1 channel-changing shortcut `nin_shortcut` ("network in network").
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections (LDM layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNormAct(groups, channels, act=False)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # (B, C, H, W) -> tokens (B, H*W, C); a free view when x is channels_last.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        # One matmul for q, k and v: the 1x1 convs are linear maps on the channel axis.
        w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)
        b_qkv = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, w_qkv, b_qkv).chunk(3, dim=-1)
        h = attention(q, k, v, heads=1)  # softmax(q k^T / sqrt(C)) v, (B, H*W, C)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        h = h.view(b, hgt, wid, c).permute(0, 3, 1, 2)  # back to (B, C, H, W), channels_last strides
        return h.add_(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right/bottom) zero pad of one pixel: H -> H/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Row (and column) folding of a 3x3 kernel applied after nearest x2 upsampling. Output row 2i+a
# reads upsampled rows 2i+a-1, 2i+a, 2i+a+1, i.e. low-res rows (i-1, i, i) for a=0 and (i, i, i+1)
# for a=1: two distinct low-res taps, whose weights are sums of the 3x3 kernel's rows.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # a = 0: taps at rows i-1, i
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # a = 1: taps at rows i, i+1


def _version_of(t: torch.Tensor) -> int | float:
    """In-place edits bump a tensor's version; inference tensors have none, so fingerprint them."""
    try:
        return t._version
    except RuntimeError:
        return float(t.sum(dtype=torch.float32))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv: H -> 2H.

    Computed as a sub-pixel convolution: each of the 4 output phases (a, b) is a 2x2 conv of the
    low-resolution input with a folded kernel, so the work is 16 instead of 36 taps per input pixel.
    The 4 phases run as one conv with 4*C outputs and padding 1 (output (H+1, W+1)); phase (a, b)
    is the window [a:a+H, b:b+W] of its channel group, written to out[..., a::2, b::2].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._folded: tuple | None = None  # (key, weight, bias): see _phase_weights

    def _phase_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded (4*C_out, C_in, 2, 2) kernel and (4*C_out,) bias, phase-major ((a, b) = 00, 01, 10, 11).

        Cached for inference; recomputed when the weights change (a LoRA patch bumps `_version`) and
        always recomputed when gradients must flow to the 3x3 kernel.
        """
        w, bias = self.conv.weight, self.conv.bias
        key = (w.data_ptr(), _version_of(w), _version_of(bias), dtype, w.device)
        cacheable = not (torch.is_grad_enabled() and (w.requires_grad or bias.requires_grad))
        if cacheable and self._folded is not None and self._folded[0] == key:
            return self._folded[1], self._folded[2]
        fold = _FOLD.to(w.device)
        # phases[a, b] = fold[a] @ w @ fold[b]^T  -> (2, 2, C_out, C_in, 2, 2)
        phases = torch.einsum("ayk,oikl,bxl->aboiyx", fold, w.float(), fold)
        weight = phases.reshape(4 * w.shape[0], *phases.shape[3:]).to(dtype)
        weight = weight.contiguous(memory_format=torch.channels_last)
        folded_bias = bias.to(dtype).repeat(4)
        if cacheable:
            self._folded = (key, weight, folded_bias)
        return weight, folded_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        weight, bias = self._phase_weights(x.dtype)
        # A 2x2 conv with padding 1 reads rows (p-1, p) at output row p: (B, 4*C, H+1, W+1).
        y = F.conv2d(x, weight, bias, padding=1)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        out = torch.empty(b, c, 2 * hgt, 2 * wid, dtype=x.dtype, device=x.device, memory_format=layout)
        for a in (0, 1):
            for bb in (0, 1):
                phase = 2 * a + bb
                out[:, :, a::2, bb::2] = y[:, phase * c:(phase + 1) * c, a:a + hgt, bb:bb + wid]
        return out


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (empty: LDM VAEs have none) and a resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, with_attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if with_attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*z or z, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        block_in = widths[0]
        for level, block_out in enumerate(widths):
            stage = _Level()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            if level != cfg.levels - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in, g, cfg.mid_attention)
        self.norm_out = GroupNormAct(g, block_in, act=True)
        z_out = 2 * cfg.latent_channels if cfg.double_z else cfg.latent_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_cast_for(x, self.conv_in))
        for stage in self.down:
            h = _cast_for(h, stage)
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(_cast_for(h, self.mid))
        return self.conv_out(self.norm_out(_cast_for(h, self.norm_out)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out, h*f, w*f). `up` is indexed by level, run in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, cfg.block_out_channels
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, cfg.mid_attention)
        levels: list[_Level] = []
        for level in reversed(range(cfg.levels)):
            stage = _Level()
            block_out = widths[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
            levels.insert(0, stage)  # keep the release's order: up[0] is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNormAct(g, block_in, act=True)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_cast_for(z, self.conv_in))
        h = self.mid(_cast_for(h, self.mid))
        for stage in reversed(self.up):
            h = _cast_for(h, stage)
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(_cast_for(h, self.norm_out)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `encode` images in [-1, 1] to unscaled latents, `decode` them back.

    Latent scaling and shift (0.18215 for SD 1.x, 0.13025 for SDXL, ...) belong to the family's
    latent format, not to this module.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            z = config.latent_channels
            self.quant_conv = nn.Conv2d(2 * z if config.double_z else z, 2 * z if config.double_z else z, 1)
            self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def set_precision(self, dtype: torch.dtype = torch.bfloat16, levels: int | None = None) -> AutoencoderKL:
        """Run the `levels` highest-resolution levels of encoder and decoder in `dtype`, the rest in fp32.

        `levels=None` casts everything. The high-resolution levels hold most of the FLOPs, while
        rounding errors made at low resolution are amplified by every later layer, so keeping the
        low-resolution half in fp32 buys most of the speed for a fraction of the error
        (numbers in docs/benchmarks.md, "VAE decode"). Returns self.
        """
        n_levels = self.config.levels
        levels = n_levels if levels is None else max(0, min(levels, n_levels))
        self.float()
        if levels == 0:
            return self
        if levels == n_levels:
            return self.to(dtype)
        high_res = [self.encoder.conv_in, self.decoder.norm_out, self.decoder.conv_out]
        high_res += [self.encoder.down[i] for i in range(levels)]
        high_res += [self.decoder.up[i] for i in range(levels)]
        for module in high_res:
            module.to(dtype)
        return self

    def _prepare(self, x: torch.Tensor, first: nn.Module) -> torch.Tensor:
        """Cast to the dtype/device of `first` (the first layer to run) and use channels_last on CPU.

        channels_last is oneDNN's fast layout (for bf16 convolutions above all).
        """
        ref = next(first.parameters())
        x = x.to(device=ref.device, dtype=ref.dtype)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, z, H/f, W/f).

        For an encoder without `double_z` the logvar is zeros.
        """
        f = self.downscale_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            from diffstudio.errors import InvalidSizeError
            raise InvalidSizeError(f"image size {tuple(images.shape[-2:])} is not a multiple of {f}: "
                                   f"crop or resize it to a multiple of {f} pixels before encoding.")
        moments = self.encoder(self._prepare(images, self.encoder.conv_in))
        if self.config.use_quant_conv:
            moments = self.quant_conv(_cast_for(moments, self.quant_conv))
        if not self.config.double_z:
            return moments.contiguous(), torch.zeros_like(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(*LOGVAR_RANGE).contiguous()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> unscaled latent mean (B, z, H/f, W/f)."""
        return self.encode_dist(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """unscaled latents (B, z, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        first = self.post_quant_conv if self.config.use_quant_conv else self.decoder.conv_in
        z = self._prepare(latents, first)
        if self.config.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images))
