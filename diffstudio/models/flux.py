"""The FLUX.1 transformer (Black Forest Labs 2024): a rectified-flow DiT with double-stream
(MMDiT) blocks followed by single-stream (parallel attention + MLP) blocks.

References, to read this file with:
  * BFL's reference code, ``flux/model.py`` and ``flux/modules/layers.py`` (github.com/black-forest-labs/flux);
    the parameter names below are exactly that release's (``double_blocks.N.img_attn.qkv``,
    ``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1`` ...), so ``flux1-dev.safetensors``
    loads with no renaming.
  * Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3, arXiv:2403.03206), sec. 4 and
    fig. 2: the double-stream block (separate weights per modality, one joint attention) and
    QK-normalisation (sec. 5.3.2, RMSNorm on queries and keys).
  * Su et al. 2021, "RoFormer" (arXiv:2104.09864), eq. 34: rotary position embedding. FLUX applies
    it over three position axes (an index, the latent row, the latent column), splitting each head's
    128 dimensions into 16 + 56 + 56.
  * Dehghani et al. 2023, "Scaling Vision Transformers to 22B" (ViT-22B), sec. 2.1: the "parallel
    layers" of the single-stream block (attention and MLP side by side from one fused input matmul).

Shapes (the original forward signature, on *packed* tokens; the family's ``call_denoiser`` packs
each 2x2 patch of the 16-channel latent into one 64-wide token):
    img       (B, N_img, in_channels)       packed latent tokens
    img_ids   (B, N_img, 3) or (N_img, 3)   position ids (0, row, col) per image token
    txt       (B, N_txt, context_in_dim)    T5 hidden states
    txt_ids   (B, N_txt, 3) or (N_txt, 3)   position ids of the text tokens (zeros)
    timesteps (B,) in [0, 1]                flow time; the embedding multiplies by 1000
    y         (B, vec_in_dim)               pooled CLIP-L text embedding
    guidance  (B,)                          distilled guidance scale (dev only)
    -> (B, N_img, out_channels)             velocity, packed like img

Everything is computed in the dtype of ``img`` (the caller's compute dtype); no forward reads a
weight's dtype, so weights may be stored in a lower precision (``diffstudio.models.lowbit``).
Linear layers are ``cpu_linear.Linear`` (an ``nn.Linear`` with a faster fp32 CPU path); the fused
qkv and linear1 matmuls of the release layout are kept fused (one matmul instead of three / four).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffstudio.errors import InvalidInputError
from diffstudio.models.cpu_linear import Linear
from diffstudio.models.layers import attention, timestep_embedding

TIME_EMBED_DIM = 256  # width of the sinusoidal time / guidance embedding (BFL: timestep_embedding(t, 256))
TIME_FACTOR = 1000.0  # t in [0, 1] is embedded as 1000 t
NORM_EPS = 1e-6  # every LayerNorm (no affine) and the QK RMSNorm


@dataclass
class FluxConfig:
    """Constructor arguments of ``FluxTransformer``; the field names are BFL's ``FluxParams``."""

    in_channels: int = 64  # 16 latent channels x 2 x 2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled CLIP-L
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))  # RoPE dims per position axis, sum = head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # FLUX.1-dev (guidance-distilled); schnell has no guidance_in

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- position embedding ---------------------------------------------------------------------------


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotations e^{i pos omega_k} for every token and every pair of head dimensions.

    ids: (B, L, n_axes) positions -> (B, L, 1, head_dim / 2) complex64 (the 1 broadcasts over heads).
    Axis a owns ``axes_dim[a]`` consecutive dims of each head, i.e. ``axes_dim[a] / 2`` pairs, with
    RoFormer's frequencies omega_k = theta^(-2k / axes_dim[a]), k = 0 .. axes_dim[a] / 2 - 1.
    The angles are computed in float64 as in the reference (positions reach thousands, and
    float32 angles would lose the low bits of the slow frequencies).
    """
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., a].to(torch.float64)[..., None] * omega)  # (B, L, dim / 2)
    angle = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64).unsqueeze(2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2k], x[2k+1]) of x (B, L, H, D) by freqs (B, L, 1, D/2) (RoFormer eq. 34).

    As a complex product: (x0 + i x1) e^{i a} = (x0 cos a - x1 sin a) + i (x0 sin a + x1 cos a),
    the rotation the reference writes out with a 2x2 matrix. Computed in float32, returned in x's dtype.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


# -- building blocks ------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (BFL ``MLPEmbedder``: time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """adaLN-Zero parameters from the conditioning vector (Peebles & Xie 2023, DiT sec. 3.2).

    vec (B, hidden) -> ``count`` tensors (B, 1, hidden), in the reference's order: (shift, scale,
    gate) for the attention branch, then (shift, scale, gate) for the MLP branch (double blocks).
    """

    def __init__(self, hidden: int, count: int):
        super().__init__()
        self.count = count
        self.lin = Linear(hidden, count * hidden)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.count, dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned ``scale`` (BFL's name for the weight)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=NORM_EPS)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class SelfAttention(nn.Module):
    """The per-stream projections of a double block: fused qkv, QK-norm, output proj."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // heads)
        self.proj = Linear(hidden, hidden)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, hidden) -> normalised q, k and v, each (B, L, H, D). The qkv weight's rows are
        [q; k; v], each block head-major (``rearrange "B L (K H D) -> K B H L D"`` in the reference)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, -1)
        return self.norm.query_norm(qkv[:, :, 0]), self.norm.key_norm(qkv[:, :, 1]), qkv[:, :, 2]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift, LayerNorm without affine (eps 1e-6), in one fused multiply-add."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), 1 + scale)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v (B, L, H, D) -> RoPE on q and k, softmax attention -> (B, L, H * D).
    bias: additive (B|1, 1, L, L) over [txt; img] (region prompts) or None."""
    b, n, heads, d = q.shape
    q, k = apply_rope(q, freqs), apply_rope(k, freqs)
    return attention(q.reshape(b, n, heads * d), k.reshape(b, n, heads * d), v.reshape(b, n, heads * d), heads,
                     bias)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text tokens keep their own weights (modulation, qkv, MLP) and meet
    in one attention over the concatenated sequence [txt; img] (SD3 paper fig. 2b)."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden, 6))
            self.add_module(f"{stream}_attn", SelfAttention(hidden, heads, qkv_bias))
            self.add_module(f"{stream}_mlp", nn.Sequential(Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                                           Linear(mlp_hidden, hidden)))
        # img_norm1/2, txt_norm1/2 of the reference are LayerNorms without parameters: see modulate().

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, freqs: torch.Tensor,
                bias: torch.Tensor | None = None, ip: list | None = None):
        """ip: this block's IP-Adapter entries [(keys, values, scale)] (models/flux_ipadapter.py), or None / []."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        n_txt = txt.shape[1]
        out = joint_attention(torch.cat((txt_q, img_q), 1), torch.cat((txt_k, img_k), 1),
                              torch.cat((txt_v, img_v), 1), freqs, bias)  # (B, N_txt + N_img, hidden)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]

        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_out))
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        if ip:
            img = img + image_attention(img_q, ip)
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_out))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


def image_attention(q: torch.Tensor, ip: list[tuple]) -> torch.Tensor:
    """IP-Adapter image attention (XLabs' FLUX layout): the image stream's queries q (B, L, H, D), QK-normed and
    without RoPE, attend to each entry's image keys and values (B, N, H * D); the outputs, times their scales,
    are summed -> (B, L, H * D)."""
    b, n, heads, d = q.shape
    q = q.reshape(b, n, heads * d)
    out = None
    for keys, values, scale in ip:
        term = scale * attention(q, keys.to(q.dtype), values.to(q.dtype), heads)
        out = term if out is None else out + term
    return out


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence (ViT-22B sec. 2.1, as in BFL's release):

        x_mod = (1 + scale) LN(x) + shift
        [qkv, h] = linear1(x_mod)                    one matmul, widths (3 hidden, mlp_hidden)
        x + gate * linear2([attention(qkv), GELU(h)])  one matmul over the concatenation
    """

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.linear1 = Linear(hidden, 3 * hidden + mlp_hidden)
        self.linear2 = Linear(hidden + mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.modulation = Modulation(hidden, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, freqs: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        b, n, _ = x.shape
        fused = self.linear1(modulate(x, shift, scale))  # (B, L, 3 hidden + mlp_hidden)
        qkv = fused[..., : 3 * self.hidden].view(b, n, 3, self.heads, -1)
        q, k = self.norm.query_norm(qkv[:, :, 0]), self.norm.key_norm(qkv[:, :, 1])
        attn = joint_attention(q, k, qkv[:, :, 2], freqs, bias)
        mlp = F.gelu(fused[..., 3 * self.hidden:], approximate="tanh")
        return torch.addcmul(x, gate, self.linear2(torch.cat((attn, mlp), dim=-1)))


class LastLayer(nn.Module):
    """Final adaLN (shift, scale from vec; BFL order) and the linear map to packed output channels."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


# -- the model ------------------------------------------------------------------------------------


class FluxTrunk(nn.Module):
    """What the transformer and its ControlNets share (models/flux_controlnet.py): the input embedders, the
    double-stream and single-stream block stacks, the conditioning vector and the rotary frequencies."""

    kind = "model"  # how errors name this network

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        h = c.hidden_size
        self.img_in = Linear(c.in_channels, h)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, h)
        self.vector_in = MLPEmbedder(c.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, h) if c.guidance_embed else None
        self.txt_in = Linear(c.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, c.num_heads, c.mlp_hidden, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, c.num_heads, c.mlp_hidden) for _ in range(c.depth_single_blocks))
        self.gradient_checkpointing = False  # recompute each block in the backward pass (training)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def conditioning_vector(self, timesteps: torch.Tensor, y: torch.Tensor, guidance, img: torch.Tensor):
        """embed(t) [+ embed(guidance)] + MLP(pooled text): (B, hidden), in img's dtype and on its device."""
        dtype = img.dtype
        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR, TIME_EMBED_DIM).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise InvalidInputError(f"this FLUX {self.kind} is guidance-distilled (made for dev): pass "
                                        "guidance= (e.g. 3.5), the distilled guidance scale it embeds")
            guidance = torch.as_tensor(guidance, device=img.device).reshape(-1).expand(img.shape[0])
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, TIME_EMBED_DIM).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor, device) -> torch.Tensor:
        """The rotations of the joint sequence [txt; img] (text first)."""
        return rope_frequencies(_joint_ids(txt_ids, img_ids, device), self.config.axes_dim, self.config.theta)


class FluxTransformer(FluxTrunk):
    """FLUX.1 dev / schnell (``config.guidance_embed`` tells them apart). See the module docstring."""

    lowbit_storage = True  # computes in its input's dtype: float8 weights may stay float8 (models/lowbit.py)
    region_attention = "joint"  # region prompts (docs/regions.md): forward(joint_bias=...) masks [txt; img]

    def __init__(self, config: FluxConfig | None = None):
        super().__init__(config or FluxConfig())
        self.final_layer = LastLayer(self.config.hidden_size, self.config.out_channels)

    def region_token_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The packed token grid of a height x width latent (2x2 patches; an odd side is padded)."""
        return [((height + 1) // 2, (width + 1) // 2)]

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                joint_bias: torch.Tensor | None = None, control: dict | None = None,
                ip: list | None = None) -> torch.Tensor:
        """joint_bias: additive attention bias (B|1, 1, N_txt + N_img, N_txt + N_img) over [txt; img], used by
        every block (region prompts, pipeline/region_attention.py).
        control: ControlNet residuals {"double": [...], "single": [...]}, each (B, N_img, hidden), added to the
        image tokens after the blocks (``control_residual``: a shorter list spreads over the blocks).
        ip: the IP-Adapter hook (models/flux_ipadapter.py): one list of (keys, values, scale) per double block,
        read by that block's image stream; None (or empty lists) costs nothing."""
        dtype = img.dtype
        vec = self.conditioning_vector(timesteps, y, guidance, img)  # (B, hidden)
        img = self.img_in(img)
        txt = self.txt_in(txt.to(dtype))
        if joint_bias is not None:
            joint_bias = joint_bias.to(device=img.device, dtype=dtype)
        freqs = self.rope(txt_ids, img_ids, img.device)
        double, single = (control or {}).get("double"), (control or {}).get("single")
        if ip is not None and len(ip) != len(self.double_blocks):
            raise InvalidInputError(f"the IP-Adapter hook has {len(ip)} entries; this FLUX {self.kind} has "
                                    f"{len(self.double_blocks)} double blocks")

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, img, txt, vec, freqs, joint_bias, ip[i] if ip else None)
            if double:
                img = img + control_residual(double, i, len(self.double_blocks))
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, x, vec, freqs, joint_bias)
            if single:  # the image part of the joint sequence only
                x = torch.cat((x[:, :n_txt], x[:, n_txt:] + control_residual(single, i, len(self.single_blocks))), 1)
        return self.final_layer(x[:, n_txt:], vec)


def control_residual(samples: list[torch.Tensor], index: int, blocks: int) -> torch.Tensor:
    """The ControlNet residual for block ``index`` of ``blocks``: a ControlNet with fewer blocks than the
    transformer has (InstantX: 5 of 19 double, 10 of 38 single) gives each of its residuals to
    ceil(blocks / len(samples)) consecutive blocks (InstantX's and diffusers' rule)."""
    interval = -(-blocks // len(samples))
    return samples[index // interval]


def _joint_ids(txt_ids: torch.Tensor, img_ids: torch.Tensor, device) -> torch.Tensor:
    """[txt_ids; img_ids] as (B or 1, N_txt + N_img, n_axes). Either may come without the batch axis
    (diffusers passes (L, 3)), or with batch 1 against the other's B."""
    txt_ids, img_ids = (i.to(device) if i.ndim == 3 else i.to(device)[None] for i in (txt_ids, img_ids))
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    return torch.cat((txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)), dim=1)


# -- packing: latents (B, C, H, W) <-> tokens (B, H/2 * W/2, 4C) ------------------------------------


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Each 2x2 latent patch becomes one token, channels ordered (c, dy, dx) (the reference's
    ``rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)"``); tokens run row by row. H, W even."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def pad_even(x: torch.Tensor) -> torch.Tensor:
    """A latent (B, C, H, W) with an odd side padded circularly by one row / column, so that it packs into
    2x2 patches (as ComfyUI does); even sides pass unchanged."""
    pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, packed = tokens.shape
    h, w = height // 2, width // 2
    return tokens.reshape(b, h, w, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, packed // 4, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """Position ids (0, row, col) of the packed tokens of a (H, W) latent: (H/2 * W/2, 3) float."""
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat((torch.zeros_like(grid[:, :1]), grid), dim=1)
