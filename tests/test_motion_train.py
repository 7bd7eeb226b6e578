"""Motion module training: only the modules learn, a killed run resumes exactly, the file loads with
add_motion_module and animates the UNet, and the noise schedule is AnimateDiff's linear one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffstudio
from diffstudio.errors import InvalidInputError, ModelNotFoundError, StaleRunError
from diffstudio.motion_loading import add_motion_module
from diffstudio.train.clips import read_clips
from diffstudio.train.motion import MotionTrainConfig, motion_training_info, train_motion, training_prediction
from tests import tiny_sd15

FRAMES = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet, vae, text = tiny_sd15.reference_models()
    return tiny_sd15.write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", unet, vae, text)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three clips of 6 frames (folders of PNGs, metadata.csv): shapes crossing the picture."""
    from diffstudio.demo.motion_build import write_motion_dataset

    return write_motion_dataset(tmp_path_factory.mktemp("clips"), 3, n_frames=6, size=64, seed=0)


def _config(data, out, model, **kw) -> MotionTrainConfig:
    kw = {"frames": FRAMES, "steps": 4, "lr": 1e-2, "resolution": 64, "checkpoint_every": 2, "save_dtype": "fp32", **kw}
    return MotionTrainConfig(data=str(data), out=str(out), model=str(model), **kw)


def _tensors(path) -> dict:
    return load_file(str(path))


def test_a_few_steps_change_only_the_motion_modules(base, clips, tmp_path):
    models = diffstudio.load(str(base))
    unet = models.denoiser
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    grads = {k: p.requires_grad for k, p in unet.named_parameters()}
    out = train_motion(_config(clips, tmp_path / "mm.safetensors", base), models)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the image UNet did not move
    assert {k: p.requires_grad for k, p in unet.named_parameters()} == grads  # and is as it was
    weights = _tensors(out)
    proj_out = [k for k in weights if k.endswith("proj_out.weight")]
    assert proj_out and all(weights[k].abs().max() > 0 for k in proj_out)  # zero-initialised, now trained


def test_each_clip_has_one_noise_level_and_one_context_row_per_frame(base, clips, tmp_path):
    models = diffstudio.load(str(base))
    seen = []
    hook = models.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[1].clone(), kwargs)), with_kwargs=True)
    try:
        train_motion(_config(clips, tmp_path / "mm.safetensors", base, steps=1, batch_size=2), models)
    finally:
        hook.remove()
    t, kwargs = seen[0]
    assert t.shape == (2 * FRAMES,) and kwargs["num_frames"] == FRAMES and kwargs["motion"] is not None
    levels = t.view(2, FRAMES)
    assert torch.equal(levels, levels[:, :1].expand(2, FRAMES))  # frames of a clip share their level
    assert kwargs["context"].shape[0] == 2 * FRAMES


def test_killed_and_resumed_equals_uninterrupted(base, clips, tmp_path):
    whole = train_motion(_config(clips, tmp_path / "whole.safetensors", base))
    cfg = _config(clips, tmp_path / "resumed.safetensors", base)
    assert train_motion(cfg, stop_after=3) is None  # killed after 3 of 4 steps (checkpoint at step 3)
    resumed = train_motion(cfg)
    a, b = _tensors(whole), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_under_another_recipe_is_refused(base, clips, tmp_path):
    cfg = _config(clips, tmp_path / "mm.safetensors", base)
    train_motion(cfg, stop_after=2)
    with pytest.raises(StaleRunError) as err:
        train_motion(_config(clips, tmp_path / "mm.safetensors", base, frames=5, schedule="model"))
    assert "frames: 4 -> 5" in str(err.value) and "schedule: linear -> model" in str(err.value)


def test_the_file_loads_with_add_motion_module_and_animates_the_unet(base, clips, tmp_path):
    out = train_motion(_config(clips, tmp_path / "mm.safetensors", base, save_dtype="fp16", mid_block=True,
                               max_frames=24))
    assert motion_training_info(out)["schedule"] == "linear"
    weights = _tensors(out)
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert "mid_block.motion_modules.0.temporal_transformer.proj_out.weight" in weights  # the released layout
    models = diffstudio.load(str(base))
    motion = add_motion_module(models, out)
    assert motion.config.mid_block and motion.config.max_frames == 24  # the config stored with the weights
    assert all(torch.equal(motion.state_dict()[k].half(), weights[k]) for k in weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * FRAMES, 4, 8, 8, generator=g)
    t = torch.tensor([500.0]).repeat(2 * FRAMES)
    context = torch.randn(2 * FRAMES, 77, 64, generator=g)
    with torch.no_grad():
        still = models.denoiser(x, t, context)
        moving = models.denoiser(x, t, context, motion=motion, num_frames=FRAMES)
    assert (moving - still).abs().max() > 1e-3


def test_the_cli_trains_a_motion_module(base, clips, tmp_path):
    from diffstudio.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["train", "motion", "--model", str(base), "--data", str(clips), "--out", str(out), "--frames", "4",
                 "--steps", "2", "--resolution", "64", "--checkpoint-every", "1"]) == 0
    assert motion_training_info(out)["config"]["frames"] == 4


def test_the_training_schedule_is_animatediffs_linear_betas():
    from diffstudio.families.sd15 import SD15

    betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float64)  # AnimateDiff: beta_schedule "linear"
    expected = torch.from_numpy(np.cumprod(1.0 - betas)).float()
    assert torch.allclose(training_prediction(SD15, "linear").alphas_cumprod, expected, rtol=1e-6)
    scaled = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # SD's own "scaled_linear"
    assert torch.allclose(training_prediction(SD15, "model").alphas_cumprod,
                          torch.from_numpy(np.cumprod(1.0 - scaled)).float(), rtol=1e-6)


def test_clip_folders_read_video_files_and_frame_folders(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(5)]
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:], duration=40)
    (tmp_path / "b.txt").write_text("a gif\n")
    (tmp_path / "a").mkdir()
    for i, frame in enumerate(frames):
        frame.save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a.txt").write_text("a folder")
    (tmp_path / "notes.md").write_text("not a clip")
    assert [(p.name, text) for p, text in read_clips(tmp_path)] == [("a", "a folder"), ("b.gif", "a gif")]
    with pytest.raises(ModelNotFoundError):
        read_clips(tmp_path / "missing")


def test_user_errors_are_named(base, clips, tmp_path):
    with pytest.raises(InvalidInputError, match="position table"):
        train_motion(_config(clips, tmp_path / "mm.safetensors", base, frames=40))
    with pytest.raises(InvalidInputError, match="need 7"):  # 4 frames at stride 2 span 7; the clips have 6
        train_motion(_config(clips, tmp_path / "mm.safetensors", base, stride=2))
    with pytest.raises(InvalidInputError, match="schedule"):
        train_motion(_config(clips, tmp_path / "mm.safetensors", base, schedule="cosine"))
