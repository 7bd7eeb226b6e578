"""XLabs' IP-Adapter for FLUX.1: the transformer with the adapter against diffusers' FluxTransformer2DModel with the
same file loaded by FluxPipeline.load_ip_adapter, scale 0 = the base bit for bit, the full-size layout on the meta
device, detection, the pipeline on a tiny FLUX.1-dev (an ImagePrompt changes the image; scale 0 does not), and the
named errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

import diffstudio
from diffstudio.convert.flux import flux_from_diffusers
from diffstudio.detect import detect
from diffstudio.detect.flux import config_from_diffusers
from diffstudio.detect.ipadapter import derive_flux_ip_adapter_config
from diffstudio.errors import InvalidInputError, IPAdapterMismatchError, UnknownModelError
from diffstudio.models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents
from diffstudio.models.flux_ipadapter import FluxIPAdapter
from diffstudio.models.ipadapter import IPAdapterConfig
from tests.tiny_ipadapter import EMBED, randomize, vision_encoder

pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

TOL = 1e-4
SMALL = dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
             pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def xlabs_state_dict(image_dim: int, context: int, hidden: int, blocks: int, tokens: int = 4,
                     seed: int = 3) -> dict[str, torch.Tensor]:
    """An adapter in the names of XLabs' ip_adapter.safetensors, written out from the release's layout (not from
    our module), with random weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, base=0.0):
        return (base + 0.3 * torch.randn(*shape, generator=g)).contiguous()

    sd = {"ip_adapter_proj_model.proj.weight": rand(tokens * context, image_dim),
          "ip_adapter_proj_model.proj.bias": rand(tokens * context),
          "ip_adapter_proj_model.norm.weight": rand(context, base=1.0),
          "ip_adapter_proj_model.norm.bias": rand(context)}
    for i in range(blocks):
        for kv in ("k", "v"):
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(hidden, context), rand(hidden)
    return sd


def ours_from(sd: dict) -> FluxIPAdapter:
    adapter = FluxIPAdapter(derive_flux_ip_adapter_config(sd))
    adapter.load_state_dict(sd, strict=True)
    return adapter.eval()


# -- parity with diffusers ------------------------------------------------------------------------------------


def test_transformer_with_the_adapter_matches_diffusers(tmp_path):
    """The file goes into diffusers the way users load it (FluxPipeline.load_ip_adapter reads XLabs' names and
    converts them with the transformer's _convert_ip_adapter_* functions); 3 double blocks, scale 0.6."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    ref = FluxTransformer2DModel(**SMALL, num_layers=3, num_single_layers=2, guidance_embeds=True).eval()
    randomize(ref, 2, std=0.1)
    ours = FluxTransformer(config_from_diffusers(ref.config))
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()))
    ours.eval()
    sd = xlabs_state_dict(EMBED, 24, 32, 3)
    save_file(sd, str(tmp_path / "ip_adapter.safetensors"))
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref, image_encoder=None, feature_extractor=None)
    pipe.load_ip_adapter(str(tmp_path), weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(0.6)
    adapter = ours_from(sd)
    assert adapter.config.num_tokens == 4 and adapter.config.layer_widths == [32] * 3

    g = torch.Generator().manual_seed(1)
    latent, txt = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    y, embeds = torch.randn(2, 20, generator=g), torch.randn(2, EMBED, generator=g)
    t, guidance = torch.tensor([0.25, 0.9]), torch.tensor([3.5, 1.0])
    img, ids, txt_ids = pack_latents(latent), image_ids(6, 8), torch.zeros(5, 3)
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids,
                       txt_ids=txt_ids, guidance=guidance,
                       joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[:, None]]}).sample
        tokens = adapter(embeds)
        got = ours(img, ids, txt, txt_ids, t, y, guidance, ip=adapter.layer_inputs(tokens, 0.6))
        plain = ours(img, ids, txt, txt_ids, t, y, guidance)
        off = ours(img, ids, txt, txt_ids, t, y, guidance, ip=adapter.layer_inputs(tokens, 0.0))
        per_block = ours(img, ids, txt, txt_ids, t, y, guidance, ip=adapter.layer_inputs(tokens, [0.0, 0.6, 0.0]))
    err = rel_err(got, expected)
    print(f"FLUX IP-Adapter parity: relative error {err:.2e}")
    assert err < TOL
    assert rel_err(got, plain) > 1e-3
    assert torch.equal(off, plain)  # scale 0: no entries, the base computation bit for bit
    assert rel_err(per_block, plain) > 1e-4 and rel_err(per_block, got) > 1e-4
    with pytest.raises(InvalidInputError, match="2 entries.*3 double blocks"):
        ours(img, ids, txt, txt_ids, t, y, guidance, ip=adapter.layer_inputs(tokens)[:2])


# -- the full-size layout on the meta device -----------------------------------------------------------------


@pytest.mark.parametrize("tokens", [4, 16], ids=["v1-4-tokens", "16-tokens"])
def test_full_size_xlabs_layout_on_meta(tokens):
    """FLUX.1-dev: 19 double blocks, hidden 3072, T5 width 4096; CLIP ViT-L/14's 768-wide image embeddings. diffusers
    reads 4 tokens, or 16 when proj has 65536 rows; we derive N = proj rows / norm width."""
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    with torch.device("meta"):
        sd = xlabs_state_dict(768, 4096, 3072, 19, tokens)
        config = derive_flux_ip_adapter_config(sd)
        ours = FluxIPAdapter(config)
        base = FluxTransformer(FluxConfig())
        proj = ImageProjection(image_embed_dim=768, cross_attention_dim=4096, num_image_text_embeds=tokens)
        processor = FluxIPAdapterAttnProcessor(hidden_size=3072, cross_attention_dim=4096, num_tokens=[tokens])
    assert config == IPAdapterConfig("linear", 768, 4096, tokens, [3072] * 19)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    # diffusers' modules for the same weights have the same shapes
    assert tuple(proj.image_embeds.weight.shape) == tuple(sd["ip_adapter_proj_model.proj.weight"].shape)
    for name in ("weight", "bias"):
        assert tuple(getattr(processor.to_k_ip[0], name).shape) == \
            tuple(sd[f"double_blocks.18.processor.ip_adapter_double_stream_k_proj.{name}"].shape)
    assert ours.mismatch(base) is None
    detection = detect(sd)
    assert detection.family is None and detection.components["ip_adapter"].arch == "flux_ip_adapter"
    assert detection.components["ip_adapter"].config == config


def test_a_truncated_file_is_named():
    sd = xlabs_state_dict(8, 12, 16, 3)
    del sd["double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight"]
    with pytest.raises(UnknownModelError, match="numbered"):
        derive_flux_ip_adapter_config(sd)


# -- the pipeline on a tiny FLUX.1-dev ---------------------------------------------------------------------------

RUN = dict(width=64, height=64, steps=2, seed=3, progress=False)


def picture(colour) -> np.ndarray:
    out = np.full((48, 64, 3), 255, np.uint8)
    out[8:40, 10:40] = colour
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(models, adapter path): a tiny FLUX.1-dev (tests/tiny_flux.py) and an XLabs-layout adapter for it, with the
    tiny CLIP vision encoder in image_encoder/ beside it (XLabs' and h94's layout)."""
    from safetensors.torch import save_file

    from tests.tiny_flux import DIT, HIDDEN, reference_models, write_bundle

    root = tmp_path_factory.mktemp("flux_ip")
    models = diffstudio.load(write_bundle(root / "flux.safetensors", *reference_models("dev")))
    folder = root / "adapter"
    folder.mkdir()
    save_file(xlabs_state_dict(EMBED, DIT["joint_attention_dim"], HIDDEN, DIT["num_layers"]),
              str(folder / "ip_adapter.safetensors"))
    vision_encoder().save_pretrained(folder / "image_encoder")
    return models, folder / "ip_adapter.safetensors"


def image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe("a red circle", **RUN, **kwargs)[0], dtype=np.int16)


def test_an_image_prompt_changes_the_flux_image(flux):
    models, path = flux
    pipe = diffstudio.Pipeline(models)
    loaded = models.add_ip_adapter(path)
    assert isinstance(loaded.adapter, FluxIPAdapter)
    base = image(pipe)
    red = image(pipe, ip_adapter=diffstudio.ImagePrompt(picture((220, 20, 20)), scale=1.0))
    blue = image(pipe, ip_adapter=diffstudio.ImagePrompt(picture((20, 20, 220)), scale=1.0))
    assert np.abs(red - base).max() > 0 and not np.array_equal(red, blue)
    assert np.array_equal(image(pipe, ip_adapter=diffstudio.ImagePrompt(picture((220, 20, 20)), scale=0.0)), base)
    named = image(pipe, ip_adapter=diffstudio.ImagePrompt(picture((220, 20, 20)), scale=1.0,
                                                          blocks=["double_blocks.0"]))
    assert np.array_equal(named, red)  # the tiny transformer has one double block
    assert np.array_equal(image(pipe), base)  # the model itself is untouched
    with pytest.raises(InvalidInputError, match="style_only"):
        pipe("a red circle", **RUN, ip_adapter=diffstudio.ImagePrompt(picture((0, 0, 0)), style_only=True))



def test_it_composes_with_a_flux_controlnet(flux, tmp_path):
    from safetensors.torch import save_file

    from diffstudio.pipeline.control import ControlNetUnit
    from tests.test_flux_controlnet import hint_picture, tiny_reference_controlnet

    models, path = flux
    pipe = diffstudio.Pipeline(models)
    save_file(tiny_reference_controlnet(zero=False).state_dict(), str(tmp_path / "cn.safetensors"))
    unit = ControlNetUnit(models.add_controlnet(tmp_path / "cn.safetensors"), hint_picture())
    prompt = diffstudio.ImagePrompt(picture((220, 20, 20)), scale=1.0)
    control, both = image(pipe, controlnets=[unit]), image(pipe, controlnets=[unit], ip_adapter=prompt)
    assert not np.array_equal(both, control) and not np.array_equal(both, image(pipe, ip_adapter=prompt))
    off = diffstudio.ImagePrompt(picture((220, 20, 20)), scale=0.0)
    assert np.array_equal(image(pipe, controlnets=[unit], ip_adapter=off), control)


def test_the_unconditional_rows_see_a_black_picture(flux):
    """As diffusers' FluxPipeline does under true CFG (its default negative IP image is np.zeros, uint8)."""
    from diffstudio.pipeline.ip_adapter import image_features, normalise_reference, reference_tokens

    models, path = flux
    loaded = models.add_ip_adapter(path)
    _, negative = reference_tokens(loaded, [picture((220, 20, 20))], None)
    black = normalise_reference(torch.zeros(1, 3, loaded.image_size, loaded.image_size, dtype=torch.uint8))
    with torch.inference_mode():
        expected = loaded.adapter(image_features(loaded.image_encoder, black, "image_embeds"))
        zero_embedding = loaded.adapter(torch.zeros(1, EMBED))
    assert torch.equal(negative, expected) and not torch.equal(negative, zero_embedding)


def test_info_names_the_flux_adapter(flux, capsys):
    from diffstudio.cli import main

    _, path = flux
    assert main(["info", str(path)]) == 0
    assert "flux_ip_adapter" in capsys.readouterr().out
    with pytest.raises(UnknownModelError, match="add it with models.add_ip_adapter"):
        diffstudio.load(path)


def test_named_errors(flux, tmp_path):
    from safetensors.torch import save_file

    from diffstudio.demo.untrained import untrained_demo_models
    from tests.tiny_ipadapter import adapter

    models, path = flux
    sd15 = untrained_demo_models()
    with pytest.raises(IPAdapterMismatchError, match="for FLUX.1"):
        sd15.add_ip_adapter(path)
    unet_adapter = adapter(sd15.unet, "linear")
    save_file({k: v.contiguous() for k, v in unet_adapter.state_dict().items()}, str(tmp_path / "sd15_ip.safetensors"))
    with pytest.raises(IPAdapterMismatchError, match="UNet IP-Adapter.*XLabs"):
        models.add_ip_adapter(tmp_path / "sd15_ip.safetensors", image_encoder=path.parent / "image_encoder")
    save_file(xlabs_state_dict(EMBED, 24, 128, 1), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(IPAdapterMismatchError, match="24 wide.*T5.*32"):
        models.add_ip_adapter(tmp_path / "narrow.safetensors", image_encoder=path.parent / "image_encoder")
    save_file(xlabs_state_dict(EMBED + 1, 32, 128, 1), str(tmp_path / "wide_embeds.safetensors"))
    with pytest.raises(IPAdapterMismatchError, match="ViT-L/14"):
        models.add_ip_adapter(tmp_path / "wide_embeds.safetensors", image_encoder=path.parent / "image_encoder")
