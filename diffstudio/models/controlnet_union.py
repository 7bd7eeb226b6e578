"""The condition path of the SDXL ControlNet-Union (xinsir's controlnet-union-sdxl-1.0 and its ProMax variant).

References: xinsir's model cards ("controlnet-union-sdxl-1.0", "...-promax", Hugging Face Hub, 2024) and diffusers'
``ControlNetUnionModel`` (``diffusers/models/controlnets/controlnet_union.py``): the layer names, the formulas and
the mode table below are theirs.

A union ControlNet is an ordinary ControlNet (`ControlNetModel`: the UNet encoder copy, the hint encoder, the zero
convolutions) with one extra path that says *what kind* of control image it is given and lets several control
images share the network. For control images ``c_1 .. c_K`` with types ``k_1 .. k_K`` and scales ``s_i``:

    emb   = time_embed(t) + control_add_embedding(sinusoid(onehot(k_1..k_K)))  + label_emb(y)
            the one-hot (B, types) is embedded value by value like SDXL's size ids (width `control_type_dim`,
            cos first), flattened to (B, types * dim) and mapped by two Linears with SiLU to the time width
    g_i   = input_hint_block(c_i)                                         (B, mc, H, W), the shared hint encoder
    h0    = input_blocks[0](x)                                            (B, mc, H, W), conv_in
    z_i   = mean_HW(g_i) + task_embedding[k_i]     (times s_i when K > 1) (B, mc), one token per control image
    z_K+1 = mean_HW(h0)                                                   the latent's own token
    Z     = transformer_layes(z_1 .. z_K+1)                               (B, K+1, mc), pre-LN blocks with QuickGELU
    h     = h0 + sum_i s'_i (g_i + spatial_ch_projs(Z_i))                 s'_i = s_i when K > 1, else 1

and the encoder runs on ``h`` as in a plain ControlNet. With one control image the unit's scale multiplies the
residuals (as for any ControlNet); with several it weighs each image inside (above) and the residuals are left
as they come, which is diffusers' rule.

The condition transformer is called as the released code calls ``torch.nn.MultiheadAttention`` (not batch-first,
on a (B, K+1, mc) tensor): attention runs along the *first* axis, so each token position attends over the rows of
the batch, not over the other tokens. diffstudio keeps that, since it is what the weights were made with and what
diffusers computes; ComfyUI attends over the tokens instead, so the two differ slightly whenever a batch holds
several rows (CFG's conditional and unconditional rows, several images).

Parameter names are the release's (diffusers' ``ControlNetUnionModel`` names, which every published union file
uses): ``task_embedding``, ``transformer_layes.N.{attn.in_proj_weight, ln_1, mlp.c_fc ...}`` (sic),
``spatial_ch_projs``, ``control_add_embedding.linear_{1,2}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffstudio.errors import InvalidInputError
from diffstudio.models.layers import timestep_embedding

# xinsir's control types, by index (the controlnet-union-sdxl-1.0 model card; the ProMax card adds 6 and 7).
# Several annotators share a type: the names after the first are aliases of its index.
UNION_TYPES = (
    ("openpose",),
    ("depth",),
    ("hed", "pidi", "scribble", "ted", "softedge"),
    ("canny", "lineart", "anime_lineart", "mlsd"),
    ("normal",),
    ("segment",),
    ("tile",),                                  # ProMax
    ("repaint", "inpaint", "outpaint"),         # ProMax
)
UNION_MODES = {name: index for index, names in enumerate(UNION_TYPES) for name in names}


def mode_names(types: int) -> str:
    """The modes of a union ControlNet with ``types`` control types, for messages: 'openpose 0, depth 1, ...'."""
    return ", ".join(f"{'/'.join(names)} {i}" for i, names in enumerate(UNION_TYPES[:types]))


def union_mode_index(mode: int | str | None, types: int) -> int:
    """A mode (a name of `UNION_MODES` or an index) as a row of the task embedding of a ``types``-type union model."""
    if mode is None:
        raise InvalidInputError(f"this is a ControlNet-Union ({types} control types): say what its control image is "
                                f"with mode=, e.g. ControlNetUnit(union, image, mode='canny'); its modes: "
                                f"{mode_names(types)} (or an index)")
    if isinstance(mode, str):
        if mode not in UNION_MODES:
            raise InvalidInputError(f"unknown ControlNet-Union mode {mode!r}; this model's modes: {mode_names(types)} "
                                    "(or an index)")
        index = UNION_MODES[mode]
    else:
        index = int(mode)
    if not 0 <= index < types:
        extra = " (tile and repaint need the ProMax model, 8 types)" if index in (6, 7) else ""
        raise InvalidInputError(f"ControlNet-Union mode {mode!r} (index {index}) is out of range: this model has "
                                f"{types} control types, {mode_names(types)}{extra}")
    return index


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's GELU approximation, which the condition transformer's MLP uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConditionMlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ConditionBlock(nn.Module):
    """One pre-LN transformer block of the condition transformer: x + attn(ln_1 x), then x + mlp(ln_2 x).
    Attention runs along the first axis of its (B, N, C) input (see the module docstring)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first: (B, N, C) reads as (sequence B, batch N)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = ConditionMlp(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln_1(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ControlTypeEmbedding(nn.Module):
    """The one-hot of the control types in use -> an addition to the time embedding (B, emb_dim)."""

    def __init__(self, types: int, dim: int, emb_dim: int):
        super().__init__()
        self.types, self.dim = types, dim
        self.linear_1 = nn.Linear(types * dim, emb_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, indices: Sequence[int], batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        onehot = torch.zeros(self.types, device=device)
        onehot[list(indices)] = 1.0
        # each of the `types` values embedded like a timestep (cos first), then flattened: (types * dim,)
        embedded = timestep_embedding(onehot, self.dim).reshape(1, -1).to(dtype)
        return self.linear_2(self.act(self.linear_1(embedded))).expand(batch, -1)


def add_union_layers(net: nn.Module, types: int, heads: int, layers: int, type_dim: int) -> None:
    """The union's own layers on ``net`` (a `ControlNetModel`); their width is the UNet's base width."""
    width = net.config.model_channels
    net.task_embedding = nn.Parameter(width ** 0.5 * torch.randn(types, width))
    net.transformer_layes = nn.ModuleList(ConditionBlock(width, heads) for _ in range(layers))
    net.spatial_ch_projs = nn.Linear(width, width)
    nn.init.zeros_(net.spatial_ch_projs.weight)
    nn.init.zeros_(net.spatial_ch_projs.bias)
    net.control_add_embedding = ControlTypeEmbedding(types, type_dim, width * 4)


def fuse_conditions(net: nn.Module, h0: torch.Tensor, guides: list[torch.Tensor], indices: Sequence[int],
                    scales: Sequence[float]) -> torch.Tensor:
    """conv_in's output h0 (B, mc, H, W) plus the fused control features (the module docstring's ``h``).
    ``guides``: the hint encoder's output per control image, ``indices`` their types, ``scales`` their weights
    (used only when there are several)."""
    weights = [1.0] * len(guides) if len(guides) == 1 else [float(s) for s in scales]
    tokens = [(g.mean(dim=(2, 3)) + net.task_embedding[i].to(g.dtype)) * w
              for g, i, w in zip(guides, indices, weights)]
    tokens.append(h0.mean(dim=(2, 3)))
    z = torch.stack(tokens, dim=1)                                                        # (B, K+1, mc)
    for block in net.transformer_layes:
        z = block(z)
    fused = h0
    for k, (g, w) in enumerate(zip(guides, weights)):
        alpha = net.spatial_ch_projs(z[:, k])[:, :, None, None]                           # (B, mc, 1, 1)
        fused = fused + (g + alpha) * w
    return fused
