"""Loading SVD's parts from a single file in the release's layout, the CLIP vision tower against an independent
OpenCLIP forward, and the img2vid command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from diffstudio.cli import main
from diffstudio.convert.clip_vision import vision_from_openclip, vision_to_openclip
from diffstudio.convert.svd_vae import temporal_vae_from_diffusers
from diffstudio.errors import UnknownModelError
from diffstudio.video.svd_loading import load_svd, single_file_parts


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return _random(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=64,
        patch_size=16, projection_dim=16, hidden_act="gelu")))


def openclip_forward(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenCLIP's VisionTransformer written out from its definition (nn.MultiheadAttention with a fused in_proj,
    pre-LN blocks, ln_post on the class token, x @ proj): the reference our converted model must equal."""
    x = F.conv2d(pixels, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["positional_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"],
                              "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"],
                              "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        x = x + h
    return F.layer_norm(x[:, 0], (width,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]


def test_openclip_vision_tower_matches_its_definition(encoder):
    openclip = vision_to_openclip(encoder.state_dict())
    assert openclip["proj"].shape == (64, 16)
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    model = CLIPVisionModelWithProjection(encoder.config).eval()
    model.load_state_dict(vision_from_openclip(openclip))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = openclip_forward(openclip, pixels, heads=1)
        got = model(pixel_values=pixels).image_embeds
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_single_file_in_the_release_layout(encoder, tmp_path):
    vae = _random(AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), layers_per_block=2,
                                               down_block_types=("DownEncoderBlock2D",) * 2))
    ours = temporal_vae_from_diffusers(vae.state_dict())
    # The first stage's own encoder differs here, so the test sees which encoder is taken.
    sd = {f"first_stage_model.{k}": torch.randn_like(v) if k.startswith("encoder.") else v
          for k, v in ours.items() if not k.startswith("quant_conv")}
    # The conditioning encoder of the release: the same encoder with quant_conv (its decoder is stored too).
    sd.update({f"conditioner.embedders.3.encoder.{k}": v for k, v in ours.items() if not k.startswith("decoder.")})
    sd.update({f"conditioner.embedders.0.open_clip.model.visual.{k}": v
               for k, v in vision_to_openclip(encoder.state_dict()).items()})
    path = tmp_path / "svd_tiny.safetensors"
    save_file({k: v.clone() for k, v in sd.items()}, str(path))
    parts = single_file_parts(sd)
    assert "quant_conv.weight" in parts["vae"]
    unet = torch.nn.Linear(1, 1)
    models = load_svd(path, unet=unet)
    assert models.unet is unet and models.vae.config.use_quant_conv
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(models.vae.encode(images), vae.encode(images).latent_dist.mean, atol=1e-5)
        assert torch.allclose(models.vae.decode(z), vae.decode(z, num_frames=3).sample, atol=1e-4)
        pixels = torch.randn(1, 3, 64, 64)
        assert torch.allclose(models.image_encoder(pixel_values=pixels).image_embeds,
                              encoder(pixel_values=pixels).image_embeds, atol=1e-5)
    with pytest.raises(UnknownModelError):
        single_file_parts({"model.diffusion_model.x": torch.zeros(1)})


def test_img2vid_command_line(tmp_path, capsys):
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    code = main(["img2vid", str(image), "--model", str(tmp_path / "missing.safetensors"), "-o",
                 str(tmp_path / "out.mp4"), "--quiet"])
    assert code == 2 and "ModelNotFoundError" in capsys.readouterr().err
    code = main(["img2vid", str(tmp_path / "nope.png"), "--model", "x", "-o", str(tmp_path / "out.mp4")])
    assert code == 2 and "input image not found" in capsys.readouterr().err


def test_a_release_layout_file_with_our_unet_loads_and_renders_through_video_pipeline(tmp_path):
    """A whole svd.safetensors-layout file (UNet, temporal VAE, conditioning encoder, OpenCLIP tower) loads with
    ``load_svd`` and with ``diffstudio.load`` (family svd), and ``VideoPipeline`` renders it; both give the same
    frames."""
    import numpy as np
    from PIL import Image

    import diffstudio
    from tests.tiny_svd import write_svd_file

    path = write_svd_file(tmp_path / "svd_tiny.safetensors")

    image = Image.new("RGB", (32, 32), "red")
    run = dict(image=image, num_frames=3, width=32, height=32, steps=2, seed=3)
    direct = diffstudio.VideoPipeline(load_svd(path))(**run)
    models = diffstudio.load(path)
    assert models.family.name == "svd" and type(models.unet).__name__ == "SVDUNet"
    loaded = diffstudio.VideoPipeline(models)(**run)
    assert len(direct) == 3 and direct[0].size == (32, 32)
    assert [np.asarray(f).tolist() for f in direct] == [np.asarray(f).tolist() for f in loaded]
