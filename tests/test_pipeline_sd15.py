"""The generic pipeline on a tiny random SD 1.x: parity with diffusers' StableDiffusionPipeline,
and the behaviours a user relies on (seeds, batches, sizes, img2img, inpainting, recipes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffstudio
from tests.tiny_sd15 import reference_models, write_diffusers_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("pipe") / "sd15", *reference_models())


@pytest.fixture(scope="module")
def pipe(folder):
    return diffstudio.Pipeline(diffstudio.load(folder))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def test_txt2img_matches_diffusers_pipeline(folder, pipe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from diffstudio.sampling.noise import SeededNoise

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="linspace")
    ref.set_progress_bar_config(disable=True)
    steps, cfg = 6, 5.0
    ref.scheduler.set_timesteps(steps)
    sigmas = ref.scheduler.sigmas.tolist()
    noise = SeededNoise([3], (4, 8, 8), dtype=torch.float32, device="cpu").initial()
    # diffusers multiplies its start latents by init_noise_sigma; ours start at noise * sigmas[0].
    start = noise * sigmas[0] / float(ref.scheduler.init_noise_sigma)
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=steps, guidance_scale=cfg,
                   height=64, width=64, latents=start, output_type="np").images[0]
    ours = pipe("a red circle", "blue", width=64, height=64, cfg_scale=cfg, seed=3, sampler="euler",
                sigmas=sigmas, progress=False)[0]
    # Compare before 8-bit rounding: decode our latents' image as float from the PIL image is rounded,
    # so allow one quantisation step plus the requested 1e-3.
    diff = np.abs(arr(ours) / 255.0 - expected).max()
    assert diff < 1e-3 + 1 / 255


def test_same_seed_same_image_and_batch_items_equal_single_runs(pipe):
    a = pipe("a red circle", width=64, height=64, steps=4, seed=7, progress=False)[0]
    b = pipe("a red circle", width=64, height=64, steps=4, seed=7, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))
    batch = pipe("a red circle", width=64, height=64, steps=4, seed=7, batch_size=2, progress=False)
    second = pipe("a red circle", width=64, height=64, steps=4, seed=8, progress=False)[0]
    # Batched matmuls round differently from single ones: equal up to one 8-bit step.
    assert np.abs(arr(batch[0]) - arr(a)).max() <= 1
    assert np.abs(arr(batch[1]) - arr(second)).max() <= 1
    assert not np.array_equal(arr(batch[0]), arr(batch[1]))


@pytest.mark.parametrize("size", [(60, 64), (64, 0), (-8, 64)])
def test_sizes_that_are_not_multiples_of_8_are_refused(pipe, size):
    with pytest.raises(diffstudio.InvalidSizeError, match="multiples of 8"):
        pipe("x", width=size[0], height=size[1], steps=2, progress=False)


def test_img2img_strength_controls_how_much_changes(pipe):
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    low = pipe("a square", init_image=init, strength=0.1, steps=10, seed=1, progress=False)[0]
    high = pipe("a square", init_image=init, strength=0.9, steps=10, seed=1, progress=False)[0]
    recon = pipe.decode_latents(pipe.encode_images(
        diffstudio.io.images.images_to_tensor([init]), None), None)
    recon_img = diffstudio.io.images.tensor_to_images(recon)[0]
    d_low = np.abs(arr(low) - arr(recon_img)).mean()
    d_high = np.abs(arr(high) - arr(recon_img)).mean()
    assert d_low < d_high


def test_inpainting_keeps_pixels_outside_the_mask(pipe):
    init = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    out = pipe("a star", init_image=init, mask=Image.fromarray(mask), strength=1.0, steps=6, seed=2,
               progress=False)[0]
    outside = mask == 0
    assert np.array_equal(arr(out)[outside], arr(init)[outside])
    assert np.abs(arr(out)[~outside] - arr(init)[~outside]).mean() > 5


def test_nine_channel_inpainting_unet_runs(tmp_path):
    models_dir = write_diffusers_folder(tmp_path / "inpaint", *reference_models(in_channels=9))
    pipe = diffstudio.Pipeline(diffstudio.load(models_dir))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = pipe("x", init_image=init, mask=mask, steps=3, seed=0, progress=False)[0]
    assert np.array_equal(arr(out)[:, 32:], arr(init)[:, 32:])
    # txt2img with an inpainting UNet: everything is "masked".
    assert pipe("x", width=64, height=64, steps=2, progress=False)[0].size == (64, 64)


def test_every_sampler_and_scheduler_runs(pipe):
    from diffstudio.sampling import SAMPLERS
    from diffstudio.sampling.schedules import SCHEDULERS

    for sampler in SAMPLERS:
        img = pipe("a circle", width=64, height=64, steps=3, sampler=sampler, seed=0, progress=False)[0]
        assert np.isfinite(arr(img)).all()
    for scheduler in [name for name in SCHEDULERS if name != "flow"]:
        img = pipe("a circle", width=64, height=64, steps=3, scheduler=scheduler, seed=0, progress=False)[0]
        assert img.info["diffstudio_recipe"]["scheduler"] == scheduler
    with pytest.raises(ValueError, match="Flow denoiser"):  # flow schedules are for flow models only
        pipe("a circle", width=64, height=64, steps=3, scheduler="flow", progress=False)


def test_long_prompts_reach_the_encoder(pipe):
    cond, _ = pipe.encode_prompts(["word " * 100 + "red"], [""], clip_skip=1)
    assert cond["context"].shape[1] == 154


def test_clip_skip_changes_the_conditioning(pipe):
    c1, _ = pipe.encode_prompts(["a red circle"], [""], clip_skip=1)
    c2, _ = pipe.encode_prompts(["a red circle"], [""], clip_skip=2)
    assert not torch.allclose(c1["context"], c2["context"])


def test_png_recipe_round_trip(pipe, tmp_path):
    from diffstudio.io.recipe import read_recipe, save_png

    image = pipe("a red circle", "blurry", width=64, height=64, steps=3, seed=11, progress=False)[0]
    path = tmp_path / "out.png"
    save_png(image, path, image.info["diffstudio_recipe"])
    recipe = read_recipe(path)
    assert recipe["prompt"] == "a red circle" and recipe["seed"] == 11 and recipe["steps"] == 3
    with Image.open(path) as reopened:
        params = reopened.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\nSteps: 3")
    assert "Seed: 11" in params and "Size: 64x64" in params


def test_tiled_vae_path_runs_and_matches_when_one_tile_covers_the_image(pipe):
    plain = pipe("a circle", width=64, height=64, steps=3, seed=4, progress=False)[0]
    tiled = pipe("a circle", width=64, height=64, steps=3, seed=4, tiled_vae=True, progress=False)[0]
    assert np.abs(arr(plain) - arr(tiled)).max() <= 1


def test_a_mask_without_an_init_image_is_a_named_error(pipe):
    with pytest.raises(diffstudio.InvalidInputError, match="init_image"):
        pipe("x", width=64, height=64, steps=2, mask=Image.new("L", (64, 64), 255), progress=False)
