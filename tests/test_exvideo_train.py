"""Training an ExVideo-SVD extension (train/exvideo.py) on a tiny random SVD with a few tiny clips built here: only
the extension (and, when chosen, the temporal blocks) learns; the written file grafts back onto the base and
reproduces the trained UNet; a run stopped and resumed equals an uninterrupted one bit for bit, EMA included; the
EMA is the average its definition gives; bad data and bad settings raise named errors. (That a fresh extension
leaves the UNet equal to the base is tests/test_exvideo.py's identity-start tests.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffstudio.errors import FrameCountError, InvalidInputError, ModelNotFoundError, StaleRunError
from diffstudio.exvideo_loading import graft_exvideo
from diffstudio.models.exvideo import attach_exvideo
from diffstudio.train.exvideo import train_exvideo, trainable_modules
from diffstudio.train.exvideo_config import ExVideoTrainConfig
from diffstudio.train.exvideo_export import exvideo_training_info
from diffstudio.video.svd_loading import load_svd
from tests.tiny_svd import write_svd_file as write_tiny_svd

pytest.importorskip("accelerate")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_clips(folder, count: int = 2, frames: int = 5, size: int = 32, seed: int = 0):
    """``count`` clips as folders of PNG frames: a square moving across a noisy background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(count):
        clip = folder / f"clip{c}"
        clip.mkdir()
        background = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for i in range(frames):
            frame = background.copy()
            frame[8:16, 2 + 3 * i:10 + 3 * i] = (255, 40 * c, 0)
            Image.fromarray(frame).save(clip / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_svd(tmp_path_factory.mktemp("svd") / "svd_tiny.safetensors")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips") / "videos")


def config(base, clips, out, **changes) -> ExVideoTrainConfig:
    settings = dict(data=str(clips), out=str(out), model=str(base), frames=4, width=32, height=32, steps=2,
                    lr=1e-3, save_dtype="fp32", checkpoint_every=1)
    return ExVideoTrainConfig(**{**settings, **changes})


def unet_inputs(frames: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, frames, 8, 16, 16, generator=g), torch.tensor([0.3]), torch.randn(1, 1, 24, generator=g),
            torch.tensor([[29.0, 127.0, 0.02]]))


@pytest.mark.parametrize("temporal,precision,checkpointing", [(False, "bf16", False), (True, "fp32", True)],
                         ids=["tables-and-convs-bf16", "with-temporal-blocks-checkpointed"])
def test_only_the_extension_learns(base, clips, tmp_path, temporal, precision, checkpointing):
    models = load_svd(base)
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    flags = {k: p.requires_grad for k, p in models.unet.named_parameters()}
    cfg = config(base, clips, tmp_path / "ext.safetensors", temporal=temporal, precision=precision,
                 gradient_checkpointing=checkpointing, steps=1 if precision == "bf16" else 2)
    assert train_exvideo(cfg, models) is not None
    after = models.unet.state_dict()
    trainable = {f"{prefix}.{name}" for prefix, module in models.unet.named_modules()
                 if any(module is m for m in trainable_modules(models.unet, temporal))
                 for name, _ in module.named_parameters()}
    new = set(after) - set(before)
    assert new and all(".exvideo." in k for k in new)                       # the tables and convolutions
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable                                             # nothing frozen moved
    assert bool(changed) == temporal                                        # the temporal blocks moved iff chosen
    fresh = attach_exvideo(load_svd(base).unet, positions=4).state_dict()   # the identity start
    assert all(not torch.equal(fresh[k], after[k]) for k in new)            # every table and conv learned
    assert {k: p.requires_grad for k, p in models.unet.named_parameters() if k in flags} == flags  # put back
    assert models.unet.gradient_checkpointing is False


@pytest.mark.parametrize("temporal", [True, False], ids=["with-temporal-blocks", "tables-and-convs"])
def test_the_file_grafts_back_and_reproduces_the_trained_unet(base, clips, tmp_path, temporal):
    models = load_svd(base)
    out = train_exvideo(config(base, clips, tmp_path / "ext.safetensors", temporal=temporal), models)
    file = load_file(out)
    assert all(k.startswith("blocks.") for k in file)
    assert any("attn1.to_q" in k for k in file) == temporal                 # the release's layout, with or without
    info = exvideo_training_info(out)
    assert info["recipe"]["temporal"] == temporal and info["recipe"]["frames"] == 4 and info["final_loss"] > 0
    reloaded = load_svd(base, out).unet                                     # diffstudio.load(svd, ext)'s path
    grafted = graft_exvideo(load_svd(base).unet, file)
    with torch.no_grad():
        trained = models.unet(*unet_inputs())
        assert torch.equal(reloaded(*unet_inputs()), trained)
        assert torch.equal(grafted(*unet_inputs()), trained)
        assert not torch.equal(load_svd(base).unet(*unet_inputs()), trained)


def test_continuing_a_full_extension_with_tables_only_keeps_its_temporal_weights(base, clips, tmp_path):
    """--init a file with temporal weights, train only the tables: the new file carries the init's temporal weights
    (frozen) with the trained tables, and reproduces the trained UNet."""
    first = train_exvideo(config(base, clips, tmp_path / "first.safetensors", steps=1))
    models = load_svd(base)
    out = train_exvideo(config(base, clips, tmp_path / "second.safetensors", init=str(first), temporal=False), models)
    a, b = load_file(first), load_file(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) == (".positional_" not in k or "_proj" in k) for k in a)
    with torch.no_grad():
        assert torch.equal(load_svd(base, out).unet(*unet_inputs()), models.unet(*unet_inputs()))
    with pytest.raises(InvalidInputError, match="position tables of 4 rows"):
        train_exvideo(config(base, clips, tmp_path / "third.safetensors", init=str(first), positions=6))


def test_stopped_and_resumed_equals_uninterrupted_with_ema(base, clips, tmp_path):
    whole = config(base, clips, tmp_path / "whole.safetensors", steps=4, ema_decay=0.8, noise_aug=0.05)
    train_exvideo(whole, load_svd(base))
    parts = replace(whole, out=str(tmp_path / "parts.safetensors"))
    assert train_exvideo(parts, load_svd(base), stop_after=3) is None       # killed after its third step
    assert not (tmp_path / "parts.safetensors").exists()
    train_exvideo(parts, load_svd(base))                                    # a new process resumes
    a, b = load_file(whole.out), load_file(parts.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert exvideo_training_info(whole.out)["final_loss"] == exvideo_training_info(parts.out)["final_loss"]
    with pytest.raises(StaleRunError, match="lr"):                          # another recipe does not resume it
        train_exvideo(replace(parts, lr=2e-3, steps=5), load_svd(base))


def test_the_exported_ema_is_the_average_of_the_steps(base, clips, tmp_path):
    """decay d over two steps from p0: ema = d^2 p0 + d (1 - d) p1 + (1 - d) p2, with p1 read from the checkpoint
    of a run stopped after one step and p2 the weights at the end."""
    d, name = 0.5, "input_blocks.1.1.exvideo.conv.weight"
    cfg = config(base, clips, tmp_path / "ema.safetensors", temporal=False, ema_decay=d)
    p0 = attach_exvideo(load_svd(base).unet, positions=4).state_dict()[name]
    models = load_svd(base)
    train_exvideo(cfg, models, stop_after=1)
    p1 = torch.load(cfg.work_path() / "checkpoint" / "state.pt", weights_only=True)["model"][f"unet.{name}"]
    train_exvideo(cfg, models)
    p2 = models.unet.state_dict()[name]
    file = load_file(cfg.out)
    ours = file["blocks.7.positional_conv.weight"]                          # DiffSynth's name of input_blocks.1.1
    expected = d * d * p0 + d * (1 - d) * p1 + (1 - d) * p2
    assert not torch.equal(p1, p2) and torch.allclose(ours, expected, atol=1e-7)


def test_bad_data_and_settings_are_named(base, clips, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no clips"):
        train_exvideo(config(base, empty, tmp_path / "x.safetensors"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        train_exvideo(config(base, tmp_path / "nowhere", tmp_path / "x.safetensors"))
    with pytest.raises(FrameCountError, match="clip0 has 5 frames"):
        train_exvideo(config(base, clips, tmp_path / "x.safetensors", frames=6, positions=8))
    with pytest.raises(FrameCountError, match="position tables"):
        train_exvideo(config(base, clips, tmp_path / "x.safetensors", frames=4, positions=3))
    with pytest.raises(InvalidInputError, match="--model"):
        train_exvideo(config(base, clips, tmp_path / "x.safetensors", model=None))
    with pytest.raises(InvalidInputError, match="multiples of 2"):
        train_exvideo(config(base, clips, tmp_path / "x.safetensors", width=33))
    with pytest.raises(InvalidInputError, match="sigma_sampling"):
        train_exvideo(config(base, clips, tmp_path / "x.safetensors", sigma_sampling="uniform"))


def test_command_line_trains_and_the_file_loads(base, clips, tmp_path, capsys):
    import diffstudio
    from diffstudio.cli import main

    out = tmp_path / "cli.safetensors"
    code = main(["train", "exvideo", "--model", str(base), "--data", str(clips), "--frames", "4", "--width", "32",
                 "--height", "32", "--steps", "1", "--tables-only", "--sigma-sampling", "karras",
                 "--loss-weighting", "exvideo", "--target-scale", "1.01", "--out", str(out)])
    assert code == 0 and "wrote" in capsys.readouterr().out
    recipe = exvideo_training_info(out)["recipe"]
    assert (recipe["temporal"], recipe["sigma_sampling"], recipe["loss_weighting"]) == (False, "karras", "exvideo")
    assert load_file(out)["blocks.7.positional_embedding.embeddings"].dtype == torch.float16  # as the release
    models = diffstudio.load(str(base), str(out))
    assert models.unet.video_transformers()[0].exvideo.embeddings.shape[0] == 4


def test_the_exvideo_128_preset_of_img2vid(base, clips, tmp_path, capsys):
    """The preset is the release's recipe (DiffSynth-Studio's ExVideo_svd_test.py), explicit options override it,
    it refuses to run without an extension, and it renders through a trained extension (at a tiny size)."""
    from diffstudio.cli import build_parser, main
    from diffstudio.video.img2vid_cli import PRESETS, pipeline_settings
    from diffstudio.video.svd import EXVIDEO_128F

    assert PRESETS["exvideo-128"] == EXVIDEO_128F == dict(
        num_frames=128, width=512, height=512, steps=50, fps=30, motion_bucket_id=127, min_cfg=2.0, max_cfg=2.0,
        post_normalize=True, contrast=1.2)
    args = build_parser().parse_args(["img2vid", "in.png", "--model", "m", "--preset", "exvideo-128", "--steps", "3"])
    assert pipeline_settings(args) == {**EXVIDEO_128F, "steps": 3}
    plain = build_parser().parse_args(["img2vid", "in.png", "--model", "m"])
    assert pipeline_settings(plain) == {"contrast": 1.0, "post_normalize": False}  # the pipeline's own defaults
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    code = main(["img2vid", str(image), "--model", str(base), "--preset", "exvideo-128", "-o", str(tmp_path / "a")])
    assert code == 2 and "--extension" in capsys.readouterr().err
    ext = train_exvideo(config(base, clips, tmp_path / "ext.safetensors", steps=1, temporal=False))
    out = tmp_path / "frames"
    code = main(["img2vid", str(image), "--model", str(base), "--extension", str(ext), "--preset", "exvideo-128",
                 "--frames", "3", "--width", "32", "--height", "32", "--steps", "2", "-o", str(out), "--quiet"])
    assert code == 0 and len(list(out.glob("*.png"))) == 3


def test_latent_post_processing():
    """post_normalize: every frame gets the clip's mean and std; contrast scales the result."""
    from diffstudio.video.svd import post_process

    latents = torch.randn(1, 3, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1, 1) + 0.3
    out = post_process(latents, True, 1.0)
    for frame in out[0]:
        assert torch.allclose(frame.mean(), latents.mean(), atol=1e-5)
        assert torch.allclose(frame.std(), latents.std(), atol=1e-5)
    assert torch.allclose(post_process(latents, True, 1.2), 1.2 * out)
    assert torch.equal(post_process(latents, False, 1.0), latents)
