"""CogVideoX image-to-video: the whole pipeline against diffusers' CogVideoXImageToVideoPipeline at tiny random
5B-I2V-style (32 input channels, a learned position table) and 1.5-I2V-style (temporal patches, "ofs") configs,
the named errors both ways, and that the image steers the frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffstudio.errors import InvalidInputError

TOL = 1e-4
SIZE = dict(width=64, height=48)  # the tiny transformers' training size (the 5B-I2V table covers only it)
FRAMES = {"5b-i2v": 9, "1.5-i2v": 5}  # 3 latent frames; 1.5 takes an even count (2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["5b-i2v", "1.5-i2v"])
def tiny(request, tmp_path_factory):
    import diffstudio
    from tests.tiny_cogvideo import reference_models, write_diffusers_folder

    dit, t5, vae = reference_models(request.param)
    folder = write_diffusers_folder(tmp_path_factory.mktemp(f"cogvideox-{request.param}"), dit, t5, request.param)
    models = diffstudio.load(folder)
    models.components["vae"] = vae  # diffusers' 3D VAE stands in for ours (models/cogvideo_vae.py)
    return request.param, models, (dit, t5, vae)


def test_pipeline_latents_match_diffusers(tiny, monkeypatch):
    """diffusers draws the image latents from the VAE posterior; we take its mean (deterministic), so the
    reference is run with the mean too (retrieve_latents' "argmax" mode)."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v
    from diffusers import CogVideoXImageToVideoPipeline

    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.video.cogvideo import CogVideoPipeline
    from tests.tiny_cogvideo import reference_scheduler

    style, models, (dit, t5, vae) = tiny
    assert models.detection.variant == style
    frames = FRAMES[style]
    noise = torch.randn(1, (frames - 1) // 4 + 1, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    image = picture(0)
    got = CogVideoPipeline(models)("a red fox", "blurry", image=image, num_frames=frames, steps=4, cfg_scale=6.0,
                                   latents=noise, output_type="latent", **SIZE)
    original = i2v.retrieve_latents
    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: original(out, sample_mode="argmax"))
    ref = CogVideoXImageToVideoPipeline(tokenizer=load_tokenizer("t5"), text_encoder=t5, vae=vae, transformer=dit,
                                        scheduler=reference_scheduler(style))
    ref.set_progress_bar_config(disable=True)
    expected = ref(image, "a red fox", "blurry", num_frames=frames, num_inference_steps=4, guidance_scale=6.0,
                   latents=noise.clone(), output_type="latent", **SIZE).frames
    assert got.shape == expected.shape == noise.shape
    assert rel_err(got, expected) < TOL


def test_image_latents_scaling_and_padding(tiny):
    """First latent frame = VAE mean x scale (5B-I2V) or / scale (1.5: invert_scale_latents); zeros after it."""
    from diffstudio.video.cogvideo import CogVideoPipeline

    style, models, (_, _, vae) = tiny
    cond = CogVideoPipeline(models).encode_image(picture(0), 64, 48, 3)
    pixels = torch.from_numpy(np.array(picture(0))).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean[:, :, 0]
    expected = mean / 0.7 if style == "1.5-i2v" else mean * 0.7
    assert cond.shape == (1, 3, 16, 6, 8)
    assert rel_err(cond[:, 0], expected) < TOL and not cond[:, 1:].any()


def test_the_image_matters_and_errors_name_the_model(tiny):
    from diffstudio.video.cogvideo import CogVideoPipeline

    style, models, _ = tiny
    pipe = CogVideoPipeline(models)
    args = dict(num_frames=FRAMES[style], steps=2, cfg_scale=1.0, seed=3, output_type="latent", **SIZE)
    a = pipe("a fox", image=picture(0), **args)
    b = pipe("a fox", image=picture(1), **args)
    assert rel_err(a, b) > 1e-3
    with pytest.raises(InvalidInputError, match=f"image-to-video model \\({style}\\).*image="):
        pipe("a fox", **args)


def test_text_to_video_model_refuses_an_image(tmp_path):
    import diffstudio
    from diffstudio.video.cogvideo import CogVideoPipeline
    from tests.tiny_cogvideo import reference_models, write_diffusers_folder

    dit, t5, _ = reference_models("5b")
    models = diffstudio.load(write_diffusers_folder(tmp_path / "t2v", dit, t5, "5b"))
    with pytest.raises(InvalidInputError, match="image-to-video models.*text-to-video model 5b"):
        CogVideoPipeline(models)("a fox", image=picture(0), num_frames=9, steps=1, output_type="latent", **SIZE)


def test_cli_video_takes_the_first_frame(tmp_path):
    """`diffstudio video --model <CogVideoX-I2V folder> --image first.png` writes the frames."""
    import json

    from diffstudio.cli import main
    from tests.tiny_cogvideo import reference_models, write_diffusers_folder

    dit, t5, vae = reference_models("5b-i2v")
    folder = write_diffusers_folder(tmp_path / "i2v", dit, t5, "5b-i2v")
    vae.save_pretrained(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    picture(0).save(tmp_path / "first.png")
    args = ["video", "a fox", "--model", str(folder), "--frames", "9", "--width", "64", "--height", "48",
            "--steps", "1", "--cfg", "1", "--quiet"]
    assert main([*args, "--image", str(tmp_path / "first.png"), "-o", str(tmp_path / "frames")]) == 0
    assert len(list((tmp_path / "frames").glob("*.png"))) == 9
    assert main([*args, "-o", str(tmp_path / "none")]) == 2  # an I2V model without --image: a named error
    assert main([*args, "--image", str(tmp_path / "first.png"), "--smoother", "fastblend",
                 "-o", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("tiny", ["1.5-i2v"], indirect=True)  # only 1.5 patches latent frames in pairs
def test_an_odd_latent_frame_count_of_1_5_is_padded_in_front_as_diffusers_does(tiny, monkeypatch):
    """9 frames = 3 latent frames: CogVideoX 1.5 runs 4 (one more in front, its 2-frame patches need an even
    count) and drops it after sampling; the noise covers the 4. diffusers drops it only when it decodes (its
    output_type="latent" keeps it), so its latents are compared without their first frame."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v
    from diffusers import CogVideoXImageToVideoPipeline

    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.errors import FrameCountError
    from diffstudio.video.cogvideo import CogVideoPipeline
    from tests.tiny_cogvideo import reference_scheduler

    style, models, (dit, t5, vae) = tiny
    noise = torch.randn(1, 4, 16, 6, 8, generator=torch.Generator().manual_seed(2))
    pipe = CogVideoPipeline(models)
    got = pipe("a red fox", "blurry", image=picture(1), num_frames=9, steps=3, cfg_scale=6.0, latents=noise,
               output_type="latent", **SIZE)
    original = i2v.retrieve_latents
    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: original(out, sample_mode="argmax"))
    ref = CogVideoXImageToVideoPipeline(tokenizer=load_tokenizer("t5"), text_encoder=t5, vae=vae, transformer=dit,
                                        scheduler=reference_scheduler(style))
    ref.set_progress_bar_config(disable=True)
    expected = ref(picture(1), "a red fox", "blurry", num_frames=9, num_inference_steps=3, guidance_scale=6.0,
                   latents=noise.clone(), output_type="latent", **SIZE).frames[:, 1:]
    assert got.shape == expected.shape == (1, 3, 16, 6, 8)
    assert rel_err(got, expected) < TOL
    with pytest.raises(FrameCountError, match="even latent frame count"):
        pipe("a red fox", init_video=[picture(0)] * 9, strength=0.5, image=picture(1), num_frames=9, steps=2, **SIZE)
