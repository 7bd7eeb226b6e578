"""ControlNet for the LDM UNet (SD 1.x, SDXL).

Reference: Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models" (arXiv:2302.05543), section 3 and fig. 3; the layout is the released ``cldm`` one.

A ControlNet is a trainable copy of the UNet's encoder half (``input_blocks``) and middle block,
fed the same latent, timestep and text as the UNet, plus a control image (the *hint*):

* ``input_hint_block`` (section 3.2, "tiny network E"): eight 3x3 convs with SiLU between them,
  three of stride 2, taking the hint from pixel to latent resolution (8x smaller) and to the
  UNet's base width. Its output is added to the output of the first input block (conv_in).
* ``zero_convs``: one 1x1 conv per input block ("zero convolution", eq. 2, initialised to zero),
  mapping that block's output to a residual; ``middle_block_out``: the same for the middle block.

``forward`` returns the residuals in the order ``UNetModel.forward(..., control=)`` takes them:
one per input block (``input_blocks[0]`` = conv_in first, in order; residual i is shaped like
input block i's output), then the middle block's. The UNet adds the last to its middle output and
residual i to skip i when the output blocks pop it (diffusers: ``down_block_additional_residuals``
= all but the last, ``mid_block_additional_residual`` = the last).

A ControlNet-Union (xinsir's SDXL union and ProMax, ``config.num_control_types``) is this module plus the condition
path of ``diffstudio.models.controlnet_union``: the control type is embedded into the time embedding, and several
control images go through the same hint encoder and are mixed before they are added to conv_in's output.

Parameter names are the cldm release's (``control_model.`` stripped), so
``control_v11p_sd15_canny.pth`` loads without renaming; diffusers ``ControlNetModel`` weights go
through ``diffstudio.convert.controlnet``.

Shapes: x (B, 4, H, W) latents; hint (B, hint_channels, 8H, 8W) in [0, 1] (the inpainting
ControlNet takes -1 at masked pixels); timesteps (B,); context (B, T, context_dim); y (B, adm).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.models.controlnet_union import add_union_layers, fuse_conditions, union_mode_index
from diffstudio.models.unet import (
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    UNetConfig,
    add_embedding_layers,
    embed_conditioning,
    encoder_blocks,
)


@dataclass
class ControlNetConfig(UNetConfig):
    """Constructor arguments of `ControlNetModel`: the UNet's (its encoder half is copied) plus the hint.

    ``out_channels`` is unused (a ControlNet has no output blocks). ``hint_block_channels`` are the
    widths of the hint encoder's stages (cldm: 16, 32, 96, 256; diffusers'
    ``conditioning_embedding_out_channels``). ``global_average_pooling``: residuals are averaged over
    space (the v1.1 "shuffle" ControlNet's yaml; diffusers' ``global_pool_conditions``). It changes
    no weight, so it is never derived from a file, only read from a config.
    """

    hint_channels: int = 3
    hint_block_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    global_average_pooling: bool = False
    # ControlNet-Union (models/controlnet_union.py): the number of control types (xinsir: 6, ProMax: 8; None =
    # a plain ControlNet), the condition transformer's heads and blocks, the Fourier width of each one-hot value.
    num_control_types: int | None = None
    union_heads: int = 8
    union_layers: int = 1
    control_type_dim: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hint_block_channels = list(self.hint_block_channels)
        if not self.hint_block_channels:
            raise ValueError("ControlNetConfig: hint_block_channels needs at least one width")

    @classmethod
    def from_unet(cls, unet: UNetConfig, **hint) -> ControlNetConfig:
        """The ControlNet of a UNet (the paper initialises it as a copy of the UNet's encoder)."""
        return cls(**{**unet.to_dict(), **hint})


def hint_block(hint_channels: int, widths: list[int], model_channels: int) -> TimestepEmbedSequential:
    """cldm's input_hint_block: conv, then per stage a same-width conv and a stride-2 widening conv,
    then a conv to the UNet's width; SiLU after every conv but the last. Conv i sits at index 2i."""
    convs = [nn.Conv2d(hint_channels, widths[0], 3, padding=1)]
    for width, wider in zip(widths, widths[1:]):
        convs += [nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, wider, 3, padding=1, stride=2)]
    convs.append(nn.Conv2d(widths[-1], model_channels, 3, padding=1))
    layers: list[nn.Module] = []
    for conv in convs[:-1]:
        layers += [conv, nn.SiLU()]
    return TimestepEmbedSequential(*layers, convs[-1])


class ControlNetModel(nn.Module):
    """``forward(x, hint, timesteps, context, y=None) -> [residual per input block ..., middle residual]``."""

    fuses_modes = True  # a union one takes several (mode, control image) pairs in one call (pipeline/control.py)

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config
        mc = c.model_channels
        g = c.norm_groups
        add_embedding_layers(self, c)
        emb_dim = mc * 4
        self.input_hint_block = hint_block(c.hint_channels, c.hint_block_channels, mc)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, g)

        def zero_conv(ch: int) -> TimestepEmbedSequential:
            return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))

        # The UNet's encoder half, block for block (same indices, so the same parameter names).
        blocks, widths = encoder_blocks(c, emb_dim, transformer)
        self.input_blocks = nn.ModuleList(blocks)
        self.zero_convs = nn.ModuleList([zero_conv(width) for width in widths])
        ch = widths[-1]
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, g),
                                                    transformer(ch, c.transformer_depth_middle),
                                                    ResBlock(ch, emb_dim, ch, g))
        self.middle_block_out = zero_conv(ch)
        if c.num_control_types:
            add_union_layers(self, c.num_control_types, c.union_heads, c.union_layers, c.control_type_dim)
        self.mode: int | str | Sequence[int | str] | None = None  # a union model's default mode (`with_mode`)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def is_union(self) -> bool:
        return bool(self.config.num_control_types)

    def mode_index(self, mode) -> int | list[int] | None:
        """A union mode (a name of ``controlnet_union.UNION_MODES`` or an index; a list of them for several
        control images) as task-embedding rows; None for a plain ControlNet, which takes no mode."""
        if not self.is_union:
            if mode is not None:
                raise InvalidInputError(f"this ControlNet has no modes (got mode={mode!r}); only union ControlNets "
                                        "(ControlNet-Union SDXL, FLUX union) take one")
            return None
        if isinstance(mode, (list, tuple)):
            if not mode:
                raise InvalidInputError("a ControlNet-Union call needs at least one mode")
            return [union_mode_index(m, self.config.num_control_types) for m in mode]
        return union_mode_index(mode, self.config.num_control_types)

    def with_mode(self, mode) -> ControlNetModel:
        """The same union ControlNet (shared weights, no copy) set to ``mode``, like ``FluxControlNet.with_mode``."""
        self.mode_index(mode)  # checked now, not at the first step
        twin = copy.copy(self)
        twin.mode = mode
        return twin

    def residual_channels(self) -> list[int]:
        """Channels of each residual, in forward's order (the UNet's skip widths, then the middle's)."""
        return [zc[0].out_channels for zc in self.zero_convs] + [self.middle_block_out[0].out_channels]

    def forward(self, x: torch.Tensor, hint: torch.Tensor | Sequence[torch.Tensor], timesteps: torch.Tensor,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None, mode=None,
                scales: Sequence[float] | None = None, **extra) -> list[torch.Tensor]:
        """x (B, C_in, H, W), hint (B, hint_channels, 8H, 8W), timesteps (B,), context (B, T, D), y (B, adm)
        -> len(input_blocks) + 1 residuals. ``extra`` (other conditioning the pipeline passes) is unused.

        A union model takes ``mode`` (else its ``self.mode``): one mode and one hint, or a list of modes with a
        list of hints (one per mode) and optionally their ``scales`` (models/controlnet_union.py)."""
        c = self.config
        dtype = self.dtype
        indices = self.mode_index(self.mode if mode is None else mode)
        hints = list(hint) if isinstance(hint, (list, tuple)) else [hint]
        if indices is None and len(hints) != 1:
            raise InvalidInputError(f"a ControlNet that is not a union model takes one control image, got {len(hints)}")
        indices = [indices] if isinstance(indices, int) else indices
        if indices is not None and len(indices) != len(hints):
            raise InvalidInputError(f"a ControlNet-Union call needs one control image per mode: {len(indices)} modes, "
                                    f"{len(hints)} images")
        emb, context = embed_conditioning(self, x, timesteps, context, y)            # (B, 4*mc), (B, T, D)
        if indices is not None:  # the control types in use, added to the time embedding
            emb = emb + self.control_add_embedding(indices, x.shape[0], dtype, x.device)

        h = self.input_blocks[0](x.to(dtype), emb, context)                               # conv_in
        guides = [self.input_hint_block(g.to(dtype), emb, context) for g in hints]        # (B, mc, H, W) each
        if guides[0].shape[-2:] != h.shape[-2:]:
            raise InvalidSizeError(f"the control image is {tuple(hints[0].shape[-2:])} pixels, which the hint "
                                   f"encoder takes to {tuple(guides[0].shape[-2:])}, but the latent is "
                                   f"{tuple(x.shape[-2:])}: give a control image of the generated image's size "
                                   "(8x the latent's)")
        if indices is None:
            h = h + guides[0]
        else:
            h = fuse_conditions(self, h, guides, indices, scales or [1.0] * len(guides))
        residuals = [self.zero_convs[0](h, emb, context)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            residuals.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h, emb, context))
        if c.global_average_pooling:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
        return residuals

