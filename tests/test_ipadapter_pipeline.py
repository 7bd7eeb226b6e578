"""Image prompts in the pipeline: a prompt that adds nothing gives the base image bit for bit (scale 0, a start/end
outside the run), a run without the prompt after one with it is the base again, the references are encoded once
per run, the unconditional rows get the zero image's tokens, weights average the references' features,
style_only changes only the style blocks, the recipe records the prompts, and errors are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.ipadapter_loading import LoadedIPAdapter
from diffstudio.pipeline.control import ControlNetUnit
from diffstudio.pipeline.ip_adapter import ImagePromptDenoiser, _Active, reference_tokens
from diffstudio.pipeline.modules import NEGATIVE_ROWS
from tests.tiny_ipadapter import adapter, vision_encoder

RUN = dict(width=64, height=64, steps=3, seed=4, cfg_scale=3.0, progress=False)


def picture(colour) -> np.ndarray:
    out = np.full((48, 64, 3), 255, np.uint8)
    out[8:40, 10:40] = colour
    return out


RED, BLUE = picture((220, 20, 20)), picture((20, 20, 220))


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


@pytest.fixture(scope="module")
def loaded(pipe):
    return LoadedIPAdapter(adapter(pipe.models.unet, "linear"), vision_encoder(), "tiny-ip.safetensors", "tiny")


@pytest.fixture(scope="module")
def plus(pipe):
    return LoadedIPAdapter(adapter(pipe.models.unet, "resampler"), vision_encoder(), "tiny-plus.bin", "tiny")


def image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe("a red circle", **RUN, **kwargs)[0], dtype=np.int16)


def test_prompts_that_add_nothing_give_the_base_image_bit_for_bit(pipe, loaded):
    base = image(pipe)
    assert np.array_equal(image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=0.0, model=loaded)), base)
    late = diffstudio.ImagePrompt(RED, scale=1.0, start=0.95, end=1.0, model=loaded)  # the last call is at step 3
    assert np.array_equal(image(pipe, ip_adapter=late), base)
    with_prompt = image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, model=loaded))
    assert np.abs(with_prompt - base).max() > 0
    assert np.array_equal(image(pipe), base)  # the model is untouched: without the prompt it is the base again


def test_references_are_encoded_once_per_run(pipe, plus):
    calls = []
    handle = plus.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        image(pipe, ip_adapter=diffstudio.ImagePrompt([RED, BLUE], scale=1.0, model=plus))
    finally:
        handle.remove()
    assert len(calls) == 2  # the two references in one batch, then the zero image (Plus reads hidden states)


def test_weights_make_the_weighted_mean_of_the_features(pipe, loaded, plus):
    """weights [1, 3] -> the tokens of 0.25 f(red) + 0.75 f(blue), each reference's features computed alone."""
    from diffstudio.pipeline.ip_adapter import clip_pixels, image_features

    for model in (loaded, plus):
        kind = model.adapter.config.image_features
        with torch.inference_mode():
            red, blue = (image_features(model.image_encoder, clip_pixels(p, model.image_size)[None], kind)
                         for p in (RED, BLUE))
            expected = model.adapter(0.25 * red + 0.75 * blue)
        mixed, _ = reference_tokens(model, [RED, BLUE], [1, 3])
        assert torch.allclose(mixed, expected, atol=1e-5)
        only_red, _ = reference_tokens(model, [RED, BLUE], [1, 0])
        assert torch.allclose(only_red, reference_tokens(model, [RED], None)[0], atol=1e-5)
        assert not torch.allclose(mixed, only_red, atol=1e-3)
    one = image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, model=loaded))
    assert not np.array_equal(image(pipe, ip_adapter=diffstudio.ImagePrompt([RED, BLUE], scale=1.0, model=loaded)), one)


def test_unconditional_rows_get_the_zero_image_tokens(loaded, plus):
    """The network call sees the reference's tokens on the conditional rows and the zero image's on the others."""
    seen = {}

    class Network:
        kind = "eps"

        def __call__(self, x, sigma, **cond):
            seen.update(cond)
            return x

    for model in (loaded, plus):
        positive, negative = reference_tokens(model, [RED], None)
        n = len(model.adapter.config.layer_widths)
        active = _Active(model.adapter, positive, negative, [1.0] * n, 10.0, 0.0)
        wrapped = ImagePromptDenoiser(Network(), [active])
        rows = torch.tensor([False, False, True, True])
        wrapped(torch.zeros(4, 4, 8, 8), torch.tensor(1.0), **{NEGATIVE_ROWS: rows})
        keys = seen["ip"][0][0][0]  # layer 0, first prompt, keys (4, N, width)
        to_k = model.adapter.ip_adapter["1"].to_k_ip
        with torch.inference_mode():
            pos, neg = to_k(positive)[0], to_k(negative)[0]
            assert all(torch.allclose(keys[i], pos, atol=1e-5) for i in (0, 1))
            assert all(torch.allclose(keys[i], neg, atol=1e-5) for i in (2, 3))
            if model is loaded:  # base adapters: the zero embedding itself
                assert torch.equal(negative, model.adapter(torch.zeros(1, model.adapter.config.image_dim)))
        assert not torch.equal(positive, negative)
        assert torch.equal(seen[NEGATIVE_ROWS], rows)  # passed on for other modules; network_fn drops it


def test_style_only_gives_the_tokens_to_the_style_blocks_only(pipe, loaded):
    """On SD 1.x layouts the style blocks are up_blocks.1 (here: 2 of the demo UNet's 7 cross-attention layers)."""
    base = image(pipe)
    full = image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, model=loaded))
    style = image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, style_only=True, model=loaded))
    named = image(pipe, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, blocks=["up_blocks.1"], model=loaded))
    assert np.array_equal(style, named)
    assert not np.array_equal(style, base) and not np.array_equal(style, full)


def test_recipe_and_composition_with_controlnet(pipe, loaded):
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel(ControlNetConfig.from_unet(pipe.models.configs["unet"],
                                                     hint_block_channels=[16, 32, 32, 32])).eval()
    prompt = diffstudio.ImagePrompt(RED, scale=0.8, style_only=True, start=0.1, model=loaded)
    out = pipe("a red circle", **RUN, ip_adapter=[prompt], controlnets=[ControlNetUnit(net, RED)])[0]
    entry = out.info["diffstudio_recipe"]["extra"]["ip_adapter"]
    assert entry == [{"scale": 0.8, "images": ["ndarray"], "start": 0.1, "end": 1.0, "model": "tiny-ip.safetensors",
                      "style_only": True}]
    assert "controlnets" in out.info["diffstudio_recipe"]["extra"]


def test_errors_are_named(pipe):
    with pytest.raises(InvalidInputError, match="start <= end"):
        diffstudio.ImagePrompt(RED, start=0.8, end=0.2)
    with pytest.raises(InvalidInputError, match="one non-negative number per image"):
        diffstudio.ImagePrompt([RED, BLUE], weights=[1.0])
    with pytest.raises(InvalidInputError, match="at least one image"):
        diffstudio.ImagePrompt([])
    with pytest.raises(InvalidInputError, match="add one with models.add_ip_adapter"):
        image(pipe, ip_adapter=diffstudio.ImagePrompt(RED))


def test_the_adapter_added_to_the_model_is_the_default(tmp_path):
    from safetensors.torch import save_file

    models = untrained_demo_models()
    save_file({k: v.contiguous() for k, v in adapter(models.unet, "linear").state_dict().items()},
              str(tmp_path / "ip-tiny.safetensors"))
    vision_encoder().save_pretrained(tmp_path / "image_encoder")
    added = models.add_ip_adapter(tmp_path / "ip-tiny.safetensors")
    pipe = diffstudio.Pipeline(models)
    out = pipe("a red circle", **RUN, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0))[0]
    assert out.info["diffstudio_recipe"]["extra"]["ip_adapter"][0]["model"] == "ip-tiny.safetensors"
    named = pipe("a red circle", **RUN, ip_adapter=diffstudio.ImagePrompt(RED, scale=1.0, model=added))[0]
    assert np.array_equal(np.asarray(out), np.asarray(named))


def test_the_command_line_takes_an_ip_adapter_and_reference_images(tmp_path, capsys):
    """The SDXL chain's shape on the demo model: ControlNet + LoRA + IP-Adapter in one command, all recorded."""
    from PIL import Image
    from safetensors.torch import save_file

    from diffstudio.cli import main
    from diffstudio.io.recipe import read_recipe
    from tests.test_controlnet_pipeline import controlnet
    from tests.test_lora_patcher import lora_file

    models = untrained_demo_models()
    save_file({k: v.contiguous() for k, v in adapter(models.unet, "linear").state_dict().items()},
              str(tmp_path / "ip.safetensors"))
    vision_encoder().save_pretrained(tmp_path / "image_encoder")
    save_file({f"control_model.{k}": v.contiguous() for k, v in controlnet(diffstudio.Pipeline(models)).state_dict()
               .items()}, str(tmp_path / "cn.safetensors"))
    save_file(lora_file(0), str(tmp_path / "flat.safetensors"))
    Image.fromarray(RED).save(tmp_path / "ref.png")
    out = tmp_path / "chain.png"
    assert main(["generate", "a red circle", "--steps", "2", "-o", str(out),
                 "--control", f"canny:{tmp_path / 'cn.safetensors'}:{tmp_path / 'ref.png'}:0.8",
                 "--lora", f"{tmp_path / 'flat.safetensors'}:0.6",
                 "--ip-adapter", str(tmp_path / "ip.safetensors"), "--ip-image", f"{tmp_path / 'ref.png'}"]) == 0
    extra = read_recipe(out)["extra"]
    assert extra["ip_adapter"][0]["scale"] == 0.7 and extra["controlnets"][0]["scale"] == 0.8
    assert extra["loras"][0]["strength"] == 0.6
    assert main(["generate", "x", "--ip-image", str(tmp_path / "ref.png"), "-o", str(out)]) == 2
    assert "--ip-adapter" in capsys.readouterr().err
