"""The ControlNets of Stable Diffusion 3 / 3.5: a shallow MMDiT that also sees the control image.

Reference: Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"
(arXiv:2302.05543), carried over to the MMDiT (Esser et al. 2024, arXiv:2403.03206) as InstantX's
SD3-Controlnet releases and Stability's SD3.5 ControlNets do (diffusers' ``SD3ControlNetModel``):

* the network input x is patch-embedded with learned positions, as in the MMDiT;
* the control image's VAE latent is patch-embedded by ``pos_embed_input``, a zero-initialised patch
  convolution, and added to those image tokens (the ControlNet paper's zero convolution on the input);
* N blocks follow, each one's image tokens go through a zero-initialised Linear (``controlnet_blocks.i``):
  N residuals (B, tokens, C). The MMDiT adds them to its own image tokens after its joint blocks
  (``MMDiT.forward(control=)``: block i gets residual int(i / (depth / N))).

Two kinds, chosen by the config:

* InstantX SD3 (``context_in_dim`` set): joint blocks exactly like the MMDiT's (``joint_blocks.i``, reused from
  ``diffstudio.models.mmdit``; none is pre-only), its own patch embedding, position table and text embedder.
  These were trained with a zero pooled vector and a control latent that is scaled but not shifted
  (``zero_pooled``; diffusers' ``force_zeros_for_pooled_projection``).
* Stability SD3.5 (``context_in_dim=None``): single-stream blocks without text tokens (``transformer_blocks.i``: one
  stream of a joint block, attending over the image tokens alone), and no patch embedding of its own: the base
  MMDiT's ``x_embedder`` and position table embed x (`use_base_embedding`). The pooled vector is read.

Parameter names follow the MMDiT's original names (``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp.0``,
``joint_blocks.i.x_block.attn.qkv`` ...) plus ``pos_embed_input.proj`` and ``controlnet_blocks.i``; the single-stream
blocks keep the names of Stability's SD3.5 files (``transformer_blocks.i.attn.qkv``, ``.mlp.fc1``,
``.adaLN_modulation.1``).

Shapes: x (B, C, H, W) the MMDiT's input latent; hint (B, hint_channels, H, W) the control image's latent in the
model's space; t (B,) = 1000 sigma; context (B, T, context_in_dim); y (B, adm_in_channels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.cpu_linear import Linear
from diffstudio.models.mmdit import (
    DismantledBlock,
    JointBlock,
    MLPEmbedder,
    MMDiTConfig,
    PatchEmbed,
    adaln_condition,
    cropped_positions,
    patch_grid,
)


@dataclass
class SD3ControlNetConfig:
    """Constructor arguments of `SD3ControlNet`. Defaults: InstantX's SD3-Controlnet-Canny."""

    depth: int = 6
    hidden_size: int = 1536
    num_heads: int = 24
    patch_size: int = 2
    in_channels: int = 16  # channels of x (the base MMDiT's latent)
    hint_channels: int = 16  # channels pos_embed_input reads: the control latent
    pos_embed_max_size: int | None = 192  # its own position table, max_size^2 patches; None: the base's embedding
    context_in_dim: int | None = 4096  # width of the text tokens; None: single-stream blocks, no text
    adm_in_channels: int = 2048  # width of the pooled text vector y
    mlp_hidden_size: int = 6144
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    frequency_embedding_size: int = 256
    zero_pooled: bool = True  # trained with y = 0 (and an unshifted control latent): diffusers' force_zeros_...

    def __post_init__(self) -> None:
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        self.blocks_config()  # the MMDiT's own checks (heads divide the width, qk_norm, dual layers)

    @property
    def joint(self) -> bool:
        """Joint (text + image) blocks, or single-stream image-only ones."""
        return self.context_in_dim is not None

    @property
    def own_embedding(self) -> bool:
        return self.pos_embed_max_size is not None

    def blocks_config(self) -> MMDiTConfig:
        """The MMDiT config its blocks are built from."""
        return MMDiTConfig(depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads,
                           patch_size=self.patch_size, in_channels=self.in_channels,
                           pos_embed_max_size=self.pos_embed_max_size or 1, context_in_dim=self.context_in_dim or 1,
                           adm_in_channels=self.adm_in_channels, mlp_hidden_size=self.mlp_hidden_size,
                           qk_norm=self.qk_norm, dual_attention_layers=self.dual_attention_layers,
                           frequency_embedding_size=self.frequency_embedding_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> SD3ControlNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"SD3ControlNetConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class SD3ControlNet(nn.Module):
    # The pipeline hands it the control image as a VAE latent in the model's space (pipeline/control.py).
    hint_space = "latent"

    def __init__(self, config: SD3ControlNetConfig):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        blocks = config.blocks_config()
        if config.own_embedding:
            self.x_embedder = PatchEmbed(p, config.in_channels, dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_max_size ** 2, dim))
        self._base: tuple[nn.Module, ...] = ()  # the base MMDiT, whose embedding x uses otherwise
        self.t_embedder = MLPEmbedder(config.frequency_embedding_size, dim)
        self.y_embedder = MLPEmbedder(config.adm_in_channels, dim)
        if config.joint:
            self.context_embedder = Linear(config.context_in_dim, dim)
            self.joint_blocks = nn.ModuleList(JointBlock(blocks, i, context_pre_only=False)
                                              for i in range(config.depth))
        else:
            self.transformer_blocks = nn.ModuleList(DismantledBlock(blocks) for _ in range(config.depth))
        self.pos_embed_input = PatchEmbed(p, config.hint_channels, dim)  # zero-initialised in training
        self.controlnet_blocks = nn.ModuleList(Linear(dim, dim) for _ in range(config.depth))  # zero-initialised
        # Added to the control latent before it is read: InstantX's ControlNets saw (z * scale), the pipeline
        # hands (z - shift) * scale, so their loader sets shift * scale here (sd3_controlnet_loading.py).
        self.hint_offset = 0.0

    def use_base_embedding(self, mmdit: nn.Module) -> None:
        """Embed x with the base MMDiT's ``x_embedder`` and position table (the SD3.5 ControlNets have none of
        their own). The MMDiT is referred to, not registered: it is not part of this module's weights."""
        self._base = (mmdit,)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> image tokens with their positions, (B, h*w, C)."""
        cfg = self.config
        if cfg.own_embedding:
            owner, table, size = self, self.pos_embed, cfg.pos_embed_max_size
        elif self._base:
            owner = self._base[0]
            table, size = owner.pos_embed, owner.config.pos_embed_max_size
        else:
            raise ValueError("this SD3 ControlNet embeds x with its base MMDiT's patch embedding: call "
                             "use_base_embedding(mmdit) first (models.add_controlnet does)")
        h, w = patch_grid(x.shape[-2], x.shape[-1], cfg.patch_size, size)
        return owner.x_embedder(x) + cropped_positions(table, h, w).to(x.dtype)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **_) -> list[torch.Tensor]:
        """-> ``depth`` residuals (B, h*w, C) for ``MMDiT.forward(control=)``. Latent sides that are not
        multiples of the patch are padded circularly, as the SD3 family pads the MMDiT's input."""
        cfg = self.config
        p = cfg.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
            hint = F.pad(hint, (0, pad_w, 0, pad_h), mode="circular")
        if y is None:
            raise ValueError("an SD3 ControlNet reads the pooled text vector y (B, adm_in_channels)")
        if cfg.zero_pooled:
            y = torch.zeros_like(y)
        tokens = self.embed(x)  # (B, N, C)
        c = adaln_condition(self.t_embedder, self.y_embedder, t, y, x.shape[0], cfg.frequency_embedding_size,
                            x.dtype)
        tokens = tokens + self.pos_embed_input(hint + self.hint_offset if self.hint_offset else hint)
        residuals = []
        if cfg.joint:
            if context is None:
                raise ValueError("this SD3 ControlNet has joint blocks: pass the text tokens (context)")
            context = self.context_embedder(context)
            for block, out in zip(self.joint_blocks, self.controlnet_blocks):
                context, tokens = block(context, tokens, c)
                residuals.append(out(tokens))
        else:
            for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
                tokens = block.alone(tokens, c)
                residuals.append(out(tokens))
        return residuals
