"""IP-Adapter files: detection of the released layouts (nested .bin, flat .safetensors), `models.add_ip_adapter`
with an image-encoder folder or file, the named errors when an adapter or encoder does not fit, the CLIP input
preprocessing against transformers' CLIPImageProcessor, and the released full-size layouts on the meta device."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.detect import detect
from diffstudio.errors import IPAdapterMismatchError, UnknownModelError
from diffstudio.ipadapter_loading import derive_image_encoder_config, read_image_encoder, read_ip_adapter
from diffstudio.models.ipadapter import IPAdapter
from diffstudio.pipeline.ip_adapter import clip_pixels
from diffstudio.release_configs import SD15_UNET, SDXL_UNET
from tests.tiny_ipadapter import VISION, adapter, released_dicts, unets, vision_encoder


@pytest.fixture(scope="module")
def models():
    return untrained_demo_models()


def write_adapter(folder, ip: IPAdapter, kind: str = "safetensors", encoder=True):
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in ip.state_dict().items()}
    if kind == "safetensors":
        path = folder / "ip-adapter_tiny.safetensors"
        save_file(sd, str(path))
    else:  # the released .bin: {"image_proj": {...}, "ip_adapter": {...}}
        path = folder / "ip-adapter_tiny.bin"
        torch.save(released_dicts(sd), path)
    if encoder:
        vision_encoder().save_pretrained(folder / "image_encoder")
    return path


@pytest.mark.parametrize("projection", ["linear", "resampler", "mlp"])
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_released_layouts_are_detected_and_read(tmp_path, projection, kind):
    _, unet = unets("sdxl")
    ip = adapter(unet, projection)
    path = write_adapter(tmp_path, ip, kind, encoder=False)
    sd, config = read_ip_adapter(path)
    assert config == ip.config
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ip.state_dict().items()}
    det = detect(sd)
    assert det.family is None and list(det.components) == ["ip_adapter"]
    assert det.components["ip_adapter"].config == ip.config
    with pytest.raises(UnknownModelError, match="models.add_ip_adapter"):
        diffstudio.load(path)


def test_add_ip_adapter_builds_it_in_the_models_dtype_with_its_encoder(tmp_path, models):
    ip = adapter(models.unet, "linear")
    path = write_adapter(tmp_path, ip)
    loaded = models.add_ip_adapter(path)  # the image_encoder/ folder beside the file
    assert loaded is models.add_ip_adapter(path)  # loaded once per path
    assert all(torch.equal(a, b) for a, b in zip(loaded.adapter.state_dict().values(), ip.state_dict().values()))
    assert loaded.image_size == VISION["image_size"]
    pixels = torch.randn(1, 3, 32, 32)
    reference = vision_encoder()
    with torch.no_grad():
        assert torch.allclose(loaded.image_encoder(pixel_values=pixels).image_embeds,
                              reference(pixel_values=pixels).image_embeds, atol=1e-5)
    twin = models.clone()
    assert twin.ip_adapters == models.ip_adapters
    models.ip_adapters.clear()


def test_encoder_from_a_single_file_derives_its_config(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=128, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=7, projection_dim=24, hidden_act="gelu")
    reference = CLIPVisionModelWithProjection(config).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    encoder = read_image_encoder(tmp_path / "encoder.safetensors")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "projection_dim", "hidden_act"):
        assert getattr(encoder.config, field) == getattr(config, field), field
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(encoder(pixel_values=pixels).image_embeds, reference(pixel_values=pixels).image_embeds,
                              atol=1e-5)


@pytest.mark.parametrize("name, config", [
    # laion/CLIP-ViT-H-14 as h94/IP-Adapter's models/image_encoder/config.json has it
    ("vit-h", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")),
    # laion/CLIP-ViT-bigG-14, h94/IP-Adapter's sdxl_models/image_encoder
    ("vit-bigG", dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")),
])
def test_full_size_encoder_configs_are_derived_from_shapes(name, config):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        sd = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).state_dict()
    derived = derive_image_encoder_config(sd)
    assert {k: getattr(derived, k) for k in config} == config


def test_mismatches_raise_named_errors(tmp_path, models):
    _, sdxl = unets("sdxl")
    path = write_adapter(tmp_path / "sdxl", adapter(sdxl, "linear"))
    with pytest.raises(IPAdapterMismatchError, match="image tokens are 24 wide.*text width.*64"):
        models.add_ip_adapter(path)
    # the right width, one layer short
    ip = adapter(models.unet, "linear")
    sd = {k: v for k, v in ip.state_dict().items() if not k.startswith("ip_adapter.13.")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(IPAdapterMismatchError, match="6 cross-attention layers, the UNet has 7"):
        models.add_ip_adapter(tmp_path / "short.safetensors", image_encoder=tmp_path / "sdxl" / "image_encoder")
    # a Plus adapter that reads 48-wide hidden states, fed by the 32-wide tiny encoder
    plus = adapter(models.unet, "resampler")
    plus.config.image_dim = 48
    plus.image_proj.proj_in = torch.nn.Linear(48, plus.config.resampler_dim)
    path = write_adapter(tmp_path / "plus", plus)
    with pytest.raises(IPAdapterMismatchError, match="reads 48-wide hidden states.*gives 32-wide"):
        models.add_ip_adapter(path)
    # no encoder given and none beside the file
    alone = write_adapter(tmp_path / "alone", ip, encoder=False)
    with pytest.raises(IPAdapterMismatchError, match="pass image_encoder="):
        models.add_ip_adapter(alone)
    assert not models.ip_adapters


def test_face_id_files_are_refused_by_name(tmp_path):
    ip = adapter(unets("sd1")[1], "linear").state_dict()
    face = {**ip, "image_proj.proj.0.weight": torch.zeros(2, 2), "ip_adapter.0.to_q_lora.down.weight": torch.zeros(1)}
    with pytest.raises(UnknownModelError, match="FaceID"):
        detect(face)


def test_clip_pixels_match_transformers_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    for shape in ((50, 80, 3), (90, 41, 3)):
        picture = rng.integers(0, 256, shape, dtype=np.uint8)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        expected = processor(images=picture, return_tensors="pt").pixel_values[0]
        assert torch.allclose(clip_pixels(picture, 32), expected, atol=1e-5)


# -- the released layouts at full size, on the meta device ------------------------------------------------

RELEASED_UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def meta_unets(family: str):
    """(diffusers UNet2DConditionModel, our UNetModel) at the released config, on the meta device."""
    from diffusers import UNet2DConditionModel

    from diffstudio.detect.unet import config_from_diffusers
    from diffstudio.models.unet import UNetModel

    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**{k: v for k, v in RELEASED_UNETS[family].items() if k in accepted})
        return ref, UNetModel(config_from_diffusers(dict(ref.config)))


def released_layout(family: str, projection: str, image_dim: int, ref) -> dict:
    """The key set and shapes of a released adapter file, built from the known widths: one to_k_ip / to_v_ip pair
    per attn2 processor of the diffusers UNet (width = its block's channels), the projection's own keys."""
    ctx = ref.config.cross_attention_dim
    widths = [ref.get_submodule(n.removesuffix(".processor")).to_q.out_features
              for n in ref.attn_processors if n.endswith("attn2.processor")]
    t = {f"ip_adapter.{2 * i + 1}.{kv}.weight": torch.empty(w, ctx, device="meta")
         for i, w in enumerate(widths) for kv in ("to_k_ip", "to_v_ip")}
    if projection == "linear":
        t.update({"image_proj.proj.weight": (4 * ctx, image_dim), "image_proj.proj.bias": (4 * ctx,),
                  "image_proj.norm.weight": (ctx,), "image_proj.norm.bias": (ctx,)})
    else:  # the Plus resampler: 16 queries, 4 layers, 64-wide heads, feed-forward x4
        dim = 768 if family == "sd15" else 1280
        t.update({"image_proj.latents": (1, 16, dim), "image_proj.proj_in.weight": (dim, image_dim),
                  "image_proj.proj_in.bias": (dim,), "image_proj.proj_out.weight": (ctx, dim),
                  "image_proj.proj_out.bias": (ctx,), "image_proj.norm_out.weight": (ctx,),
                  "image_proj.norm_out.bias": (ctx,)})
        for n in range(4):
            p = f"image_proj.layers.{n}."
            t.update({p + "0.norm1.weight": (dim,), p + "0.norm1.bias": (dim,), p + "0.norm2.weight": (dim,),
                      p + "0.norm2.bias": (dim,), p + "0.to_q.weight": (dim, dim), p + "0.to_kv.weight": (2 * dim, dim),
                      p + "0.to_out.weight": (dim, dim), p + "1.0.weight": (dim,), p + "1.0.bias": (dim,),
                      p + "1.1.weight": (4 * dim, dim), p + "1.3.weight": (dim, 4 * dim)})
    return {k: v if isinstance(v, torch.Tensor) else torch.empty(v, device="meta") for k, v in t.items()}


@pytest.mark.parametrize("name, family, projection, image_dim, layers, heads", [
    ("ip-adapter_sd15", "sd15", "linear", 1024, 16, None),
    ("ip-adapter-plus_sd15", "sd15", "resampler", 1280, 16, 12),
    ("ip-adapter_sdxl", "sdxl", "linear", 1280, 70, None),  # ViT-bigG image embeddings
    ("ip-adapter-plus_sdxl_vit-h", "sdxl", "resampler", 1280, 70, 20),  # ViT-H hidden states
])
def test_released_layouts_at_full_size(name, family, projection, image_dim, layers, heads):
    ref, ours = meta_unets(family)
    sd = released_layout(family, projection, image_dim, ref)
    det = detect(sd)
    config = det.components["ip_adapter"].config
    assert (config.projection, config.image_dim, len(config.layer_widths)) == (projection, image_dim, layers)
    assert config.num_tokens == (4 if projection == "linear" else 16)
    if heads:
        assert config.resampler_heads == heads
    with torch.device("meta"):
        built = IPAdapter(config)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert built.mismatch(ours) is None
    other = meta_unets("sdxl" if family == "sd15" else "sd15")[1]
    assert built.mismatch(other) is not None
