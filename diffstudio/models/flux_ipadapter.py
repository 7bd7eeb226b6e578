"""XLabs' IP-Adapter for FLUX.1 (``XLabs-AI/flux-ip-adapter``, x-flux ``IPDoubleStreamBlockProcessor``).

The decoupled image attention of Ye et al. 2023 ("IP-Adapter", arXiv:2308.06721, eq. 5) moved into the
double-stream blocks of the FLUX transformer (models/flux.py). A CLIP ViT-L/14 ``image_embeds`` (B, 768) is
projected to N image tokens of the T5 width (4096), as the UNet adapters' linear projection does (Linear, split
into tokens, LayerNorm). In every double block, the image stream's queries (after QK-norm, before RoPE) attend
to those tokens through the block's own key and value projections (with biases), and the result, times the
scale, is added to the image tokens at the end of the block, after the MLP; no output projection, no gate:

    img <- img + scale * Attention(q_img, K_ip(tokens), V_ip(tokens))

The single-stream blocks get nothing. The transformer's weights are untouched: the projected keys and values
reach the blocks through its ``ip`` hook (one entry per double block), the contract of the UNet adapters.

Parameter names are XLabs' file's, so ``ip_adapter.safetensors`` loads with no renaming:
``ip_adapter_proj_model.proj`` / ``.norm`` and ``double_blocks.{i}.processor.ip_adapter_double_stream_k_proj`` /
``_v_proj`` (weight and bias), i = 0 .. depth - 1. The config is an `IPAdapterConfig` (projection "linear",
``layer_widths`` = the hidden width once per double block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffstudio.models.ipadapter import IPAdapterConfig, LinearProjection, layer_inputs


class DoubleStreamImageKeyValues(nn.Module):
    """One double block's projections of the image tokens: (B, N, D) -> keys, values (B, N, hidden)."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.ip_adapter_double_stream_k_proj = nn.Linear(context_dim, hidden)
        self.ip_adapter_double_stream_v_proj = nn.Linear(context_dim, hidden)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ip_adapter_double_stream_k_proj(tokens), self.ip_adapter_double_stream_v_proj(tokens)


class DoubleBlockProcessor(nn.Module):
    """Holds a double block's projections under XLabs' ``double_blocks.{i}.processor.`` level."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.processor = DoubleStreamImageKeyValues(context_dim, hidden)


class FluxIPAdapter(nn.Module):
    """``adapter(image_embeds) -> image tokens (B, N, D)``; ``adapter.layer_inputs(tokens, scale)`` -> the FLUX
    transformer's ``ip`` hook entries (one per double block)."""

    unconditional_reference = "black"  # diffusers' FluxPipeline: the negative image is a black picture

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        if config.projection != "linear":
            raise ValueError(f"the FLUX IP-Adapter projects image embeddings linearly, not by {config.projection!r}")
        self.config = c = config
        self.ip_adapter_proj_model = LinearProjection(c.image_dim, c.context_dim, c.num_tokens)
        self.double_blocks = nn.ModuleList(DoubleBlockProcessor(c.context_dim, w) for w in c.layer_widths)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ip_adapter_proj_model(features.to(self.image_proj_dtype))

    @property
    def image_proj_dtype(self) -> torch.dtype:
        return self.ip_adapter_proj_model.proj.weight.dtype

    def layer_inputs(self, tokens: torch.Tensor, scale: float | Sequence[float] = 1.0) -> list[list[tuple]]:
        """The transformer's ``ip`` entries for image tokens (B, N, D): per double block [(keys, values, scale)],
        or [] where the block's scale is 0."""
        return layer_inputs([b.processor for b in self.double_blocks], tokens.to(self.image_proj_dtype), scale,
                            "double block")

    def layer_names(self, transformer) -> list[str]:
        """The names ``ImagePrompt(blocks=...)`` picks blocks by: BFL's, ``double_blocks.{i}``."""
        return [f"double_blocks.{i}" for i in range(len(transformer.double_blocks))]

    def mismatch(self, transformer) -> str | None:
        """Why this adapter does not fit ``transformer`` (a FluxTransformer), or None."""
        base = transformer.config
        if self.config.context_dim != base.context_in_dim:
            return (f"its image tokens are {self.config.context_dim} wide, the transformer's text (T5) width is "
                    f"{base.context_in_dim}")
        widths = self.config.layer_widths
        if len(widths) != base.depth:
            return f"it has projections for {len(widths)} double blocks, the transformer has {base.depth}"
        if set(widths) != {base.hidden_size}:
            return f"its projections are {sorted(set(widths))} wide, the transformer is {base.hidden_size} wide"
        return None
