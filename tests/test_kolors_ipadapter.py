"""Kolors' IP-Adapter-Plus (Kwai-Kolors/Kolors-IP-Adapter-Plus, ip_adapter_plus_general.bin): an SDXL-layout Plus
adapter (Perceiver resampler) over a CLIP ViT-L/14-336 encoder's penultimate hidden states, on the Kolors UNet, whose
2048-wide text tokens are ChatGLM's 4096-wide states through encoder_hid_proj. The Kolors UNet with the adapter
against diffusers' UNet with the same file loaded by `_load_ip_adapter_weights` (which keeps the text projection as
`text_encoder_hid_proj`, as Kolors' own sample script does by hand), the full-size layout on the meta device, the
336-pixel encoder's config from shapes, and the pipeline on a tiny Kolors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect import detect
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.ipadapter_loading import derive_image_encoder_config, encoder_problem
from diffstudio.models.ipadapter import IPAdapter
from diffstudio.models.unet import UNetModel, timestep_embedding
from tests.tiny_ipadapter import HIDDEN, adapter, randomize, released_dicts, vision_encoder
from tests.tiny_kolors import SIZE_EMBED, TEXT_WIDTH, UNET

TOL = 1e-4
# openai/clip-vit-large-patch14-336, the encoder in Kolors-IP-Adapter-Plus/image_encoder (config.json on the Hub)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_kolors_unet_with_plus_adapter_matches_diffusers():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    ref = randomize(UNet2DConditionModel(**UNET), 0, std=0.1)
    ours = UNetModel(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), strict=True)
    assert ours.config.encoder_hid_dim == TEXT_WIDTH
    ip = adapter(ours, "resampler")  # tokens as wide as the cross-attention context (after encoder_hid_proj)
    assert ip.mismatch(ours) is None
    ref._load_ip_adapter_weights([released_dicts(ip.state_dict())])
    assert ref.config.encoder_hid_dim_type == "ip_image_proj" and ref.text_encoder_hid_proj is not None
    IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=ref), 0.6)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.5, 700.0])
    context, pooled = torch.randn(2, 7, TEXT_WIDTH, generator=g), torch.randn(2, TEXT_WIDTH, generator=g)
    time_ids = torch.tensor([[512.0, 768, 0, 0, 512, 768]] * 2)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SIZE_EMBED).reshape(2, -1)], dim=-1)
    feats = torch.randn(2, 5, HIDDEN, generator=g)  # penultimate hidden states of one image per row
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids,
                                                         "image_embeds": [feats[:, None]]}).sample
        got = ours(x, t, context, y=y, ip=ip.layer_inputs(ip(feats), 0.6))
        base = ours(x, t, context, y=y)
        off = ours(x, t, context, y=y, ip=ip.layer_inputs(ip(feats), 0.0))
    err = rel_err(got, expected)
    print(f"Kolors IP-Adapter-Plus parity: relative error {err:.2e}")
    assert err < TOL
    assert rel_err(base, expected) > 1e-2
    assert torch.equal(off, base)


def test_full_size_layout_on_meta():
    """The released Kolors UNet (70 cross-attention layers, 2048-wide context) with a Plus adapter reading
    ViT-L/14-336's 1024-wide hidden states: 16 queries, 4 layers, a 1280-wide resampler with 64-wide heads (the SDXL
    Plus convention; diffusers derives all of these from shapes, and so do we)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffstudio.release_configs import KOLORS_UNET
    from tests.test_ipadapter_loading import released_layout

    with torch.device("meta"):
        ref = UNet2DConditionModel(**KOLORS_UNET)
        ours = UNetModel(config_from_diffusers(dict(ref.config)))
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_336))
    sd = released_layout("kolors", "resampler", 1024, ref)
    det = detect(sd)
    assert det.family is None and list(det.components) == ["ip_adapter"]
    config = det.components["ip_adapter"].config
    assert (config.projection, config.image_dim, config.context_dim, config.num_tokens) == ("resampler", 1024, 2048, 16)
    assert (len(config.layer_widths), config.resampler_dim, config.resampler_heads) == (70, 1280, 20)
    with torch.device("meta"):
        built = IPAdapter(config)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert built.mismatch(ours) is None
    derived = derive_image_encoder_config(encoder.state_dict())
    assert {k: getattr(derived, k) for k in CLIP_L_336} == CLIP_L_336
    assert encoder_problem(config, derived) is None
    vit_h = CLIPVisionConfig(hidden_size=1280, num_attention_heads=16, projection_dim=1024)
    assert "ViT-L/14-336" in encoder_problem(config, vit_h)


# -- the pipeline on a tiny Kolors ---------------------------------------------------------------------------------

RUN = dict(width=64, height=64, steps=2, seed=3, cfg_scale=3.0, progress=False)


def picture(colour) -> np.ndarray:
    out = np.full((48, 64, 3), 255, np.uint8)
    out[8:40, 10:40] = colour
    return out


@pytest.fixture(scope="module")
def kolors(tmp_path_factory):
    """(models, adapter path): a tiny Kolors and a Plus adapter for it as a released .bin (two nested dicts), with
    the tiny CLIP vision encoder in image_encoder/ beside it (Kolors-IP-Adapter-Plus's layout)."""
    from tests.tiny_kolors import reference_models, write_diffusers_folder

    root = tmp_path_factory.mktemp("kolors_ip")
    models = diffstudio.load(write_diffusers_folder(root / "kolors", *reference_models()))
    folder = root / "adapter"
    folder.mkdir()
    torch.save(released_dicts(adapter(models.unet, "resampler").state_dict()), folder / "ip_adapter_plus_general.bin")
    vision_encoder().save_pretrained(folder / "image_encoder")
    return models, folder / "ip_adapter_plus_general.bin"


def test_an_image_prompt_changes_the_kolors_image(kolors):
    models, path = kolors
    assert models.family.name == "kolors"
    pipe = diffstudio.Pipeline(models)
    loaded = models.add_ip_adapter(path)
    assert loaded.adapter.config.projection == "resampler"
    image = lambda **kw: np.asarray(pipe("一只红色的猫", **RUN, **kw)[0], dtype=np.int16)  # noqa: E731
    base = image()
    red = image(ip_adapter=diffstudio.ImagePrompt(picture((220, 20, 20)), scale=1.0))
    assert np.abs(red - base).max() > 0
    assert np.array_equal(image(ip_adapter=diffstudio.ImagePrompt(picture((220, 20, 20)), scale=0.0)), base)
    assert np.array_equal(image(), base)
