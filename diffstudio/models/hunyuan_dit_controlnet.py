"""The Hunyuan-DiT ControlNets (Tencent's HunyuanDiT-v1.1 / v1.2 Canny, Depth and Pose ControlNets; diffusers'
``HunyuanDiT2DControlNetModel``).

References: Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"
(arXiv:2302.05543), carried over to Hunyuan-DiT (Li et al. 2024, arXiv:2405.08748; models/hunyuan_dit.py) as
Tencent's release does it (its ``hydit`` ControlNet and diffusers' port; the facts below are theirs):

* a trainable copy of the DiT's first half: the same text refiner, pooler, patch / timestep / extra embedders,
  and blocks 0 .. depth/2 - 2 (19 of the released 40: exactly the blocks that feed the long skips, none of
  which takes a skip), initialised from the base;
* the control image enters as its **VAE latent**, patch-embedded by the copy's own ``x_embedder`` and passed
  through a zero-initialised Linear (``before_proj``), added to the embedded noisy latent:
      h = x_embedder(x) + before_proj(x_embedder(hint))                       (B, N, D)
* after block i a zero-initialised Linear (``after_proj_list.i``) gives residual i, (B, N, D);
* the DiT adds residual i to the skip that its block i hands to block depth - 1 - i
  (``HunyuanDiT.forward(control=)``), so the control reaches the second half through the long skips only.

Parameter names are the release's ``.pt`` names (the DiT's own, plus ``before_proj`` and ``after_proj_list.i``);
diffusers calls those two ``input_block`` and ``controlnet_blocks.i`` (diffstudio.convert.hunyuan_dit_controlnet).
The config is the base DiT's (``HunyuanDiTConfig``: ``depth`` is the base's 40; the ControlNet holds
depth/2 - 1 blocks; ``learn_sigma`` is unused: no output layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.cpu_linear import Linear
from diffstudio.models.hunyuan_dit import HunyuanDiTBlock, HunyuanDiTConfig, HunyuanDiTInputs


def controlnet_depth(config: HunyuanDiTConfig) -> int:
    """Blocks of a Hunyuan-DiT ControlNet = long skips of its base: depth / 2 - 1 (19 for the released 40)."""
    return config.depth // 2 - 1


class HunyuanDiTControlNet(HunyuanDiTInputs):
    # The pipeline hands it the control image's VAE latent in the model's space (pipeline/control.py) and the DiT's
    # other inputs (the text states and masks, v1.0/1.1's size and style) as keywords.
    hint_space = "latent"
    takes_network_kwargs = True

    def __init__(self, config: HunyuanDiTConfig):
        super().__init__(config)
        dim = config.hidden_size
        self.blocks = nn.ModuleList(HunyuanDiTBlock(config, skip=False) for _ in range(controlnet_depth(config)))
        self.before_proj = Linear(dim, dim)  # zero-initialised in training
        self.after_proj_list = nn.ModuleList(Linear(dim, dim) for _ in range(controlnet_depth(config)))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context=None, y=None, *,
                encoder_hidden_states: torch.Tensor, text_embedding_mask: torch.Tensor,
                encoder_hidden_states_t5: torch.Tensor, text_embedding_mask_t5: torch.Tensor,
                image_meta_size: torch.Tensor | None = None, style: torch.Tensor | None = None,
                cos_cis_img: torch.Tensor | None = None, sin_cis_img: torch.Tensor | None = None,
                context_bias: dict | None = None, **_) -> list[torch.Tensor]:
        """x (B, C, H, W) the DiT's input latent, hint (B, C, H, W) the control image's latent, t (B,) on the
        1000-step scale, the DiT's text inputs -> depth/2 - 1 residuals (B, N, D) for ``HunyuanDiT.forward(control=)``.

        ``context`` / ``y`` (the generic ControlNet call's) are unused: Hunyuan-DiT's text comes by keyword. Odd
        latent sides are padded by a replicated row / column, as ``families.hunyuan.call_dit`` pads the DiT's input,
        so the residuals fit its token grid. With region prompts the blocks get the same cross-attention bias."""
        pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            hint = F.pad(hint, (0, pad_w, 0, pad_h), mode="replicate")
        p = self.config.patch_size
        h, c, text, rope = self.embed_inputs(x, t, encoder_hidden_states, text_embedding_mask,
                                             encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size,
                                             style, cos_cis_img, sin_cis_img)
        h = h + self.before_proj(self.x_embedder(hint.to(h.dtype)))
        tokens = (x.shape[-2] // p) * (x.shape[-1] // p)
        text_bias = None if context_bias is None else context_bias[tokens].to(text)
        residuals = []
        for block, out in zip(self.blocks, self.after_proj_list):
            h = block(h, c, text, rope, None, text_bias)
            residuals.append(out(h))
        return residuals
