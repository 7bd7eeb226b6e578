"""Hunyuan-DiT (Li et al. 2024, "Hunyuan-DiT: A Powerful Multi-Resolution Diffusion Transformer with
Fine-Grained Chinese Understanding", arXiv:2405.08748), versions 1.0 - 1.2.

The paper's figure 2 / section 2.1, as released (DiT-g/2: 40 blocks, width 1408, 16 heads of 88):

* latents (B, 4, H, W) are cut into 2x2 patches -> N = H/2 * W/2 tokens of width D (``x_embedder``);
* text: a bilingual CLIP text tower (a BERT, 77 tokens of width 1024) and the mT5-XL encoder (256 tokens
  of width 2048). The mT5 states go through a two-layer refiner MLP to width 1024 (``mlp_t5``) and are
  appended to the BERT states (333 tokens); padded positions (mask 0) are replaced by learned vectors
  (``text_embedding_padding``). Every block cross-attends to these 333 tokens, no attention mask;
* the global condition c = MLP(timestep) + MLP([attention-pooled mT5 states (``pooler``, sec. 2.1
  "pooled text embedding"), sinusoidal image size (6 x 256, v1.0/1.1 only), style embedding (v1.0/1.1
  only)]) (``t_embedder`` + ``extra_embedder``). It enters each block only as an additive shift before
  self-attention ("add" conditioning, ``default_modulation``) and the final layer's adaLN;
* positions: 2D rotary embeddings on the image tokens (sec. 2.1, "Centralized Interpolative Positional
  Encoding"): the token grid is mapped into a square of 32x32 positions (the 512-px base) and centred;
  the queries and keys of self-attention and the queries of cross-attention are rotated;
* stability (sec. 2.1, "Improving training stability"): LayerNorm on the per-head queries and keys
  (QK-norm), LayerNorm after the long-skip concatenation, layer norms and SiLUs computed in float32;
* long skips (U-ViT style): block i > depth/2 takes the output of block depth-1-i, through
  ``skip_norm`` + ``skip_linear`` over the concatenation (the two middle blocks take none);
* learn_sigma: 8 output channels, the predicted v (first 4) and the variance interpolation (last 4;
  only DDPM's learned-variance sampler uses them).

Parameter names are those of the released ``t2i/model/pytorch_model_*.pt`` (Tencent/HunyuanDiT,
hydit/modules/models.py with the flash-attention naming ``attn1.Wqkv``). Block norms keep the release's
roles: ``norm1`` before self-attention, ``norm3`` before cross-attention, ``norm2`` before the MLP.

Forward signature: the release's, ``(x, t, encoder_hidden_states, text_embedding_mask,
encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size, style, cos_cis_img, sin_cis_img)``,
returning the output tensor (no ``return_dict``). Two choices: the RoPE tables may be left out (they are
then computed for the input's size, and cached), and ``image_meta_size`` / ``style`` are required exactly
when the config has size/style conditioning (v1.0/1.1) and refused otherwise, as in the release.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from diffstudio.errors import InvalidInputError
from diffstudio.models.cpu_linear import Linear  # nn.Linear with oneDNN's faster fp32 CPU inference path
from diffstudio.models.layers import Mlp, attention, timestep_embedding


@dataclass
class HunyuanDiTConfig:
    """Constructor arguments of `HunyuanDiT`; defaults are the released DiT-g/2 (v1.2)."""

    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * mlp_ratio 4.3637)
    learn_sigma: bool = True
    text_dim: int = 1024  # BERT width (cross-attention keys / values come from this width)
    text_dim_t5: int = 2048  # mT5-XL width
    text_len: int = 77
    text_len_t5: int = 256
    pooler_heads: int = 8
    pooler_dim: int = 1024
    size_style_cond: bool = False  # v1.0 / v1.1: image size (6 numbers) and style id in the global condition
    num_styles: int = 1
    qk_norm: bool = True
    rope_base_size: int = 32  # RoPE positions span this many tokens on the long side (512 px / 8 / patch 2)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"HunyuanDiTConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("HunyuanDiTConfig: the head width must be a multiple of 4 (2D RoPE splits it in "
                             f"two halves of (cos, sin) pairs); got {self.hidden_size // self.num_heads}")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"HunyuanDiTConfig: depth must be even (long skips pair the halves), got {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def extra_in_dim(self) -> int:
        """Width of the vector ``extra_embedder`` takes: pooled text [+ 6 x 256 size + style]."""
        return self.pooler_dim + ((6 * 256 + self.hidden_size) if self.size_style_cond else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HunyuanDiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"HunyuanDiTConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# 2D rotary position embedding.

def rope_positions(n: int, start: float, stop: float) -> torch.Tensor:
    """n positions from start towards stop, stop excluded (NumPy's linspace(endpoint=False), as released)."""
    return start + (stop - start) * torch.arange(n, dtype=torch.float64) / n


def rope_crop_region(grid_h: int, grid_w: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The released "fill, resize and crop" rule: the token grid, resized so its long side spans ``base``
    positions, centred in a base x base square -> ((top, left), (bottom, right))."""
    if grid_h > grid_w:
        height, width = base, int(round(base / grid_h * grid_w))
    else:
        height, width = int(round(base / grid_w * grid_h)), base
    top, left = int(round((base - height) / 2.0)), int(round((base - width) / 2.0))
    return (top, left), (top + height, left + width)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, base: int = 32,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (grid_h * grid_w, head_dim) float32, tokens in row-major order.

    The first half of each head encodes the token's column position, the second half its row (the
    release builds its grid with ``meshgrid(w, h)`` and encodes grid[0] first). Within a half, the
    frequency theta^(-2i/half) is repeated for the two members of an interleaved pair (2i, 2i+1).
    """
    (top, left), (bottom, right) = rope_crop_region(grid_h, grid_w, base)
    rows = rope_positions(grid_h, top, bottom)
    cols = rope_positions(grid_w, left, right)
    row_of = rows[:, None].expand(grid_h, grid_w).reshape(-1)
    col_of = cols[None, :].expand(grid_h, grid_w).reshape(-1)
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)
    angles = torch.cat([torch.outer(col_of, freqs), torch.outer(row_of, freqs)], dim=1)  # (N, head_dim / 2)
    angles = angles.float().repeat_interleave(2, dim=1)  # (N, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, N, heads, d) by the angles of cos/sin (N, d)."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x_odd, x_even)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Building blocks.

class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (the paper: fp16 overflowed in norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class FP32SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x.float()).to(x.dtype)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> SiLU (fp32) -> Linear; indices 0 and 2 hold the weights, as released."""
    return nn.Sequential(Linear(d_in, d_hidden), FP32SiLU(), Linear(d_hidden, d_out))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: 256 sinusoidal features ([cos, sin]) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class AttentionPool(nn.Module):
    """CLIP-style attention pooling of the mT5 tokens: the mean token, with learned positions on all
    L+1 tokens, is the single query over all of them (``num_heads`` heads), then ``c_proj``."""

    def __init__(self, length: int, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(length + 1, dim) / dim**0.5)
        self.k_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.c_proj = Linear(dim, out_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, out_dim)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        pooled = attention(self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.c_proj(pooled[:, 0])


class SelfAttention(nn.Module):
    """Self-attention over image tokens: fused qkv, per-head LayerNorm on q and k, RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.Wqkv = Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.Wqkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, h, d) each
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        out = attention(q.reshape(b, n, d), k.reshape(b, n, d), v.reshape(b, n, d), self.num_heads)
        return self.out_proj(out)


class CrossAttention(nn.Module):
    """Image tokens attend to the 333 text tokens: q from the image, fused k/v from the text, QK-norm,
    RoPE on the queries only (the text has no 2D position)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = Linear(dim, dim)
        self.kv_proj = Linear(context_dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias: additive (B|1, 1, N, text tokens) cross-attention bias (region prompts) or None."""
        b, n, d = x.shape
        m = context.shape[1]
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)), *rope)
        k, v = self.kv_proj(context).view(b, m, 2, self.num_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        out = attention(q.reshape(b, n, d), k.reshape(b, m, d), v.reshape(b, m, d), self.num_heads, bias)
        return self.out_proj(out)


class HunyuanDiTBlock(nn.Module):
    """[long skip] -> self-attention (+ shift from c) -> cross-attention -> MLP, pre-norm residuals."""

    def __init__(self, cfg: HunyuanDiTConfig, skip: bool):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = FP32LayerNorm(dim, eps=1e-6)
        self.attn1 = SelfAttention(dim, cfg.num_heads, cfg.qk_norm)
        self.norm2 = FP32LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, cfg.mlp_hidden)
        self.default_modulation = nn.Sequential(FP32SiLU(), Linear(dim, dim))
        self.attn2 = CrossAttention(dim, cfg.text_dim, cfg.num_heads, cfg.qk_norm)
        self.norm3 = FP32LayerNorm(dim, eps=1e-6)
        if skip:
            self.skip_norm = FP32LayerNorm(2 * dim, eps=1e-6)
            self.skip_linear = Linear(2 * dim, dim)
        else:
            self.skip_linear = None

    def forward(self, x, c, text, rope, skip=None, text_bias=None):
        if self.skip_linear is not None:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))
        shift = self.default_modulation(c).unsqueeze(1)  # (B, 1, D)
        x = x + self.attn1(self.norm1(x) + shift, rope)
        x = x + self.attn2(self.norm3(x), text, rope, text_bias)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) over a parameter-free LayerNorm, then the patch projection."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(FP32SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


# ---------------------------------------------------------------------------------------------

class HunyuanDiTInputs(nn.Module):
    """What the DiT and its ControlNet share ahead of their blocks: the text refiner and padding, the pooler,
    the patch, timestep and extra embedders, the 2D RoPE (release names, registered in the release's order)."""

    def __init__(self, config: HunyuanDiTConfig):
        super().__init__()
        self.config = cfg = config
        self.mlp_t5 = _mlp(cfg.text_dim_t5, 4 * cfg.text_dim_t5, cfg.text_dim)
        self.text_embedding_padding = nn.Parameter(torch.randn(cfg.text_len + cfg.text_len_t5, cfg.text_dim))
        self.pooler = AttentionPool(cfg.text_len_t5, cfg.text_dim_t5, cfg.pooler_heads, cfg.pooler_dim)
        if cfg.size_style_cond:
            self.style_embedder = nn.Embedding(cfg.num_styles, cfg.hidden_size)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.extra_embedder = _mlp(cfg.extra_in_dim, 4 * cfg.hidden_size, cfg.hidden_size)
        self._rope_cache: dict = {}

    def rope(self, grid_h: int, grid_w: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid_h, grid_w, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_2d(self.config.head_dim, grid_h, grid_w, self.config.rope_base_size)
            self._rope_cache = {key: (cos.to(device), sin.to(device))}  # keep one size
        return self._rope_cache[key]

    def region_token_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        p = self.config.patch_size
        return [(height // p, width // p)]

    def _text_states(self, bert, bert_mask, t5, t5_mask) -> torch.Tensor:
        """(B, 77, 1024) BERT + refined (B, 256, 2048) mT5 -> (B, 333, 1024), padding -> learned vectors.
        With region prompts, k prompts' BERT and mT5 tokens in turn: (B, 77 k + 256 k, 1024)."""
        text = torch.cat([bert, self.mlp_t5(t5)], dim=1)
        mask = torch.cat([bert_mask, t5_mask], dim=1).bool().unsqueeze(2)
        pad, n_bert = self.text_embedding_padding, self.config.text_len
        prompts = bert.shape[1] // n_bert
        if prompts > 1:
            pad = torch.cat([pad[:n_bert].repeat(prompts, 1), pad[n_bert:].repeat(prompts, 1)])
        return torch.where(mask, text, pad.to(text.dtype))

    def _condition(self, t, t5, image_meta_size, style) -> torch.Tensor:
        """The global condition c (B, D): timestep embedding + MLP(pooled text [, size, style])."""
        cfg = self.config
        if cfg.size_style_cond != (image_meta_size is not None) or cfg.size_style_cond != (style is not None):
            need = "needs" if cfg.size_style_cond else "takes no"
            raise InvalidInputError(f"this Hunyuan-DiT (size/style conditioning: {cfg.size_style_cond}) {need} "
                             "image_meta_size and style; v1.0/1.1 take them, v1.2 does not")
        extra = [self.pooler(t5)]
        if cfg.size_style_cond:
            # Six numbers (original h, w, target w, h, crop top, left), each as 256 sinusoidal features.
            sizes = timestep_embedding(image_meta_size.reshape(-1).float(), 256).view(-1, 6 * 256)
            extra += [sizes.to(extra[0].dtype), self.style_embedder(style)]
        return self.t_embedder(t) + self.extra_embedder(torch.cat(extra, dim=1))


    def embed_inputs(self, x, t, bert, bert_mask, t5, t5_mask, image_meta_size=None, style=None, cos=None,
                     sin=None):
        """-> (image tokens (B, N, D), global condition c (B, D), text states (B, 333, text_dim), RoPE tables)."""
        p = self.config.patch_size
        if cos is None or sin is None:
            cos, sin = self.rope(x.shape[-2] // p, x.shape[-1] // p, x.device)
        text = self._text_states(bert, bert_mask, t5, t5_mask)
        c = self._condition(t, t5[:, :self.config.text_len_t5], image_meta_size, style)
        return self.x_embedder(x), c, text, (cos, sin)


class HunyuanDiT(HunyuanDiTInputs):
    # Region prompts (docs/regions.md): forward(context_bias=...) masks the cross-attention; the text
    # inputs may then hold several prompts' tokens in turn (BERT chunks of text_len, mT5 of text_len_t5).
    region_attention = "cross"

    def __init__(self, config: HunyuanDiTConfig):
        super().__init__(config)
        cfg = config
        self.blocks = nn.ModuleList(HunyuanDiTBlock(cfg, skip=i > cfg.depth // 2) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embedding_mask: torch.Tensor, encoder_hidden_states_t5: torch.Tensor,
                text_embedding_mask_t5: torch.Tensor, image_meta_size: torch.Tensor | None = None,
                style: torch.Tensor | None = None, cos_cis_img: torch.Tensor | None = None,
                sin_cis_img: torch.Tensor | None = None, context_bias: dict | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) on the 1000-step scale -> (B, out_channels, H, W).

        context_bias: {image tokens: (B|1, 1, image tokens, text tokens)} cross-attention bias (region
        prompts, pipeline/region_attention.py); the pooled text is then the first (global) prompt's.
        control: a Hunyuan-DiT ControlNet's residuals (models/hunyuan_dit_controlnet.py), one (B, N, D) per long
        skip: residual i is added to the skip that block i hands to block depth - 1 - i (diffusers'
        ``controlnet_block_samples``, popped in step with the skips)."""
        cfg = self.config
        p = cfg.patch_size
        b, _, height, width = x.shape
        gh, gw = height // p, width // p
        h, c, text, rope = self.embed_inputs(x, t, encoder_hidden_states, text_embedding_mask,
                                             encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size,
                                             style, cos_cis_img, sin_cis_img)
        text_bias = None if context_bias is None else context_bias[gh * gw].to(text)
        skipping = cfg.depth // 2 - 1  # blocks 0 .. depth/2 - 2 feed the long skips
        if control is not None and len(control) != skipping:
            raise InvalidInputError(f"{len(control)} ControlNet residuals for a Hunyuan-DiT with {skipping} long skips "
                                    "(one per skip): the ControlNet was made for another depth")

        # Blocks depth/2 + 1 .. depth - 1 take the skips in reverse.
        skips = []
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if i > cfg.depth // 2 else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, text, rope, skip, text_bias, use_reentrant=False)
            else:
                h = block(h, c, text, rope, skip, text_bias)
            if i < skipping:
                skips.append(h if control is None else h + control[i].to(h.dtype))

        h = self.final_layer(h, c)  # (B, N, p * p * C_out)
        # Unpatchify: token (r, s) holds a p x p patch, channels last.
        out = h.view(b, gh, gw, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.out_channels, gh * p, gw * p)
