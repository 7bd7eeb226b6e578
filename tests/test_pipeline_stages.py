"""The generation stages: a request resolved and checked, denoiser modules composed in order, models that own
their patches (clones share weights, not LoRAs), and one prediction object per type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import DiffstudioError, InvalidInputError
from diffstudio.pipeline.modules import GUIDANCE, NETWORK, OUTPUT, Wrapper
from diffstudio.pipeline.request import Request
from tests.test_lora_patcher import lora_file, run, state

SMALL = dict(width=64, height=64, steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


# -- the request: every value a user can get wrong is a named error ------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "steps"), (dict(steps=-5), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(strength=0.5), "init_image"), (dict(sampler="eulr"), "euler_ancestral"),
    (dict(scheduler="karas"), "karras"), (dict(clip_skip=99), "clip_skip"), (dict(clip_skip=0), "clip_skip"),
    (dict(width=65), "multiples of 8"), (dict(sigmas=[1.0, 2.0, 0.0]), "decreasing"),
])
def test_bad_request_values_raise_named_errors_that_say_what_to_pass(pipe, kwargs, words):
    with pytest.raises(DiffstudioError, match=words):
        Request("a red circle", **kwargs).resolve(pipe.models)


def test_strength_outside_its_range_and_a_mask_of_another_shape_are_refused(pipe):
    image = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(InvalidInputError, match="strength"):
        Request("x", init_image=image, strength=1.5).resolve(pipe.models)
    with pytest.raises(InvalidInputError, match="aspect"):
        Request("x", init_image=image, mask=np.zeros((32, 64), np.uint8)).resolve(pipe.models)
    # the same aspect ratio at another scale is resized, not refused
    r = Request("x", init_image=image, mask=np.zeros((32, 32), np.uint8)).resolve(pipe.models)
    assert r.mask.shape[-2:] == (64, 64) and r.strength == 0.75


def test_custom_sigmas_are_what_the_recipe_records(pipe):
    image = pipe("a red circle", sigmas=[10.0, 5.0, 1.0, 0.0], **{k: v for k, v in SMALL.items() if k != "steps"})[0]
    recipe = image.info["diffstudio_recipe"]
    assert recipe["steps"] == 3 and recipe["scheduler"] == "custom" and recipe["sigmas"] == [10.0, 5.0, 1.0, 0.0]


# -- modules --------------------------------------------------------------------------------------------


class CountingModule:
    """A network-stage module: counts the calls and the rows it sees, and scales x0 by nothing."""

    order = NETWORK

    def __init__(self):
        self.rows = []

    def wrap(self, denoiser, gen):
        module = self

        class Counting(Wrapper):
            def __call__(self, x, sigma, **cond):
                module.rows.append(x.shape[0])
                return self.inner(x, sigma, **cond)

        return Counting(denoiser)

    def recipe(self):
        return {"counted": len(self.rows)}


class ShiftX0:
    """An output-stage module: adds a constant to the final x0 (visible in the image)."""

    order = OUTPUT

    def wrap(self, denoiser, gen):
        class Shift(Wrapper):
            def __call__(self, x, sigma, **cond):
                return self.inner(x, sigma, **cond) + 100.0

        return Shift(denoiser)


def test_a_module_wraps_the_network_call_at_its_stage_and_adds_to_the_recipe(pipe):
    counting = CountingModule()
    image = pipe("a red circle", cfg_scale=3.0, modules=[counting], **SMALL)[0]
    assert counting.rows == [2, 2]  # before guidance: cond and uncond rows in one call, once per step
    assert image.info["diffstudio_recipe"]["extra"]["counted"] == 2
    plain = np.asarray(pipe("a red circle", cfg_scale=3.0, **SMALL)[0], dtype=float)
    shifted = np.asarray(pipe("a red circle", cfg_scale=3.0, modules=[ShiftX0()], **SMALL)[0], dtype=float)
    assert np.abs(plain - shifted).mean() > 10


def test_exactly_one_guidance_module_runs(pipe):
    class ExtraGuidance:
        order = GUIDANCE

        def wrap(self, denoiser, gen):
            return denoiser

    with pytest.raises(ValueError, match="exactly one guidance"):
        pipe("a red circle", modules=[ExtraGuidance()], **SMALL)


# -- models own their patches ---------------------------------------------------------------------------


def test_clones_share_weights_but_not_loras():
    base = untrained_demo_models()
    before, out_before = state(base), run(base)
    a, b = base.clone(), base.clone()
    assert a.unet is base.unet  # no weight is copied
    a.apply_lora(lora_file(0), 1.0)
    b.apply_lora(lora_file(10), 0.5)
    out_a, out_b = run(a.activate()), run(b.activate())
    assert not torch.equal(out_a[0], out_b[0])
    assert torch.equal(run(a.activate())[0], out_a[0])  # switching back recomputes the same weights
    base.activate()
    assert all(torch.equal(x, y) for x, y in zip(run(base), out_before))
    after = state(base)
    assert all(torch.equal(before[r][k], after[r][k]) for r in before for k in before[r])
    assert base.loras == [] and len(a.loras) == len(b.loras) == 1


def test_a_clone_keeps_its_own_strength_and_removal():
    base = untrained_demo_models()
    handle = base.apply_lora(lora_file(0), 1.0)
    clone = base.clone()
    (twin,) = clone.loras
    twin.set_strength(0.0)
    clone.activate()
    out_clone = run(clone)
    base.activate()
    out_base = run(base)
    handle.remove()
    assert torch.equal(out_clone[0], run(base)[0])  # strength 0 on the clone = no LoRA
    assert not torch.equal(out_base[0], out_clone[0])  # the base kept its LoRA at 1.0 until removed


def test_prompt_lora_tags_apply_for_that_call_only(tmp_path):
    from safetensors.torch import save_file

    save_file(lora_file(0), str(tmp_path / "style.safetensors"))
    models = untrained_demo_models()
    pipe = diffstudio.Pipeline(models, lora_dirs=[tmp_path])
    plain = np.asarray(pipe("a red circle", **SMALL)[0], dtype=float)
    tagged = pipe("a red circle <lora:style:1>", **SMALL)[0]
    assert np.abs(np.asarray(tagged, dtype=float) - plain).max() > 0
    assert tagged.info["diffstudio_recipe"]["extra"]["loras"][0]["name"] == "style.safetensors"
    assert models.loras == []
    assert np.array_equal(np.asarray(pipe("a red circle", **SMALL)[0], dtype=float), plain)


def test_the_same_lora_file_twice_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file(lora_file(0), str(path))
    models = untrained_demo_models()
    models.apply_lora(path, 0.8)
    with pytest.raises(InvalidInputError, match="already applied"):
        models.apply_lora(path, 0.8)


def test_models_have_a_short_repr():
    text = repr(untrained_demo_models())
    assert text.startswith("Models(sd15") and "unet=UNetModel" in text and len(text) < 300


def test_no_process_global_patch_registries():
    import diffstudio.patches.apply as apply
    import diffstudio.patches.patcher as patcher

    assert not hasattr(apply, "_ACTIVE") and not hasattr(patcher, "_PATCHERS")


# -- prediction objects ---------------------------------------------------------------------------------


def test_discrete_training_input_is_the_sampling_noise_seen_by_the_network():
    """The VP training sample equals network_input(noise_scaling(sigma_t)) — one arithmetic, two forms."""
    from diffstudio.families.sd15 import SD15
    from diffstudio.sampling.prediction import prediction_for

    pred = prediction_for(SD15)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_train, t_train = pred.training_input(x0, noise, t)
    sigma = pred.t_to_sigma(t).float()
    x_net, t_net = pred.network_input(pred.noise_scaling(sigma, noise, x0), sigma)
    assert torch.allclose(x_train, x_net, atol=1e-5) and torch.allclose(t_train, t_net, atol=1e-3)


def test_training_arithmetic_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    from diffstudio.families.sd15 import SD15
    from diffstudio.sampling.prediction import V, prediction_for

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 250, 600, 998])
    eps = prediction_for(SD15)
    v = V(betas=sched.betas.double())
    x_t, _ = eps.training_input(x0, noise, t)
    assert torch.allclose(x_t, sched.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(v.training_target(x0, noise, t), sched.get_velocity(x0, noise, t), atol=1e-5)
    for pred, out in ((eps, noise), (v, sched.get_velocity(x0, noise, t))):  # the exact output gives x0 back
        assert torch.allclose(pred.training_x0(x_t, t, out), x0, atol=1e-3)


def test_flow_training_input_and_target():
    from diffstudio.sampling.prediction import Flow

    pred = Flow(shift=3.0, multiplier=1000.0)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    s = torch.tensor([0.25, 0.75])
    x_t, t = pred.training_input(x0, noise, s)
    assert torch.allclose(x_t[1], 0.25 * x0[1] + 0.75 * noise[1]) and torch.allclose(t, s * 1000)
    assert torch.allclose(pred.training_x0(x_t, s, pred.training_target(x0, noise, s)), x0, atol=1e-6)


def test_a_ckpt_copy_of_the_demo_model_keeps_its_defaults(tmp_path):
    """A pickle has no metadata: the demo model is recognised by its denoiser's structure instead."""
    from diffstudio.io.state_dict import read_state_dict
    from diffstudio.loader import default_model_path

    path = tmp_path / "demo.ckpt"
    torch.save({"state_dict": dict(read_state_dict(default_model_path()))}, path)
    assert diffstudio.load(path).defaults == diffstudio.load().defaults == {
        "width": 64, "height": 64, "steps": 20, "cfg_scale": 3.0}


def test_the_network_never_sees_what_modules_pass_each_other():
    from dataclasses import replace

    from diffstudio.pipeline.denoiser import LOCATION_KEYS, network_fn

    models = untrained_demo_models()
    seen = {}

    def spy(net, x, t, cond):
        seen.update(cond)
        return x

    models.family = replace(models.family, call_denoiser=spy)
    network_fn(models)(torch.zeros(2, 4, 8, 8), torch.zeros(2), context=torch.zeros(2, 77, 64), tile=(0, 0, 8, 8),
                       frames=torch.arange(2), negative_rows=torch.tensor([False, True]))
    assert set(seen) == {"context"} and set(LOCATION_KEYS) == {"tile", "frames", "negative_rows"}


def test_a_prompt_tag_for_a_lora_the_model_has_sets_its_strength_for_that_call(tmp_path):
    from safetensors.torch import save_file

    save_file(lora_file(0), str(tmp_path / "style.safetensors"))
    models = untrained_demo_models()
    handle = models.apply_lora(tmp_path / "style.safetensors", 1.0)
    pipe = diffstudio.Pipeline(models, lora_dirs=[tmp_path])
    at_one = np.asarray(pipe("a red circle", **SMALL)[0], dtype=float)
    tagged = pipe("a red circle <lora:style:0>", **SMALL)[0]
    assert tagged.info["diffstudio_recipe"]["extra"]["loras"][0]["strength"] == 0.0
    handle.set_strength(0.0)
    assert np.array_equal(np.asarray(tagged, dtype=float), np.asarray(pipe("a red circle", **SMALL)[0], dtype=float))
    assert handle.strength == 0.0 and len(models.loras) == 1
    handle.set_strength(1.0)
    assert np.array_equal(np.asarray(pipe("a red circle", **SMALL)[0], dtype=float), at_one)
