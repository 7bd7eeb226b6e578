"""The LDM UNet: the noise predictor of Stable Diffusion 1.x / 2.x, SDXL and Kolors.

Reference: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), section 3.3 and appendix; the layout is the released "openaimodel" UNet
(Dhariwal & Nichol 2021) with SpatialTransformer blocks for cross-attention (LDM fig. 3).
SDXL (Podell et al. 2023, arXiv:2307.01952) adds per-level transformer depths and the "vector"
conditioning `y` (pooled text embedding + size/crop embeddings) fed through `label_emb`.

Parameter names are the original release's (``input_blocks.N.M...``, ``middle_block...``,
``output_blocks...``), so a single-file checkpoint loads after stripping ``model.diffusion_model.``.

Shapes: x (B, C_in, H, W) latents; timesteps (B,) float on the 1000-step scale;
context (B, T, context_dim) text tokens; y (B, adm_in_channels) for SDXL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffstudio.errors import InvalidInputError, MotionModuleMismatchError
from diffstudio.models.cpu_linear import Linear  # nn.Linear with oneDNN's faster fp32 CPU inference path
from diffstudio.models.layers import attention, timestep_embedding


@dataclass
class UNetConfig:
    """Constructor arguments of `UNetModel` (the LDM yaml's ``unet_config.params``).

    ``num_res_blocks`` and ``transformer_depth`` are per level (0 depth = no attention there).
    Exactly one of ``num_heads`` / ``num_head_channels`` is used; the other is -1.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    transformer_depth: list[int] = field(default_factory=lambda: [1, 1, 1, 0])
    transformer_depth_middle: int = 1
    context_dim: int | None = 768
    num_heads: int = 8
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32
    # Kolors: a linear map of the text encoder's hidden states to context_dim (diffusers' text_proj).
    encoder_hid_dim: int | None = None

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = [self.num_res_blocks] * levels
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = [self.transformer_depth] * levels
        self.channel_mult = list(self.channel_mult)
        self.num_res_blocks = list(self.num_res_blocks)
        self.transformer_depth = list(self.transformer_depth)
        if not (len(self.num_res_blocks) == len(self.transformer_depth) == levels):
            raise ValueError("UNetConfig: channel_mult, num_res_blocks and transformer_depth need one entry "
                             f"per level; got {self.channel_mult}, {self.num_res_blocks}, "
                             f"{self.transformer_depth}")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("UNetConfig: set exactly one of num_heads / num_head_channels (the other -1); "
                             f"got num_heads={self.num_heads}, num_head_channels={self.num_head_channels}")
        if self.transformer_depth_middle < 1:
            raise ValueError("UNetConfig: transformer_depth_middle must be >= 1 (the LDM middle block always "
                             f"has a SpatialTransformer); got {self.transformer_depth_middle}")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a SpatialTransformer `channels` wide."""
        if self.num_head_channels == -1:
            if channels % self.num_heads:
                raise ValueError(f"UNetConfig: {channels} channels do not split into {self.num_heads} heads")
            return self.num_heads, channels // self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(f"UNetConfig: {channels} channels do not split into heads of "
                             f"{self.num_head_channels}")
        return channels // self.num_head_channels, self.num_head_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Attention. fp32 and GPUs use layers.attention (SDPA). On CPU in bfloat16, SDPA's fused kernel
# measured slower than plain bf16 matmuls (oneDNN, AVX512-BF16) around a softmax, chunked over
# queries so that one chunk of scores stays cache-sized (docs/benchmarks.md, "UNet step").
# --------------------------------------------------------------------------------------------

CPU_BF16_SCORE_CHUNK = 1 << 22  # score elements per chunk (8 MiB in bf16); 4-8x larger was slower


def cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with bf16 matmuls; q: (B, Nq, heads*d), k/v: (B, Nk, heads*d),
    mask: an additive bias broadcastable to (B, heads, Nq, Nk) (region prompts), or None.

    The softmax accumulates in float32 (PyTorch's CPU kernel does for bf16); the scores are
    rounded to bf16 before it, which roughly doubles the error of a bf16 SDPA (both ~1e-2).
    """
    b, nq, inner = q.shape
    nk = k.shape[1]
    d = inner // heads
    # (B, N, heads*d) -> (B*heads, N, d); q is pre-scaled so the scores need no extra pass.
    q = (q * d ** -0.5).view(b, nq, heads, d).transpose(1, 2).reshape(b * heads, nq, d)
    k_t = k.view(b, nk, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, nk)
    v = v.view(b, nk, heads, d).transpose(1, 2).reshape(b * heads, nk, d)
    out = torch.empty(b * heads, nq, d, dtype=v.dtype, device=v.device)
    rows = max(1, min(nq, CPU_BF16_SCORE_CHUNK // (b * heads * nk)))
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        scores = torch.bmm(q[:, start:stop], k_t)                        # (B*heads, rows, Nk)
        if mask is not None:
            part = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
            scores = scores.view(b, heads, stop - start, nk).add_(part).view(b * heads, stop - start, nk)
        torch.bmm(scores.softmax(dim=-1), v, out=out[:, start:stop])     # (B*heads, rows, d)
    return out.view(b, heads, nq, d).transpose(1, 2).reshape(b, nq, inner)


def unet_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is not None:
        mask = mask.to(device=q.device, dtype=q.dtype)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        return cpu_bf16_attention(q, k, v, heads, mask)
    return attention(q, k, v, heads, mask)


# --------------------------------------------------------------------------------------------
# Building blocks (names follow ldm/modules/diffusionmodules/openaimodel.py and attention.py)
# --------------------------------------------------------------------------------------------


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format x is in: channels_last if the model was put in it, else the default."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def silu_(x: torch.Tensor) -> torch.Tensor:
    """SiLU in place when no gradient is recorded (saves a full-size allocation per call)."""
    return F.silu(x, inplace=not x.requires_grad)


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose statistics are taken in float32 (LDM's GroupNorm32).

    PyTorch's CPU and CUDA kernels already accumulate half/bfloat16 inputs in float32, so the
    explicit up-cast of the reference (a full-size copy each way) is not needed.
    """
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class ResBlock(nn.Module):
    """openaimodel.ResBlock without scale-shift norm: GN-SiLU-conv, + time embedding, GN-SiLU-conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(),
                                        nn.Identity(),  # dropout (0 in every released config)
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = silu_(group_norm(self.in_layers[0], x))
        h = self.in_layers[2](h)                                         # (B, C_out, H, W)
        h += self.emb_layers[1](F.silu(emb))[:, :, None, None].to(h.dtype)  # conv outputs: safe in place
        h = silu_(group_norm(self.out_layers[0], h))
        h = self.out_layers[3](h)
        return h.add_(self.skip_connection(x))


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 (or to the skip's size, so odd latent sizes work) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention of LDM: queries from x, keys/values from context (or x: self-attention).

    ``ip_index``: the layer's place among the UNet's cross-attention layers (set by UNetModel; None for
    self-attention), under which the IP-Adapter hook's ``ip`` holds its extra keys and values.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.ip_index: int | None = None
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, ip: Sequence | None = None,
                frames: int | None = None) -> torch.Tensor:
        """bias: additive attention bias broadcastable to (B, heads, N, T) (region prompts).
        ip: the IP-Adapter hook (UNetModel.forward): decoupled cross-attention (Ye et al. 2023, eq. 5),
        out = Attn(q, K_text, V_text) + sum of scale * Attn(q, K_image, V_image) over this layer's entries.
        frames: the cross-frame attention hook (self-attention only): the rows are videos of ``frames`` frames
        and every frame's queries attend to the tokens of all frames of its video."""
        ctx = x if context is None else context
        q = self.to_q(x)
        if frames is not None and frames > 1 and context is None:
            # (B, N, inner) -> (B / F, F * N, inner): one token sequence per video, so each frame's queries
            # meet the keys and values of every frame of it (DiffSynth's cross-frame attention); back after.
            b, n, inner = q.shape
            k, v = self.to_k(x), self.to_v(x)
            out = unet_attention(*(t.reshape(b // frames, frames * n, inner) for t in (q, k, v)), self.heads)
            return self.to_out[0](out.reshape(b, n, inner))
        out = unet_attention(q, self.to_k(ctx), self.to_v(ctx), self.heads, bias)  # (B, N, heads*d)
        if ip is not None and self.ip_index is not None:
            for k_image, v_image, scale in ip[self.ip_index]:                   # (B, tokens, heads*d) each
                out = out + scale * unet_attention(q, k_image, v_image, self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Shazeer 2020: (x W + b) split in two halves a, g -> a * GELU(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)                         # 2 x (B, N, dim_out)
        if torch.is_grad_enabled():
            return a * F.gelu(gate)
        return F.gelu(gate).mul_(a)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None,
                context_bias: torch.Tensor | None = None, ip: Sequence | None = None,
                frames: int | None = None, merge=None) -> torch.Tensor:
        """``merge``: a models.token_merge.MergePlan, the self-attention on merged tokens (ToMe)."""
        if torch.is_grad_enabled():  # the norms keep x for their backward pass: no in-place updates
            x = x + self._self_attention(x, frames, merge)
            x = x + self.attn2(self.norm2(x), context, context_bias, ip)
            return x + self.ff(self.norm3(x))
        x = x + self._self_attention(x, frames, merge)  # a fresh tensor: the caller's x stays untouched
        x += self.attn2(self.norm2(x), context, context_bias, ip)
        x += self.ff(self.norm3(x))
        return x

    def _self_attention(self, x: torch.Tensor, frames: int | None, merge) -> torch.Tensor:
        if merge is None:
            return self.attn1(self.norm1(x), frames=frames)
        return merge.unmerge(self.attn1(merge.merge(self.norm1(x))))


class SpatialTransformer(nn.Module):
    """LDM fig. 3: GroupNorm, project in, `depth` transformer blocks over the H*W tokens, project out.

    proj_in/proj_out are 1x1 convs (SD 1.x) or linear layers (SD 2.x, SDXL: use_linear).
    """

    token_merging = None  # a models.token_merge.TokenMerging while a UNet call merges tokens (UNetModel.forward)

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None,
                 use_linear: bool, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None,
                context_bias: dict[int, torch.Tensor] | None = None, ip: Sequence | None = None,
                frames: int | None = None) -> torch.Tensor:
        """context_bias: {tokens: (B|1, 1, tokens, T)} cross-attention biases by grid size (region prompts).
        frames: cross-frame self-attention over videos of that many frames (CrossAttention.forward)."""
        b, c, hgt, wid = x.shape
        bias = None
        if context_bias is not None:
            bias = context_bias.get(hgt * wid)
            if bias is None:
                raise ValueError(f"context_bias has no entry for a {hgt}x{wid} token grid ({hgt * wid} tokens); "
                                 f"it has {sorted(context_bias)}: build it with region_token_grids()")
        h = group_norm(self.norm, x)
        if not self.use_linear:
            h = self.proj_in(h)
        # (B, C, H, W) -> (B, H*W, C); a free view when h is channels_last.
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, h.shape[1])
        if self.use_linear:
            h = self.proj_in(h)
        merging = self.token_merging if frames is None else None  # (cross-frame attention is not merged)
        for block in self.transformer_blocks:
            h = block(h, context, bias, ip, frames, None if merging is None else merging.plan(h))
        if self.use_linear:
            h = self.proj_out(h)
        # (B, H*W, C) -> (B, C, H, W) in the layout of x (a free view if x is channels_last).
        h = h.view(b, hgt, wid, h.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=_layout(x))
        if not self.use_linear:
            h = self.proj_out(h)
        return h.add_(x)  # h is a fresh projection output: adding in place is autograd-safe


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands each layer what it takes: emb (ResBlock), context (transformer).

    ``temporal`` (the motion hook, docs/animatediff.md) runs once, right after the block's spatial
    part: after its SpatialTransformer if it has one, else after its ResBlock; so before an
    Upsample, and between the middle block's transformer and its second ResBlock (AnimateDiff's
    placement). conv_in and Downsample blocks have no hook point (``temporal_after`` is None).
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        transformers = [i for i, layer in enumerate(layers) if isinstance(layer, SpatialTransformer)]
        resblocks = [i for i, layer in enumerate(layers) if isinstance(layer, ResBlock)]
        self.temporal_after = (transformers or resblocks or [None])[0]

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                out_size: Sequence[int] | None = None, context_bias: dict | None = None,
                temporal: Callable[[torch.Tensor], torch.Tensor] | None = None,
                ip: Sequence | None = None, frames: int | None = None) -> torch.Tensor:
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_bias, ip, frames)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
            if temporal is not None and i == self.temporal_after:
                x = temporal(x)
        return x


# --------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------


def encoder_blocks(c, emb_dim: int, transformer) -> tuple[list[nn.Module], list[int]]:
    """The UNet's input blocks (conv_in, then per level its ResBlocks (+ transformers) and a Downsample but for
    the last level) and the width after each (the skips): shared with the ControlNet, which copies them."""
    mc = c.model_channels
    blocks: list[nn.Module] = [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
    widths, ch = [mc], mc
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, c.norm_groups)]
            ch = mult * mc
            if c.transformer_depth[level] > 0:
                layers.append(transformer(ch, c.transformer_depth[level]))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(c.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
    return blocks, widths


def add_embedding_layers(net: nn.Module, c) -> None:
    """The layers ``embed_conditioning`` runs: time_embed, SDXL's label_emb, Kolors' encoder_hid_proj."""
    emb_dim = c.model_channels * 4
    net.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    if c.adm_in_channels is not None:
        net.label_emb = nn.Sequential(nn.Sequential(
            nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
    if c.encoder_hid_dim is not None:
        if c.context_dim is None:
            raise ValueError(f"{type(c).__name__}: encoder_hid_dim needs context_dim (the projection's width)")
        net.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.context_dim)


def embed_conditioning(net: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                       y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The time embedding (+ SDXL's vector y through ``label_emb``) and the projected text context, shared by
    the UNet and its ControlNet (which copies these layers): (B, 4*mc), (B, T, context_dim)."""
    c = net.config
    dtype = net.dtype
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x.shape[0])
    emb = net.time_embed(timestep_embedding(timesteps, c.model_channels).to(dtype))
    if c.adm_in_channels is not None:
        if y is None:
            raise ValueError(f"this {type(net).__name__} takes a vector condition y of width {c.adm_in_channels} "
                             "(SDXL: pooled text embedding + size/crop embeddings); pass y=")
        emb = emb + net.label_emb(y.to(dtype))
    if context is not None:
        context = context.to(dtype)
        if c.encoder_hid_dim is not None:
            context = net.encoder_hid_proj(context)
    return emb, context


class UNetModel(nn.Module):
    """LDM UNet. ``forward(x, timesteps, context, y=None, control=None) -> raw output`` (eps or v).

    ``control`` is the ControlNet hook (Zhang et al. 2023, cldm convention): a sequence with one
    residual per input block (in order, shaped like that block's output) followed by one for the
    middle block. The last is added to the middle output; the others to the skips as they are
    popped by the output blocks.

    ``context_bias`` is the region-prompt hook (docs/regions.md): {image tokens: additive bias
    (B|1, 1, image tokens, T)} for the cross-attention layers, one entry per token grid of
    ``region_token_grids``.

    ``motion`` + ``num_frames`` is the temporal hook (AnimateDiff, docs/animatediff.md): x holds
    videos of ``num_frames`` consecutive frames in its batch axis, (B*F, C, H, W), and after the
    spatial part of each ResBlock(+transformer) block the UNet calls
    ``motion.site(part, level, j)(h, num_frames)`` (``temporal_sites`` lists the sites per block).
    Without ``motion`` the UNet computes exactly what it computes without this hook.

    ``ip`` is the IP-Adapter hook (docs/ipadapter.md): one entry per cross-attention layer, in the order of
    ``cross_attention_layers()``, each a sequence of (keys, values, scale) of image tokens projected for
    that layer, (B, tokens, layer width); an empty entry leaves the layer as it is. Without ``ip`` the UNet
    computes exactly what it computes without this hook.

    ``frame_attention`` is the cross-frame attention hook (docs/diffutoon.md): x holds videos of that many
    consecutive frames (frame index fastest), and every self-attention layer attends over the tokens of all
    frames of a row's video instead of its own frame's (DiffSynth-Studio's cross-frame attention, which keeps
    a frame-wise re-render consistent). Identical frames give the frame-wise result; None leaves the UNet as is.
    """

    region_attention = "cross"  # how text reaches the image tokens (pipeline/region_attention.py)
    supports_feature_cache = True  # forward's DeepCache hook (pipeline/deep_cache.py)
    supports_token_merge = True  # forward's ToMe hook (pipeline/token_merging.py)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        c = config
        mc = c.model_channels
        add_embedding_layers(self, c)
        emb_dim = mc * 4

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim,
                                      c.use_linear_in_transformer, c.norm_groups)

        g = c.norm_groups
        blocks, skip_channels = encoder_blocks(c, emb_dim, transformer)
        self.input_blocks = nn.ModuleList(blocks)
        ch = skip_channels[-1]

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, g),
                                                    transformer(ch, c.transformer_depth_middle),
                                                    ResBlock(ch, emb_dim, ch, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, g)]
                ch = mult * mc
                if c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.temporal_sites = self._temporal_sites()
        for index, layer in enumerate(self.cross_attention_layers()):
            layer.ip_index = index

        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(mc, c.out_channels, 3, padding=1))

    def _temporal_sites(self) -> dict[str, list]:
        """Motion hook site of each block: ("down", level, j) for the j-th ResBlock block of an input
        level, ("mid", 0, 0), ("up", u, j) for the j-th block of the u-th output level (deepest first);
        None for blocks without a hook point (conv_in, Downsample)."""
        c = self.config
        inputs: list = [None]
        for level, count in enumerate(c.num_res_blocks):
            inputs += [("down", level, j) for j in range(count)]
            if level != len(c.num_res_blocks) - 1:
                inputs.append(None)
        outputs = [("up", u, j) for u, level in enumerate(reversed(range(len(c.num_res_blocks))))
                   for j in range(c.num_res_blocks[level] + 1)]
        return {"input": inputs, "middle": [("mid", 0, 0)], "output": outputs}

    def cross_attention_layers(self) -> list[CrossAttention]:
        """The text cross-attention layers (attn2) in diffusers' attention-processor order: the input blocks,
        then the output blocks, then the middle block (the order IP-Adapter files number them in)."""
        blocks = [*self.input_blocks, *self.output_blocks, self.middle_block]
        return [tb.attn2 for block in blocks for layer in block if isinstance(layer, SpatialTransformer)
                for tb in layer.transformer_blocks]

    def _temporal_hooks(self, motion, num_frames: int | None, batch: int) -> dict[str, list] | None:
        """Per block, the callable h -> h of the motion hook (None where there is none); see forward."""
        if motion is None:
            return None
        if not isinstance(num_frames, int) or num_frames < 1 or batch % num_frames:
            raise InvalidInputError(f"a motion module needs num_frames= (frames per video, a divisor of the batch "
                                    f"of {batch}); got num_frames={num_frames!r}")
        reason = motion.mismatch(self.config)
        if reason:
            raise MotionModuleMismatchError(f"{reason}. Use a motion module made for this model family "
                                            "(SD 1.x modules for SD 1.x, the SDXL module for SDXL).")

        def hook(site):
            module = None if site is None else motion.site(*site)
            return None if module is None else (lambda h: module(h, num_frames))

        return {part: [hook(site) for site in sites] for part, sites in self.temporal_sites.items()}

    def _channels_last(self) -> bool:
        """Activations follow the conv weights' layout.

        ``model.to(memory_format=torch.channels_last)`` opts in (often faster for half precision on
        GPUs); on CPU it measured neutral (docs/benchmarks.md, "UNet step").
        """
        weight = self.input_blocks[0][0].weight  # conv_in
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def region_token_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) feature grids of each level for a latent of height x width (the stride-2
        downsampling rounds up), where the transformer blocks run."""
        grids = []
        for _ in self.config.channel_mult:
            grids.append((height, width))
            height, width = (height + 1) // 2, (width + 1) // 2
        return grids

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor | None, out_size: Sequence[int] | None = None,
             context_bias: dict | None = None, temporal: Callable | None = None,
             ip: Sequence | None = None, frames: int | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, out_size, context_bias, temporal, ip, frames,
                              use_reentrant=False)
        return block(h, emb, context, out_size, context_bias, temporal, ip, frames)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None,
                context_bias: dict[int, torch.Tensor] | None = None, motion: nn.Module | None = None,
                num_frames: int | None = None, ip: Sequence | None = None, frame_attention: int | None = None,
                feature_cache=None, token_merge=None,
                **extra) -> torch.Tensor:
        """x (B, C_in, H, W), timesteps (B,), context (B, T, D), y (B, adm) -> (B, C_out, H, W).

        Inputs are cast to the weights' dtype; ``extra`` is accepted (other families' conditioning)
        and unused. ``motion`` (a models.motion.MotionModules), ``num_frames`` and ``ip``: see the class docstring.

        ``feature_cache`` is the DeepCache hook (Ma et al. 2023; pipeline/deep_cache.py): an object with
        ``branch`` (an input block index b), ``reuse`` (bool) and ``feature``. A full pass stores in ``feature``
        the input of the output block that pairs with input block b; a ``reuse`` pass computes only input
        blocks 0..b and the output blocks from that pair on, starting from the stored feature.

        ``token_merge`` (a models.token_merge.TokenMerging) merges the tokens of the self-attention in the
        transformers near the latent's resolution for this call (ToMe; pipeline/token_merging.py).
        """
        if token_merge is None:
            return self._forward(x, timesteps, context, y, control, context_bias, motion, num_frames, ip,
                                 frame_attention, feature_cache)
        transformers = [m for m in self.modules() if isinstance(m, SpatialTransformer)]
        merging = token_merge.at(x.shape[-2:])
        for module in transformers:
            module.token_merging = merging
        try:
            return self._forward(x, timesteps, context, y, control, context_bias, motion, num_frames, ip,
                                 frame_attention, feature_cache)
        finally:
            for module in transformers:
                del module.token_merging  # back to the class default: None

    def _forward(self, x, timesteps, context, y, control, context_bias, motion, num_frames, ip, frame_attention,
                 feature_cache) -> torch.Tensor:
        dtype = self.dtype
        emb, context = embed_conditioning(self, x, timesteps, context, y)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control needs {len(self.input_blocks) + 1} residuals (one per input block, "
                             f"then the middle); got {len(control)}")

        if ip is not None and len(ip) != len(self.cross_attention_layers()):
            raise InvalidInputError(f"ip needs one entry per cross-attention layer "
                                    f"({len(self.cross_attention_layers())}); got {len(ip)}")
        hooks = self._temporal_hooks(motion, num_frames, x.shape[0])
        frames = frame_attention
        if frames is not None and (frames < 1 or x.shape[0] % frames):
            raise InvalidInputError(f"frame_attention={frames} (frames per video) must divide the batch of "
                                    f"{x.shape[0]} rows")
        none = [None] * max(len(self.input_blocks), len(self.output_blocks))
        input_hooks, middle_hooks, output_hooks = (none, none, none) if hooks is None else \
            (hooks["input"], hooks["middle"], hooks["output"])

        h = x.to(dtype)
        if self._channels_last():
            h = h.contiguous(memory_format=torch.channels_last)
        reuse = feature_cache is not None and feature_cache.reuse
        # the output block that pairs with the cache's branch (-1: none)
        first = -1 if feature_cache is None else len(self.output_blocks) - 1 - feature_cache.branch
        skips = []
        for block, temporal in zip(self.input_blocks[:feature_cache.branch + 1] if reuse else self.input_blocks,
                                   input_hooks):
            h = self._run(block, h, emb, context, context_bias=context_bias, temporal=temporal, ip=ip, frames=frames)
            skips.append(h)
        if reuse:
            h = feature_cache.feature
        else:
            h = self._run(self.middle_block, h, emb, context, context_bias=context_bias, temporal=middle_hooks[0],
                          ip=ip, frames=frames)
            if control is not None:
                h = h + control[-1].to(dtype)
        for j, (block, temporal) in enumerate(zip(self.output_blocks, output_hooks)):
            if reuse and j < first:  # computed in the full pass whose output block `first` input is cached
                continue
            if j == first and not reuse:
                feature_cache.feature = h
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(dtype)
            h = torch.cat([h, skip], dim=1)
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None, context_bias, temporal,
                          ip, frames)
        h = silu_(group_norm(self.out[0], h))
        return self.out[2](h).contiguous()
