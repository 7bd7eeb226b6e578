"""MMDiT: the denoiser of Stable Diffusion 3 and 3.5.

Reference: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (arXiv:2403.03206), section 4 and figure 2. Text tokens and image tokens keep separate
weights (a "context" stream and an "x" stream per joint block) but attend jointly: each stream
computes its own q, k, v, the two sequences are concatenated, one attention runs over
[context; image], and the result is split back. Both streams are modulated by adaLN-Zero from
c = t_embedder(t) + y_embedder(pooled text) (the DiT conditioning, Peebles & Xie 2023).

Release variations, all chosen by the config:
* SD3.5-large and -medium normalise q and k per head with RMSNorm (``qk_norm="rms"``, paper
  sec. 5.3.2 "QK-normalization"; weights ``attn.ln_q`` / ``attn.ln_k``).
* SD3.5-medium's MMDiT-X adds a second, image-only self-attention (``x_block.attn2``) in its first
  13 blocks (``dual_attention_layers``); its adaLN then gives 9 modulation vectors instead of 6.
* The last block's context stream is "pre_only": its attention output is never used (nothing reads
  the text tokens afterwards), so it has no output projection, no MLP and 2 modulation vectors.

Parameter names are the original release's (``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp.0``,
``joint_blocks.N.context_block.attn.qkv``, ``final_layer.linear`` ...), so a single file loads after
stripping ``model.diffusion_model.``.

Shapes: x (B, C, H, W) latents with H, W multiples of the patch size; t (B,) = 1000 * sigma;
y (B, adm_in_channels) pooled text; context (B, T, context_in_dim) text tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffstudio.errors import InvalidSizeError
from diffstudio.models.cpu_linear import Linear  # nn.Linear with oneDNN's faster fp32 CPU inference path
from diffstudio.models.layers import Mlp, attention, timestep_embedding


@dataclass
class MMDiTConfig:
    """Constructor arguments of `MMDiT`. Released models: hidden_size = 64 * depth, heads = depth."""

    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # the learned position table covers max_size x max_size patches
    context_in_dim: int = 4096  # width of the text tokens (T5-XXL; CLIP features are zero-padded to it)
    adm_in_channels: int | None = 2048  # width of the pooled text vector y (CLIP-L 768 + CLIP-G 1280)
    mlp_hidden_size: int = 6144  # 4 * hidden_size in every release
    qk_norm: str | None = None  # None or "rms"
    dual_attention_layers: tuple[int, ...] = ()  # blocks whose x stream has a second self-attention
    frequency_embedding_size: int = 256  # width of the sinusoidal timestep features

    def __post_init__(self) -> None:
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"MMDiTConfig: hidden_size {self.hidden_size} does not split into "
                             f"{self.num_heads} heads")
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"MMDiTConfig: qk_norm must be None or 'rms', got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"MMDiTConfig: dual_attention_layers {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> MMDiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"MMDiTConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def patch_grid(height: int, width: int, patch: int, max_size: int | None) -> tuple[int, int]:
    """A latent's token grid (h, w) = its sides in patches; InvalidSizeError when a side is not a multiple of
    the patch or the grid exceeds the position table (``max_size`` patches a side; None: no table)."""
    if height % patch or width % patch:
        raise InvalidSizeError(f"MMDiT latents must have height and width divisible by the patch size {patch} "
                               f"(images: multiples of {8 * patch} pixels), got {height}x{width} latents")
    h, w = height // patch, width // patch
    if max_size is not None and max(h, w) > max_size:
        most = max_size * patch * 8
        raise InvalidSizeError(f"this MMDiT's position table covers at most {most}x{most} pixels "
                               f"({max_size} patches a side), got {height * 8}x{width * 8}")
    return h, w


def cropped_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The centre h x w crop of a learned (1, S*S, C) position table, (1, h * w, C); h, w in patches."""
    size = math.isqrt(table.shape[1])
    top, left = (size - h) // 2, (size - w) // 2
    return table.view(1, size, size, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)


def adaln_condition(t_embedder: nn.Module, y_embedder: nn.Module | None, t: torch.Tensor, y: torch.Tensor | None,
                    batch: int, frequency_size: int, dtype: torch.dtype) -> torch.Tensor:
    """c = t_embedder(sinusoid(t)) + y_embedder(y), (B, C): the vector every adaLN modulation reads."""
    t_freq = timestep_embedding(t.reshape(-1).expand(batch), frequency_size)
    c = t_embedder(t_freq.to(dtype))
    if y_embedder is not None:
        if y is None:
            raise ValueError("this MMDiT conditions on a pooled text vector: pass y (B, adm_in_channels)")
        c = c + y_embedder(y)
    return c


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, C) normalised, shift/scale (B, C) -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learned gain (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, hidden): a p x p stride-p convolution, tokens in raster order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; `mlp.0` and `mlp.2` are the released names (t_embedder, y_embedder)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SelfAttention(nn.Module):
    """The q, k, v (and output) projections of one stream; the attention itself runs in JointBlock."""

    def __init__(self, dim: int, heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = None if pre_only else Linear(dim, dim)
        self.ln_q = RMSNorm(self.head_dim) if qk_norm == "rms" else None
        self.ln_k = RMSNorm(self.head_dim) if qk_norm == "rms" else None

    def qkv_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) -> q, k, v each (B, L, C). The qkv rows are [q; k; v], each heads x head_dim."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)  # each (B, L, heads, d)
        if self.ln_q is not None:  # QK-norm acts on each head's vector
            q, k = self.ln_q(q), self.ln_k(k)
        return q.reshape(b, n, -1), k.reshape(b, n, -1), v.reshape(b, n, -1)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention of one stream (MMDiT-X's attn2): (B, L, C) -> (B, L, C), projected."""
        return self.proj(attention(*self.qkv_of(x), self.heads))


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-modulated pre-attention and post-attention halves."""

    def __init__(self, config: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        dim = config.hidden_size
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, config.num_heads, config.qk_norm, pre_only)
        if dual:
            self.attn2 = SelfAttention(dim, config.num_heads, config.qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, config.mlp_hidden_size)
        # Modulation vectors: (shift, scale) for attention when pre_only; else (shift, scale, gate) for
        # attention and for the MLP, plus (shift, scale, gate) for attn2 in MMDiT-X blocks.
        self.n_mods = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, self.n_mods * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x (B, L, C), c (B, C) -> (q, k, v), the modulation vectors, norm1(x)."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        h = self.norm1(x)
        return self.attn.qkv_of(modulate(h, mods[0], mods[1])), mods, h

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mods, attn2_out=None) -> torch.Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if attn2_out is not None:
            x = x + mods[8][:, None] * attn2_out
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def alone(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The stream as a block of its own, attending over its own tokens only (no second stream):
        x (B, L, C), c (B, C) -> (B, L, C). The blocks of the SD3.5 ControlNets are these."""
        (q, k, v), mods, _ = self.pre_attention(x, c)
        return self.post_attention(x, attention(q, k, v, self.attn.heads), mods)


class JointBlock(nn.Module):
    def __init__(self, config: MMDiTConfig, index: int, context_pre_only: bool | None = None):
        """context_pre_only: whether the text stream is "pre_only"; None = only in the last block, as in the
        MMDiT (a ControlNet's blocks all keep their text stream: ``False``)."""
        super().__init__()
        self.heads = config.num_heads
        if context_pre_only is None:
            context_pre_only = index == config.depth - 1
        self.context_block = DismantledBlock(config, pre_only=context_pre_only)
        self.x_block = DismantledBlock(config, dual=index in config.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None):
        """context (B, T, C), x (B, N, C), c (B, C) -> (context or None after the last block, x).
        bias: an additive attention bias over [context; image], (B|1, 1, T + N, T + N) (region prompts)."""
        (cq, ck, cv), c_mods, _ = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_mods, x_norm = self.x_block.pre_attention(x, c)
        n_ctx = context.shape[1]
        # One attention over the concatenated sequence [context; image] (paper fig. 2b).
        out = attention(torch.cat([cq, xq], 1), torch.cat([ck, xk], 1), torch.cat([cv, xv], 1), self.heads, bias)
        c_out, x_out = out[:, :n_ctx], out[:, n_ctx:]
        attn2 = None
        if self.x_block.dual:  # MMDiT-X: image tokens also attend among themselves, own weights/modulation
            attn2 = self.x_block.attn2.self_attention(modulate(x_norm, x_mods[6], x_mods[7]))
        x = self.x_block.post_attention(x, x_out, x_mods, attn2)
        context = None if self.context_block.pre_only else self.context_block.post_attention(context, c_out, c_mods)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        dim, p = config.hidden_size, config.patch_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, p * p * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))  # (shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    # Computes in its input's dtype and never reads a weight's dtype, so float8-stored Linear weights
    # can stay float8 (diffstudio.models.lowbit).
    lowbit_storage = True
    # Region prompts (docs/regions.md): forward(joint_bias=...) masks the joint attention.
    region_attention = "joint"

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        # Learned absolute positions for a max_size x max_size grid; an image uses the centre crop
        # of its own size. Loaded from the checkpoint (zeros until then).
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_max_size ** 2, dim))
        self.t_embedder = MLPEmbedder(config.frequency_embedding_size, dim)
        self.y_embedder = MLPEmbedder(config.adm_in_channels, dim) if config.adm_in_channels else None
        self.context_embedder = Linear(config.context_in_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.gradient_checkpointing = False

    def region_token_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The image token grid of a height x width latent (sides padded up to the patch size)."""
        p = self.config.patch_size
        return [(-(-height // p), -(-width // p))]

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w crop of the position table, (1, h * w, C), h and w in patches."""
        return cropped_positions(self.pos_embed, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, joint_bias: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) = 1000 sigma, y (B, adm), context (B, T, D) -> velocity (B, C_out, H, W).

        joint_bias: additive attention bias (B|1, 1, T + N, T + N) over [text; image] tokens, used by
        every joint block (region prompts, pipeline/region_attention.py).
        control: a ControlNet's residuals, M tensors (B, N, C) over the image tokens (models/sd3_controlnet.py).
        Block i's image tokens get residual int(i / (depth / M)) added after it (diffusers' SD3Transformer2DModel
        spaces them so: float division, then truncation), except the last block's (the one whose text stream
        is pre-only), as there."""
        cfg = self.config
        b, _, height, width = x.shape
        p = cfg.patch_size
        h, w = patch_grid(height, width, p, cfg.pos_embed_max_size)
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)  # (B, h*w, C)
        c = adaln_condition(self.t_embedder, self.y_embedder, t, y, b, cfg.frequency_embedding_size, x.dtype)
        context = self.context_embedder(context)  # (B, T, C)
        if joint_bias is not None:
            joint_bias = joint_bias.to(tokens)  # the model's device and compute dtype
        interval = len(self.joint_blocks) / len(control) if control else None
        for i, block in enumerate(self.joint_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, tokens = checkpoint(block, context, tokens, c, joint_bias, use_reentrant=False)
            else:
                context, tokens = block(context, tokens, c, joint_bias)
            if interval is not None and not block.context_block.pre_only:
                tokens = tokens + control[int(i / interval)].to(tokens.dtype)
        tokens = self.final_layer(tokens, c)  # (B, h*w, p*p*C_out)
        # Unpatchify: token (i, j) holds the p x p patch in (row, column, channel) order.
        out = tokens.view(b, h, w, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.out_channels, height, width)
