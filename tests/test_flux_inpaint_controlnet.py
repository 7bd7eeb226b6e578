"""alimama-creative's FLUX.1-dev inpainting ControlNets (Alpha, Beta): a FluxControlNetModel whose
controlnet_x_embedder reads the masked image's packed latent plus the packed mask (64 + 4 wide). The residuals against
diffusers' FluxControlNetModel with that embedder, the hint against alimama's pipeline's recipe (rebuilt from
diffusers' image processors and FluxPipeline._pack_latents), detection from the embedder's width, loading from a
folder and a file, the pipeline, and the named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel

import diffstudio
from diffstudio.control import annotators
from diffstudio.convert.flux_controlnet import flux_controlnet_from_diffusers, flux_controlnet_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.flux_controlnet import derive_flux_controlnet_config, flux_controlnet_config_from_diffusers
from diffstudio.errors import InvalidInputError
from diffstudio.models.flux import image_ids, pack_latents
from diffstudio.models.flux_controlnet import FluxControlNet
from diffstudio.pipeline.control import ControlNetUnit, control_image, latent_hint
from tests.tiny_sd15 import randomise

pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

SMALL = dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
             pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
MASK_CHANNELS = 4  # alimama's extra_condition_channels: one mask channel, 2x2-packed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def alimama_reference(seed: int = 1, **config) -> FluxControlNetModel:
    """diffusers' FluxControlNetModel with alimama's wider input Linear (their class differs from it only there)."""
    ref = FluxControlNetModel(**config).eval()
    ref.controlnet_x_embedder = torch.nn.Linear(config["in_channels"] + MASK_CHANNELS, ref.inner_dim)
    randomise(ref, seed)
    return ref.eval()


def test_residuals_match_diffusers():
    ref = alimama_reference(**SMALL, num_layers=2, num_single_layers=1, guidance_embeds=True)
    sd = flux_controlnet_from_diffusers(ref.state_dict())
    config = derive_flux_controlnet_config(sd, {"axes_dim": [4, 6, 6]})  # 16-wide heads: the split is in no shape
    assert config.extra_condition_channels == MASK_CHANNELS
    assert config == flux_controlnet_config_from_diffusers({**ref.config, "extra_condition_channels": 4})
    ours = FluxControlNet(config).eval()
    ours.load_state_dict(sd, strict=True)
    assert ours.takes_mask
    back = flux_controlnet_to_diffusers(sd, config)
    assert back.keys() == ref.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    latent, hint = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 17, 6, 8, generator=g)
    txt, y, t = torch.randn(2, 5, 24, generator=g), torch.randn(2, 20, generator=g), torch.tensor([0.25, 0.9])
    guidance = torch.tensor([3.5, 1.0])
    from diffusers import FluxPipeline

    with torch.no_grad():
        packed_hint = FluxPipeline._pack_latents(hint, 2, 17, 6, 8)
        expected = ref(hidden_states=pack_latents(latent), controlnet_cond=packed_hint,
                       encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=image_ids(6, 8),
                       txt_ids=torch.zeros(5, 3), guidance=guidance)
        got = ours(latent, hint, t, txt, y, guidance=guidance)
    pairs = list(zip(got["double"] + got["single"],
                     [*expected.controlnet_block_samples, *expected.controlnet_single_block_samples], strict=True))
    print(f"inpainting ControlNet residuals vs diffusers: {max(rel_err(a, b) for a, b in pairs):.1e}")
    assert len(pairs) == 3 and max(rel_err(a, b) for a, b in pairs) < 1e-4
    # The mask channel is read: another mask, other residuals.
    with torch.no_grad():
        other = ours(latent, torch.cat([hint[:, :16], 1 - hint[:, 16:]], 1), t, txt, y, guidance=guidance)
    assert rel_err(other["double"][0], got["double"][0]) > 1e-3


def test_full_size_on_meta():
    """InstantX's FLUX.1-dev ControlNet size (5 double, 10 single blocks) with alimama's 68-wide input Linear: the
    layout maps key for key, and detection reads extra_condition_channels 4 from that Linear's width."""
    config = dict(patch_size=1, in_channels=64, num_layers=5, num_single_layers=10, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        ref = FluxControlNetModel(**config)
        ref.controlnet_x_embedder = torch.nn.Linear(68, 3072)
        theirs = ref.state_dict()
    ours = flux_controlnet_from_diffusers(theirs)
    assert tuple(ours["controlnet_x_embedder.weight"].shape) == (3072, 68)
    found = detect(theirs).components["controlnet"]
    assert found.config == flux_controlnet_config_from_diffusers({**config, "extra_condition_channels": 4})
    with torch.device("meta"):
        built = FluxControlNet(found.config).state_dict()
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in ours.items()}


# -- the hint and the pipeline on a tiny FLUX.1-dev ------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from safetensors.torch import save_file

    from tests.tiny_flux import DIT, reference_models, write_bundle

    root = tmp_path_factory.mktemp("flux_inpaint_cn")
    refs = reference_models("dev")
    models = diffstudio.load(write_bundle(root / "flux.safetensors", *refs))
    ref = alimama_reference(seed=7, **{**DIT, "num_layers": 1, "num_single_layers": 1}, guidance_embeds=True)
    ref.save_pretrained(root / "inpaint")
    config = json.loads((root / "inpaint" / "config.json").read_text())
    config["extra_condition_channels"] = MASK_CHANNELS  # as alimama's class writes its config.json
    (root / "inpaint" / "config.json").write_text(json.dumps(config))
    save_file(ref.state_dict(), str(root / "inpaint.safetensors"))
    return models, refs, {"folder": root / "inpaint", "file": root / "inpaint.safetensors"}


def picture_and_mask():
    g = np.random.default_rng(0)
    picture = (g.random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 12:40] = 255  # white = repaint
    return picture, mask


def test_hint_is_alimamas(flux, monkeypatch):
    """alimama's pipeline (pipeline_flux_controlnet_inpaint.py, prepare_image_with_mask): the image in [-1, 1] with the
    binarised mask's pixels set to -1, its VAE latent ((z - shift) * scale), the mask resized (nearest) to latent size
    and flipped (1 = keep), concatenated, packed. Rebuilt here from diffusers' processors; the VAE's posterior mean."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    models, (_, vae, _, _), paths = flux
    picture, mask = picture_and_mask()
    image = VaeImageProcessor(vae_scale_factor=16).preprocess(Image.fromarray(picture), height=64, width=64)
    mask_t = VaeImageProcessor(vae_scale_factor=16, do_convert_grayscale=True, do_normalize=False,
                               do_binarize=True).preprocess(Image.fromarray(mask), height=64, width=64)
    masked = image.clone()
    masked[(mask_t > 0.5).repeat(1, 3, 1, 1)] = -1
    with torch.no_grad():
        z = vae.encode(masked).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    keep = 1 - torch.nn.functional.interpolate(mask_t, size=(8, 8))
    expected = FluxPipeline._pack_latents(torch.cat([z, keep], 1), 1, 17, 8, 8)

    controlnet = models.add_controlnet(paths["folder"])
    assert controlnet.config.extra_condition_channels == MASK_CHANNELS
    pixels = control_image(annotators.inpaint(picture, mask), None, 64, 64)
    got = controlnet.hint_input(latent_hint(controlnet, pixels, models, False))
    assert got.shape == expected.shape == (1, 16, 68)
    print(f"inpainting hint vs alimama's recipe: {rel_err(got, expected):.1e}")
    assert rel_err(got, expected) < 1e-4
    assert torch.equal(got[..., 64:], expected[..., 64:])  # the mask part exactly


def test_in_the_pipeline(flux):
    models, _, paths = flux
    pipe = diffstudio.Pipeline(models)
    folder, file = models.add_controlnet(paths["folder"]), models.add_controlnet(paths["file"])
    assert folder.config == file.config  # the file's extra channels from the embedder's width
    picture, mask = picture_and_mask()
    hint = annotators.inpaint(picture, mask)
    run = dict(width=64, height=64, steps=2, seed=3, progress=False)
    base = np.asarray(pipe("a red circle", **run)[0], dtype=np.int16)
    masked = np.asarray(pipe("a red circle", **run, controlnets=[ControlNetUnit(folder, hint)])[0], dtype=np.int16)
    assert np.abs(masked - base).max() > 0
    other_mask = np.zeros_like(mask)
    other_mask[:32] = 255
    other = np.asarray(pipe("a red circle", **run, controlnets=[ControlNetUnit(folder, annotators.inpaint(
        picture, other_mask))])[0], dtype=np.int16)
    assert np.abs(other - masked).max() > 0  # the mask matters
    # A plain picture (nothing marked to repaint) is refused by name before the first step.
    with pytest.raises(InvalidInputError, match=r"annotators.inpaint\(image, mask\)"):
        pipe("a red circle", **run, controlnets=[ControlNetUnit(folder, picture)])
