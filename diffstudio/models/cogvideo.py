"""CogVideoX: the expert transformer of the CogVideoX text-to-video models (2B, 5B, 5B-I2V, 1.5).

Reference: Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer"
(arXiv:2408.06072), sec. 2.2 and figure 3.

* **Patching** (sec. 2.2, "Patchify"): the 3D VAE's latents (B, F, C, H, W) become tokens of p x p
  spatial patches, frame by frame (a 2D convolution with stride p); CogVideoX 1.5 also groups p_t
  latent frames into one token (a linear map over (p_t, p, p, C) patches). Text tokens (T5-XXL, 226 of
  them) are projected to the same width and put *in front of* the video tokens: one sequence.
* **Positions**: the 2B model adds a fixed 3D sinusoidal embedding to the video tokens (a quarter of the
  width for time, three eighths each for x and y); 5B and 1.5 rotate q and k of the video tokens with a
  3D RoPE instead (sec. 2.2, "3D-RoPE": a quarter of each head for time, three eighths each for y and x).
  The 5B-I2V model also stores a learned position table (``patch_embed.pos_embedding``).
* **Expert adaptive LayerNorm** (sec. 2.2, "Expert Transformer Block"): one LayerNorm, but the shift,
  scale and gate that modulate it come from the timestep embedding through *separate* rows of one linear
  map for the video tokens and for the text tokens (6 vectors per branch: video shift/scale/gate, text
  shift/scale/gate).
* **3D full attention** over [text; video] (sec. 2.2, "3D Full Attention"), q and k LayerNorm'd per head
  (QK-norm); the MLP is shared by both modalities and runs over the joint sequence.

Parameter names are diffusers' ``CogVideoXTransformer3DModel`` names (the layout the released folders and
the ExVideo LoRA use), so a released ``transformer/`` loads with zero renaming.

Shapes: x (B, F, C, H, W) latents (frame axis before channels, as the release), F latent frames
(4k + 1 video frames -> k + 1 latent frames); context (B, L, text_embed_dim) with L = max_text_seq_length
for the 2B sinusoidal model (its position table has exactly that many text slots); t (B,) training
timesteps in [0, 1000).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.models.cpu_linear import Linear
from diffstudio.models.layers import timestep_embedding


@dataclass
class CogVideoConfig:
    """Constructor arguments, in diffusers' ``CogVideoXTransformer3DModel`` config names.

    Released: 2B = 30 heads x 64, 30 layers, sinusoidal positions; 5B = 48 heads x 64, 42 layers, 3D RoPE;
    5B-I2V = 5B with 32 input channels (noise + image latents) and a learned position table;
    1.5 = 5B with p_t = 2 temporal patches (a linear patch map).
    """

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5 I2V: an extra embedded scalar ("ofs") added to the time embedding
    text_embed_dim: int = 4096
    num_layers: int = 30
    attention_bias: bool = True
    sample_width: int = 90  # latent size the release was trained at (positions are laid out against it)
    sample_height: int = 60
    sample_frames: int = 49  # in video frames (49 -> 13 latent frames)
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True  # bias of the 1.0 models' patch convolution

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX with a learned position table and no RoPE has never been released")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CogVideoConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- positions -------------------------------------------------------------------------------------


def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Transformer sinusoids of positions pos (N,) -> (N, dim): [sin(pos w_k), cos(pos w_k)],
    w_k = 10000^(-k / (dim / 2)) (Vaswani et al. 2017, sec. 3.5), computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angle = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat((angle.sin(), angle.cos()), dim=1)


def sincos_positions_3d(dim: int, frames: int, height: int, width: int, spatial_scale: float,
                        temporal_scale: float) -> torch.Tensor:
    """The 2B model's fixed 3D sinusoidal embedding of a (frames, height, width) token grid -> (F*H*W, dim),
    tokens frame-major then row-major. Channels: [time (dim/4) | x (3dim/8) | y (3dim/8)]; positions are
    divided by the interpolation scales (1.875 spatially: the 720x480 release saw a denser grid than the
    model it was initialised from)."""
    if dim % 16:
        raise InvalidSizeError(f"the sinusoidal position embedding needs a width divisible by 16, got {dim}")
    spatial, temporal = 3 * dim // 4, dim // 4
    ys = torch.arange(height, dtype=torch.float32) / spatial_scale
    xs = torch.arange(width, dtype=torch.float32) / spatial_scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    space = torch.cat((_sincos(spatial // 2, grid_x.reshape(-1)), _sincos(spatial // 2, grid_y.reshape(-1))), dim=1)
    time = _sincos(temporal, torch.arange(frames, dtype=torch.float32) / temporal_scale)  # (F, dim/4)
    hw = height * width
    out = torch.cat((time[:, None].expand(frames, hw, temporal), space[None].expand(frames, hw, spatial)), dim=-1)
    return out.reshape(frames * hw, dim).float()


def _axis_angles(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoFormer angles pos * theta^(-2k/dim), k < dim/2, for one axis: (N,) -> (N, dim/2), float32 as in
    the reference implementation (so the rotation matches it to the last bit at every length)."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.outer(pos.float(), omega)


def rope_grid(frames: int, height: int, width: int, config: CogVideoConfig) -> tuple[torch.Tensor, ...]:
    """Positions (t, y, x) of the video tokens along each axis, as the release lays them out.

    CogVideoX 1.0 (5B) fits the token grid into the training grid (sample_height/p x sample_width/p) keeping
    its aspect ratio, centred ("resize-crop"), the region [start, stop) of each axis; the n tokens of an axis
    then sit evenly from start to stop (n - 1) / n (the release's spacing: exact for start = 0, where it is
    stop i / n). At the training size that is 0, 1, ..., n - 1; frames are 0 .. F - 1 the same way.
    CogVideoX 1.5 ("slice") uses integer positions 0 .. n - 1 on every axis.
    """
    p = config.patch_size
    if config.patch_size_t is not None:
        return tuple(torch.arange(n, dtype=torch.float32) for n in (frames, height, width))
    base_h, base_w = config.sample_height // p, config.sample_width // p
    # Fit (height, width) into (base_h, base_w): the side that is relatively longer fills its base side.
    if height / width > base_h / base_w:
        fit_h, fit_w = base_h, int(round(base_h / height * width))
    else:
        fit_w, fit_h = base_w, int(round(base_w / width * height))
    top, left = int(round((base_h - fit_h) / 2.0)), int(round((base_w - fit_w) / 2.0))
    ys = torch.linspace(top, (top + fit_h) * (height - 1) / height, height, dtype=torch.float32)
    xs = torch.linspace(left, (left + fit_w) * (width - 1) / width, width, dtype=torch.float32)
    t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    return t, ys, xs


def rope_3d(frames: int, height: int, width: int, config: CogVideoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (F*H*W, head_dim): the 3D RoPE rotation of every video token, frame-major then
    row-major. Each head is split [time (d/4) | y (3d/8) | x (3d/8)]; within an axis, channel pairs
    (2k, 2k+1) rotate together by angle pos * theta^(-2k / d_axis) (cos and sin repeated per pair)."""
    d = config.attention_head_dim
    dims = (d // 4, d // 8 * 3, d // 8 * 3)
    t, ys, xs = rope_grid(frames, height, width, config)
    a_t, a_y, a_x = (_axis_angles(dim, pos) for dim, pos in zip(dims, (t, ys, xs), strict=True))
    angles = torch.cat((a_t[:, None, None].expand(-1, height, width, -1),
                        a_y[None, :, None].expand(frames, -1, width, -1),
                        a_x[None, None].expand(frames, height, -1, -1)), dim=-1).reshape(frames * height * width, -1)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[2k], x[2k+1]) of x (B, H, N, D) by the angles behind (cos, sin) (N, D):
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) (RoFormer eq. 34). Computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# -- blocks ------------------------------------------------------------------------------------------


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 on sinusoidal features (diffusers' ``TimestepEmbedding`` names)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, out_dim)
        self.linear_2 = Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """Text projection + video patching (+ the 2B model's sinusoidal / the I2V model's learned positions)."""

    def __init__(self, c: CogVideoConfig):
        super().__init__()
        self.config = c
        p, inner = c.patch_size, c.inner_dim
        if c.patch_size_t is None:
            self.proj = nn.Conv2d(c.in_channels, inner, kernel_size=p, stride=p, bias=c.patch_bias)
        else:  # 1.5: one token per (p_t, p, p) block, channels ordered (C, p_t, p, p); always with a bias
            self.proj = Linear(c.in_channels * p * p * c.patch_size_t, inner)
        self.text_proj = Linear(c.text_embed_dim, inner)
        if c.use_learned_positional_embeddings:
            frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
            n = frames * (c.sample_height // p) * (c.sample_width // p)
            self.register_buffer("pos_embedding", torch.zeros(1, c.max_text_seq_length + n, inner))
        self._sincos_cache: dict = {}

    def video_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, F, C, H, W) -> tokens (B, F' * H/p * W/p, inner) and the token grid (F', H/p, W/p)."""
        c = self.config
        b, f, ch, h, w = x.shape
        p = c.patch_size
        if c.patch_size_t is None:
            tokens = self.proj(x.reshape(b * f, ch, h, w))  # (B*F, inner, H/p, W/p)
            tokens = tokens.flatten(2).transpose(1, 2).reshape(b, -1, tokens.shape[1])
            return tokens, (f, h // p, w // p)
        pt = c.patch_size_t
        # (B, F/pt, pt, C, H/p, p, W/p, p) -> tokens in (frame, row, col) order, channels (C, pt, p, p)
        blocks = x.reshape(b, f // pt, pt, ch, h // p, p, w // p, p).permute(0, 1, 4, 6, 3, 2, 5, 7)
        return self.proj(blocks.flatten(4).flatten(1, 3)), (f // pt, h // p, w // p)

    def positions(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        """The additive positions of [text; video] tokens (L + N, inner), or None for RoPE-only models.
        The text slots are zeros except in a learned table."""
        c = self.config
        f, h, w = grid
        if c.use_learned_positional_embeddings:
            if (h * c.patch_size, w * c.patch_size) != (c.sample_height, c.sample_width):
                raise InvalidSizeError(f"this CogVideoX model (5B-I2V) has a learned position table for "
                                       f"{c.sample_width * 8}x{c.sample_height * 8} videos only")
            if (f - 1) * c.temporal_compression_ratio + 1 == c.sample_frames:
                return self.pos_embedding[0].to(like.dtype)
        elif c.use_rotary_positional_embeddings:
            return None
        # The released code falls back to the sinusoids for other frame counts, learned table or not.
        key = (grid, like.device)
        if key not in self._sincos_cache:
            video = sincos_positions_3d(c.inner_dim, f, h, w, c.spatial_interpolation_scale,
                                        c.temporal_interpolation_scale)
            table = torch.cat((video.new_zeros(c.max_text_seq_length, c.inner_dim), video))
            self._sincos_cache = {key: table.to(like.device)}
        return self._sincos_cache[key].to(like.dtype)


class ExpertAdaLN(nn.Module):
    """One LayerNorm, modulated separately for video and text tokens (CogVideoX's expert adaptive LayerNorm).

    temb (B, D_t) -> 6 vectors (video shift, scale, gate, text shift, scale, gate), each (B, 1, inner);
    returns (1 + scale) LN(x) + shift per modality and the two gates."""

    def __init__(self, time_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = Linear(time_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        video = torch.addcmul(shift, self.norm(video), 1 + scale)
        text = torch.addcmul(t_shift, self.norm(text), 1 + t_scale)
        return video, text, gate, t_gate


class Attention(nn.Module):
    """Full self-attention over [text; video] with per-head QK LayerNorm and RoPE on the video tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_q = Linear(dim, heads * head_dim, bias=bias)
        self.to_k = Linear(dim, heads * head_dim, bias=bias)
        self.to_v = Linear(dim, heads * head_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(heads * head_dim, dim)])

    def forward(self, x: torch.Tensor, n_text: int, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)  # (B, heads, N, head_dim)
        if rope is not None:  # text tokens keep their place; only the video tokens rotate
            q = torch.cat((q[:, :, :n_text], apply_rope(q[:, :, n_text:], *rope)), dim=2)
            k = torch.cat((k[:, :, :n_text], apply_rope(k[:, :, n_text:], *rope)), dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GeluProj(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers' ``GELU`` module: the weight lives in ``proj``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), Linear(hidden, dim)])  # [1]: dropout slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    """Expert transformer block: expert adaLN -> joint attention -> gated residuals; expert adaLN -> one MLP
    over the joint sequence -> gated residuals (gates per modality)."""

    def __init__(self, c: CogVideoConfig):
        super().__init__()
        dim = c.inner_dim
        self.norm1 = ExpertAdaLN(c.time_embed_dim, dim, c.norm_eps)
        self.attn1 = Attention(dim, c.num_attention_heads, c.attention_head_dim, c.attention_bias)
        self.norm2 = ExpertAdaLN(c.time_embed_dim, dim, c.norm_eps)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rope):
        n_text = text.shape[1]
        norm_video, norm_text, gate, t_gate = self.norm1(video, text, temb)
        out = self.attn1(torch.cat((norm_text, norm_video), dim=1), n_text, rope)
        video = torch.addcmul(video, gate, out[:, n_text:])
        text = torch.addcmul(text, t_gate, out[:, :n_text])
        norm_video, norm_text, gate, t_gate = self.norm2(video, text, temb)
        out = self.ff(torch.cat((norm_text, norm_video), dim=1))
        return torch.addcmul(video, gate, out[:, n_text:]), torch.addcmul(text, t_gate, out[:, :n_text])


class FinalAdaLN(nn.Module):
    """(1 + scale) LN(x) + shift with (shift, scale) from the time embedding, in that order."""

    def __init__(self, time_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = Linear(time_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


# -- the model ---------------------------------------------------------------------------------------


class CogVideoTransformer(nn.Module):
    """``forward(x (B, F, C, H, W), context (B, L, text_dim), t (B,), ofs=None) -> (B, F, C_out, H, W)``:
    the v-prediction of the release. Positions (sinusoids or 3D RoPE) are computed from the input's shape."""

    lowbit_storage = True  # computes in its input's dtype: float8 Linear weights may stay float8

    def __init__(self, config: CogVideoConfig | None = None):
        super().__init__()
        self.config = c = config or CogVideoConfig()
        inner = c.inner_dim
        self.patch_embed = PatchEmbed(c)
        self.time_embedding = TimestepMLP(inner, c.time_embed_dim)
        self.ofs_embedding = TimestepMLP(c.ofs_embed_dim, c.ofs_embed_dim) if c.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm_final = nn.LayerNorm(inner, eps=c.norm_eps)
        self.norm_out = FinalAdaLN(c.time_embed_dim, inner, c.norm_eps)
        pt = c.patch_size_t or 1
        self.proj_out = Linear(inner, c.patch_size * c.patch_size * pt * c.out_channels)
        self.gradient_checkpointing = False
        self._rope_cache: dict = {}

    def check_size(self, frames: int, height: int, width: int) -> None:
        c = self.config
        if height % c.patch_size or width % c.patch_size:
            raise InvalidSizeError(f"latent height and width must be multiples of {c.patch_size} (video sides of "
                                   f"multiples of {8 * c.patch_size}), got {height}x{width}")
        if c.patch_size_t and frames % c.patch_size_t:
            raise InvalidSizeError(f"CogVideoX 1.5 takes latent frame counts that are multiples of {c.patch_size_t}"
                                   f", got {frames}")

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.config.use_rotary_positional_embeddings:
            return None
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache = {key: tuple(r.to(device) for r in rope_3d(*grid, self.config))}
        return self._rope_cache[key]

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                ofs: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        b, frames, _, height, width = x.shape
        self.check_size(frames, height, width)
        dtype = x.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(t, c.inner_dim).to(dtype))
        if self.ofs_embedding is not None:
            if ofs is None:
                raise InvalidInputError("this CogVideoX 1.5 image-to-video model needs ofs= (the release passes 2.0)")
            ofs = torch.as_tensor(ofs, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
            temb = temb + self.ofs_embedding(timestep_embedding(ofs, c.ofs_embed_dim).to(dtype))

        text = self.patch_embed.text_proj(context.to(dtype))
        video, grid = self.patch_embed.video_tokens(x)
        positions = self.patch_embed.positions(grid, video)
        if positions is not None:  # a table of [text; video] slots: the text must fill its slots exactly
            if text.shape[1] != c.max_text_seq_length:
                raise InvalidInputError(f"this CogVideoX model (additive positions) takes exactly "
                                        f"{c.max_text_seq_length} text tokens, got {text.shape[1]}")
            text, video = text + positions[:c.max_text_seq_length], video + positions[c.max_text_seq_length:]
        rope = self.rope(grid, x.device)
        for block in self.transformer_blocks:
            video, text = self._run(block, video, text, temb, rope)
        out = self.proj_out(self.norm_out(self.norm_final(video), temb))  # (B, N, p*p*[pt]*C_out)
        return self._unpatchify(out, grid)

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        c = self.config
        f, h, w = grid
        p, b = c.patch_size, tokens.shape[0]
        if c.patch_size_t is None:  # token channels ordered (C, p, p)
            out = tokens.reshape(b, f, h, w, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6)
            return out.reshape(b, f, -1, h * p, w * p)
        pt = c.patch_size_t  # token channels ordered (C, pt, p, p)
        out = tokens.reshape(b, f, h, w, -1, pt, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return out.reshape(b, f * pt, -1, h * p, w * p)

