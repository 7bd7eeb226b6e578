"""IP-Adapter: image prompts for the LDM UNet through decoupled cross-attention.

Reference: Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models" (arXiv:2308.06721). A CLIP image encoder's features are projected to a few "image tokens" of the
UNet's text width (section 3.2.1); every cross-attention layer gets its own key and value projections of
those tokens, and adds a second attention over them to the text attention (eq. 5):

    out = Attention(q, K_text, V_text) + scale * Attention(q, K_image, V_image)

The UNet's own weights are untouched: the image tokens reach its layers through its ``ip`` hook
(models/unet.py), so an adapter is never merged and a run without one is the base model exactly.

Projections (``image_proj``), as released:

* ``linear`` (ip-adapter_sd15, ip-adapter_sdxl, ..._vit-h): CLIP's projected ``image_embeds`` (B, E) ->
  Linear -> (B, tokens, D) -> LayerNorm. Keys ``proj.weight/bias``, ``norm.weight/bias``.
* ``resampler`` (the "plus" adapters): a Perceiver resampler (Jaegle et al. 2021; the Flamingo resampler of
  Alayrac et al. 2022): learned ``latents`` attend to the encoder's penultimate hidden states (B, 257, E).
  Keys ``latents``, ``proj_in``, ``layers.N.0`` (attention: ``norm1``, ``norm2``, ``to_q``, ``to_kv``,
  ``to_out``), ``layers.N.1`` (feed-forward: LayerNorm, Linear, GELU, Linear), ``proj_out``, ``norm_out``.
* ``mlp`` (ip-adapter-full-face): every penultimate hidden state through Linear-GELU-Linear-LayerNorm.

Per-layer projections: ``ip_adapter.{2i+1}.to_k_ip.weight`` / ``to_v_ip.weight`` for the i-th cross-attention
layer in diffusers' attention-processor order (``UNetModel.cross_attention_layers``): the released files
number every attention processor, self-attention (even, without weights) and cross-attention (odd) alike.
Parameter names here are those keys, so a file loads with zero renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from diffstudio.models.layers import attention

PROJECTIONS = ("linear", "resampler", "mlp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the input normalisation of every IP-Adapter image encoder
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class IPAdapterConfig:
    """Constructor arguments of `IPAdapter`.

    image_dim: width of the image features the projection reads: CLIP's ``image_embeds`` (``linear``) or its
    hidden states (``resampler``, ``mlp``). context_dim: width of the image tokens (the UNet's text width).
    num_tokens: image tokens per image (``mlp``: 0, one token per hidden state). layer_widths: the width of each
    cross-attention layer the adapter feeds, in ``UNetModel.cross_attention_layers`` order.
    """

    projection: str = "linear"
    image_dim: int = 1024
    context_dim: int = 768
    num_tokens: int = 4
    layer_widths: list[int] = field(default_factory=list)
    resampler_dim: int = 0  # the resampler's own width (its latents')
    resampler_depth: int = 0
    resampler_heads: int = 0
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"IPAdapterConfig: projection {self.projection!r} is not one of {PROJECTIONS}")
        self.layer_widths = [int(w) for w in self.layer_widths]

    @property
    def image_features(self) -> str:
        """Which encoder output the projection reads: "image_embeds" or "penultimate" (hidden states)."""
        return "image_embeds" if self.projection == "linear" else "penultimate"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IPAdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"IPAdapterConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class LinearProjection(nn.Module):
    """(B, E) image embedding -> (B, tokens, D): one linear map split into tokens, each layer-normed."""

    def __init__(self, image_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Linear(image_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.context_dim))


class MLPProjection(nn.Module):
    """(B, T, E) hidden states -> (B, T, D): Linear-GELU-Linear-LayerNorm on every token."""

    def __init__(self, image_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """The latents' queries attend to the image features and the latents together (keys/values from both)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # the image features
        self.norm2 = nn.LayerNorm(dim)  # the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)                                               # (B, queries, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)   # (B, T + queries, inner) each
        return self.to_out(attention(q, k, v, self.heads))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """(B, T, E) hidden states -> (B, queries, D): learned latents refined by `depth` (attention, feed-forward)
    residual layers over the projected features, then projected to the text width and layer-normed."""

    def __init__(self, c: IPAdapterConfig):
        super().__init__()
        dim = c.resampler_dim
        self.latents = nn.Parameter(torch.randn(1, c.num_tokens, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(c.image_dim, dim)
        self.proj_out = nn.Linear(dim, c.context_dim)
        self.norm_out = nn.LayerNorm(c.context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, c.resampler_heads, c.resampler_dim_head),
                           _feed_forward(dim, c.resampler_ff_mult)]) for _ in range(c.resampler_depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden)                                             # (B, T, dim)
        latents = self.latents.expand(hidden.shape[0], -1, -1)               # (B, queries, dim)
        for attend, feed_forward in self.layers:
            latents = attend(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageKeyValues(nn.Module):
    """One cross-attention layer's projections of the image tokens: (B, N, D) -> keys, values (B, N, width)."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k_ip(tokens), self.to_v_ip(tokens)


def layer_inputs(layers: Sequence[nn.Module], tokens: torch.Tensor, scale: float | Sequence[float],
                 what: str = "cross-attention layer") -> list[list[tuple]]:
    """A network's ``ip`` hook entries for image tokens (B, N, D), given the adapter's per-layer projections
    (each with ``keys_values(tokens)``): per layer [(keys, values, scale)], or [] where the layer's scale is 0
    (that layer then computes exactly what it does without)."""
    scales = [float(scale)] * len(layers) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(layers):
        raise ValueError(f"one IP-Adapter scale per {what} ({len(layers)}); got {len(scales)}")
    return [[(*kv.keys_values(tokens), s)] if s != 0 else [] for kv, s in zip(layers, scales)]


class IPAdapter(nn.Module):
    """``adapter(features) -> image tokens (B, N, D)``; ``adapter.layer_inputs(tokens, scale)`` -> the UNet's
    ``ip`` hook entries. ``features``: CLIP ``image_embeds`` (B, E) or penultimate hidden states (B, T, E), as
    ``config.image_features`` says."""

    # What the unconditional rows receive (pipeline/ip_adapter.py): "zero", the release's zero image (a zero
    # embedding for ``image_embeds`` adapters, the features of an all-zero normalised input for the others), or
    # "black", the features of a black picture (diffusers' FluxPipeline for XLabs' FLUX adapter).
    unconditional_reference = "zero"

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = c = config
        if c.projection == "linear":
            self.image_proj = LinearProjection(c.image_dim, c.context_dim, c.num_tokens)
        elif c.projection == "mlp":
            self.image_proj = MLPProjection(c.image_dim, c.context_dim)
        else:
            self.image_proj = Resampler(c)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): ImageKeyValues(c.context_dim, width)
                                         for i, width in enumerate(c.layer_widths)})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(features.to(self.image_proj_dtype))

    @property
    def image_proj_dtype(self) -> torch.dtype:
        return next(self.image_proj.parameters()).dtype

    def layer_inputs(self, tokens: torch.Tensor, scale: float | Sequence[float] = 1.0) -> list[list[tuple]]:
        """The UNet's ``ip`` entries for image tokens (B, N, D): per cross-attention layer, [(keys, values,
        scale)], or [] where the layer's scale is 0 (that layer then computes exactly what it does without)."""
        return layer_inputs(list(self.ip_adapter.values()), tokens.to(self.image_proj_dtype), scale)

    def layer_names(self, unet) -> list[str]:
        """The names ``ImagePrompt(blocks=...)`` picks layers by: diffusers' block names (`cross_attention_names`)."""
        return cross_attention_names(unet)

    def mismatch(self, unet) -> str | None:
        """Why this adapter does not fit ``unet`` (a UNetModel), or None."""
        layers = unet.cross_attention_layers()
        widths = [layer.to_k.out_features for layer in layers]
        context = unet.config.context_dim
        if self.config.context_dim != context:
            return (f"its image tokens are {self.config.context_dim} wide, the UNet's text width (cross-attention "
                    f"context) is {context}")
        if len(widths) != len(self.config.layer_widths):
            return (f"it has projections for {len(self.config.layer_widths)} cross-attention layers, the UNet has "
                    f"{len(widths)}")
        if widths != self.config.layer_widths:
            return f"its layer widths {self.config.layer_widths} are not the UNet's {widths}"
        return None


# --------------------------------------------------------------------------------------------
# Where the layers are: diffusers' block names, and InstantStyle's style blocks.
# --------------------------------------------------------------------------------------------


def cross_attention_names(unet) -> list[str]:
    """diffusers' name of each of ``unet.cross_attention_layers()`` (same order), e.g.
    ``up_blocks.0.attentions.1.transformer_blocks.3``: the names IP-Adapter tools use to pick layers."""
    from diffstudio.models.unet import SpatialTransformer

    bases = {"down": "down_blocks.{}", "up": "up_blocks.{}", "mid": "mid_block"}
    sites = unet.temporal_sites  # ("down" | "up" | "mid", level, j) per block (models/unet.py)
    names = []
    for blocks, part in ((unet.input_blocks, "input"), (unet.output_blocks, "output"), ([unet.middle_block], "middle")):
        for block, site in zip(blocks, sites[part]):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    kind, level, j = site
                    base = bases[kind].format(level)
                    names += [f"{base}.attentions.{j}.transformer_blocks.{k}"
                              for k in range(len(layer.transformer_blocks))]
    return names


def style_blocks(names: Sequence[str]) -> tuple[str, ...]:
    """InstantStyle's style blocks (Wang et al. 2024, "InstantStyle", arXiv:2404.02733) for a UNet whose
    cross-attention layers are ``names``: in the first up level with cross-attention. SDXL layouts (attention in
    the deepest up level, ``up_blocks.0``): its second attention, ``up_blocks.0.attentions.1``, the paper's
    choice. SD 1.x layouts (no attention there): the whole level, ``up_blocks.1``, the authors' SD 1.5 choice."""
    levels = sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})
    if not levels:
        return ()
    return ("up_blocks.0.attentions.1",) if levels[0] == 0 else (f"up_blocks.{levels[0]}",)


def in_blocks(name: str, blocks: Sequence[str]) -> bool:
    """Whether a layer's name lies in one of ``blocks`` (name prefixes that end at a dot)."""
    return any(name == b or name.startswith(b + ".") for b in blocks)
