"""Released sizes on the meta device: the name tables of a full SDXL UNet and a full FLUX-dev
transformer map the names real LoRA files use, with rows for FLUX's fused weights, in O(rows)
memory (no weights are allocated)."""

from __future__ import annotations

import torch

from diffstudio.patches.names import Target, build_table


def test_full_sdxl_unet_names():
    from diffstudio.detect.unet import config_from_diffusers
    from diffstudio.models.unet import UNetModel
    from diffstudio.release_configs import SDXL_UNET

    config = config_from_diffusers(dict(SDXL_UNET))
    with torch.device("meta"):
        unet = UNetModel(config)
    table = build_table(unet, "ldm_unet", config)
    param = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert unet.get_parameter(param).shape == (640, 2048)
    for name in ("input_blocks_4_1_transformer_blocks_0_attn2_to_k",        # kohya, LDM spelling
                 "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"):  # kohya, diffusers spelling
        assert table.lookup(name, flattened=True) == Target(param)
    assert table.lookup("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2") == Target(
        "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight")


def test_full_flux_names_with_row_slices():
    from diffstudio.models.flux import FluxConfig, FluxTransformer

    config = FluxConfig()
    with torch.device("meta"):
        dit = FluxTransformer(config)
    table = build_table(dit, "flux_dit", config)
    h = config.hidden_size
    qkv = Target("double_blocks.18.img_attn.qkv.weight")
    assert table.lookup("double_blocks_18_img_attn_qkv", flattened=True) == qkv
    k = table.lookup("transformer_blocks.3.attn.add_k_proj")
    assert k.param == "double_blocks.3.txt_attn.qkv.weight" and k.rows == slice(h, 2 * h)
    mlp = table.lookup("single_transformer_blocks.37.proj_mlp")
    assert mlp.param == "single_blocks.37.linear1.weight" and mlp.rows == slice(3 * h, 3 * h + 4 * h)
