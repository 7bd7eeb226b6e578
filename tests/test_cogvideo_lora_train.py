"""CogVideoX LoRA training (train/cogvideo_lora.py) through the one `train lora` entry point, on a tiny random
CogVideoX (tests/tiny_cogvideo.py) and 9-frame clips built here: the objective against diffusers' training formula
and scheduler, only the adapters learn and a 1-clip overfit lowers the loss, the exported file loads back through
apply_lora (full coverage) and into diffusers' transformer with the trained model's output, exact resume, and the
named errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import diffstudio
from diffstudio.errors import FrameCountError, InvalidInputError, InvalidSizeError
from diffstudio.train.lora import LoRATrainConfig, train_lora

FRAMES, WIDTH, HEIGHT = 9, 64, 48  # 3 latent frames of 6 x 8 (the tiny transformer's sample size)
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", params=["2b", "5b"])
def tiny(request, tmp_path_factory):
    """(style, the model folder with its VAE, diffusers' transformer of the same weights)."""
    import json

    from tests.tiny_cogvideo import reference_models, write_diffusers_folder

    dit, t5, vae = reference_models(request.param)
    folder = write_diffusers_folder(tmp_path_factory.mktemp(f"cogvideox-{request.param}"), dit, t5, request.param)
    vae.save_pretrained(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    return request.param, folder, dit


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One clip of 9 frames (a folder of 64 x 64 PNGs, centre-cropped to 64 x 48) with its caption."""
    from diffstudio.demo.motion_build import write_motion_dataset

    return write_motion_dataset(tmp_path_factory.mktemp("clips"), 1, n_frames=FRAMES, size=64, seed=0)


def _config(data, out, model, **kw) -> LoRATrainConfig:
    kw = {"frames": FRAMES, "width": WIDTH, "height": HEIGHT, "rank": 4, "alpha": 2.0, "steps": 4, "lr": 1e-2,
          "checkpoint_every": 2, **kw}
    return LoRATrainConfig(data=str(data), out=str(out), model=str(model), **kw)


def _inputs(models, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    dim = models.configs["transformer"].text_embed_dim
    return torch.randn(2, 3, 16, 6, 8, generator=g), torch.randn(2, 226, dim, generator=g), torch.tensor([80, 650])


# -- the objective ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_objective_equals_diffusers_training_formula(shift):
    """diffusers' train_cogvideox_lora.py: noisy = scheduler.add_noise(x0, n, t); x0_pred =
    scheduler.get_velocity(v_pred, noisy, t); loss = mean(1 / (1 - abar_t) (x0_pred - x0)^2) on its scheduler (zero
    terminal SNR, snr_shift_scale). Ours is the error of v on our schedule: the same number, t = 999 included."""
    from diffusers import CogVideoXDPMScheduler

    from diffstudio.families.cogvideox import ZeroSNRSchedule
    from diffstudio.train.cogvideo_lora import noised_pair, v_loss
    from tests.tiny_cogvideo import SCHEDULER

    scheduler = CogVideoXDPMScheduler(**SCHEDULER, snr_shift_scale=shift)
    abar = ZeroSNRSchedule(snr_shift_scale=shift).alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, noise, v_pred = (torch.randn(5, 3, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([999, 0, 1, 500, 998])
    x_t, target = noised_pair(abar, x0, noise, t)
    ours = (v_pred - target).pow(2).mean()
    noisy = scheduler.add_noise(x0, noise, t)
    x0_pred = scheduler.get_velocity(v_pred, noisy, t)
    weights = (1 / (1 - scheduler.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    expected = (weights * (x0_pred - x0) ** 2).mean()
    assert rel_err(x_t, noisy) < 1e-5
    assert abs(ours.item() - expected.item()) / expected.item() < 1e-4

    # v_loss draws the noise, then one timestep per clip, from the step's generator, and applies noised_pair
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x, t
        return v_pred

    loss = v_loss(abar, net, x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (5,), generator=gen)
    x_t, target = noised_pair(abar, x0, noise, t)
    assert torch.equal(seen["t"], t) and torch.equal(seen["x"], x_t)
    assert torch.allclose(loss, (v_pred - target).pow(2).mean())


# -- training -----------------------------------------------------------------------------------------------


def test_training_changes_only_the_adapters_and_the_loss_goes_down(tiny, clips, tmp_path):
    """A 1-clip overfit: the v loss over fixed (noise, timestep) draws falls with the exported LoRA applied; the
    transformer's own weights and their requires_grad are as they were."""
    from diffstudio.train.cogvideo_lora import draw_clips, v_loss

    style, folder, _ = tiny
    models = diffstudio.load(str(folder))
    net = models.denoiser
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {k: p.requires_grad for k, p in net.named_parameters()}
    config = _config(clips, tmp_path / "lora.safetensors", folder, steps=40, rank=8, alpha=8.0, lr=3e-3)
    out = train_lora(config, models)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in net.named_parameters()} == grads
    tensors = load_file(str(out))
    layers = {k.rsplit(".lora_", 1)[0] for k in tensors}
    n = models.configs["transformer"].num_layers
    assert layers == {f"transformer.transformer_blocks.{i}.attn1.{p}" for i in range(n)
                      for p in ("to_q", "to_k", "to_v", "to_out.0")}

    data = torch.load(config.work_path() / "cache.pt", weights_only=True)
    assert data["clips"][0]["latents"].shape == (3, 16, 6, 8)
    abar = models.family.schedule.alphas_cumprod()

    def eval_loss(twin) -> float:
        twin.activate()
        total = 0.0
        for step in range(16):
            gen, x0, cond = draw_clips(data, step, 99, 1, 0.0)
            with torch.no_grad():
                total += v_loss(abar, lambda x, t, c=cond: twin.family.call_denoiser(net, x, t, c), x0, gen).item()
        return total / 16

    plain = eval_loss(models)
    trained = models.clone()
    trained.apply_lora(str(out))
    lowered = eval_loss(trained)
    models.activate()
    assert lowered < 0.8 * plain, (plain, lowered)


def test_export_loads_back_with_the_trained_output_in_ours_and_in_diffusers(tiny, clips, tmp_path):
    """The file (alpha 2 of rank 4: the scale folded into B) gives the trained adapters' output: our apply_lora
    (every layer matched) against the checkpoint's adapters put back into the transformer with peft, and diffusers'
    CogVideoXPipeline LoRA loader on its own transformer against ours (< 1e-4)."""
    from diffusers import CogVideoXPipeline

    from diffstudio.train.lora import inject_lora, remove_lora

    style, folder, dit = tiny
    models = diffstudio.load(str(folder))
    config = _config(clips, tmp_path / "lora.safetensors", folder, steps=3)
    out = train_lora(config, models)
    x, context, t = _inputs(models)
    net = models.denoiser

    # the trained adapters, as the checkpoint holds them, back in the transformer
    state = torch.load(config.work_path() / "checkpoint" / "state.pt", weights_only=True)["model"]
    names = sorted({k[len("denoiser."):].rsplit(".lora_", 1)[0] for k in state})
    inject_lora(net, names, 4, 2.0, seed=0)
    missing = net.load_state_dict({k[len("denoiser."):]: v for k, v in state.items()}, strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        trained = net(x, context, t)
    remove_lora(net)
    net.requires_grad_(False)

    twin = models.clone()
    handle = twin.apply_lora(str(out))
    assert handle.report.coverage == 1.0 and handle.report.matched == len(names)
    twin.activate()
    with torch.no_grad():
        ours = net(x, context, t)
    models.activate()
    assert rel_err(ours, trained) < TOL
    with torch.no_grad():
        assert rel_err(net(x, context, t), trained) > 1e-3  # the LoRA does something

    reference = copy.deepcopy(dit)
    CogVideoXPipeline.load_lora_into_transformer(CogVideoXPipeline.lora_state_dict(str(out)), transformer=reference)
    rope = None
    if reference.config.use_rotary_positional_embeddings:
        from tests.test_cogvideo import reference_rope

        rope = reference_rope(models.configs["transformer"], 3, 3, 4)
    with torch.no_grad():
        expected = reference(x, context, t, image_rotary_emb=rope).sample
    assert rel_err(ours, expected) < TOL


def test_killed_and_resumed_equals_uninterrupted(tiny, clips, tmp_path):
    style, folder, _ = tiny
    if style == "5b":
        pytest.skip("the loop's resume does not depend on the position embedding: one style suffices")
    models = diffstudio.load(str(folder))
    whole = train_lora(_config(clips, tmp_path / "whole.safetensors", folder), models)
    config = _config(clips, tmp_path / "resumed.safetensors", folder)
    assert train_lora(config, models, stop_after=3) is None  # killed after 3 of 4 steps
    resumed = train_lora(config, models)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frame_counts_and_other_refusals_are_named(tiny, clips, tmp_path):
    style, folder, _ = tiny
    if style == "5b":
        pytest.skip("the checks do not depend on the style")
    models = diffstudio.load(str(folder))
    for frames in (8, 10, 0):
        with pytest.raises(FrameCountError, match="4k \\+ 1"):
            train_lora(_config(clips, tmp_path / "x.safetensors", folder, frames=frames), models)
    with pytest.raises(FrameCountError, match="has 9 frames"):  # 13 = 4k + 1, but the clip is shorter
        train_lora(_config(clips, tmp_path / "x.safetensors", folder, frames=13), models)
    with pytest.raises(InvalidInputError, match="--width x --height"):
        train_lora(_config(clips, tmp_path / "x.safetensors", folder, resolution=64), models)
    with pytest.raises(InvalidSizeError, match="multiples of 16"):
        train_lora(_config(clips, tmp_path / "x.safetensors", folder, width=72), models)
    assert not (tmp_path / "x.safetensors").exists()


def test_the_image_trainer_refuses_clip_settings(tmp_path):
    from tests import tiny_sd15

    unet, vae, text = tiny_sd15.reference_models()
    base = tiny_sd15.write_single_file(tmp_path / "tiny.safetensors", unet, vae, text)
    (tmp_path / "data").mkdir()
    with pytest.raises(InvalidInputError, match="--frames"):
        train_lora(LoRATrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "x.safetensors"),
                                   model=str(base), frames=9))


def test_the_cli_trains_a_cogvideox_lora(tiny, clips, tmp_path):
    from diffstudio.cli import main

    style, folder, _ = tiny
    if style == "5b":
        pytest.skip("the command line does not depend on the style")
    out = tmp_path / "cli.safetensors"
    assert main(["train", "lora", "--model", str(folder), "--data", str(clips), "--out", str(out), "--frames", "9",
                 "--width", "64", "--height", "48", "--rank", "2", "--steps", "2"]) == 0
    tensors = load_file(str(out))
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert next(v for k, v in tensors.items() if k.endswith("lora_A.weight")).shape[0] == 2
    kohya = tmp_path / "kohya.safetensors"  # the other format: our loader reads it back in full
    assert main(["train", "lora", "--model", str(folder), "--data", str(clips), "--out", str(kohya), "--frames", "9",
                 "--width", "64", "--height", "48", "--rank", "2", "--steps", "2", "--format", "kohya"]) == 0
    assert "lora_unet_transformer_blocks_0_attn1_to_out_0.alpha" in load_file(str(kohya))
    report = diffstudio.load(str(folder)).apply_lora(str(kohya)).report
    assert report.coverage == 1.0 and report.matched == len(tensors) // 2
