"""The memory planner (memory/planner.py): its choices for full-size layouts (detected from meta state dicts) at
8/12/16/24 GiB, its refusals, its command, and its estimate of a whole generation against the measured peak."""

from __future__ import annotations

import pytest
import torch

import diffstudio
from diffstudio.errors import InvalidInputError, MemoryPlanError
from diffstudio.memory.planner import GIB, HOST_BASELINE, Option, parse_size, plan

HOST = 32 * GIB


def _meta_detection(arch: str, config):
    """A released denoiser file's layout (original key names) at full size, on the meta device."""
    from diffstudio.components import ARCHS

    with torch.device("meta"):
        sd = ARCHS[arch].build(config).state_dict()
    return diffstudio.detect({"model.diffusion_model." + k: v for k, v in sd.items()})


class _Released(dict):
    """The released denoisers' layouts, each built when a test first asks for it."""

    def __missing__(self, name):
        self[name] = _released(name)
        return self[name]


@pytest.fixture(scope="module")
def released():
    return _Released()


def _released(name: str):
    from diffstudio.detect.mmdit import config_from_diffusers as mmdit_config
    from diffstudio.detect.unet import config_from_diffusers as unet_config
    from diffstudio.models.flux import FluxConfig
    from diffstudio.release_configs import SD15_UNET, SDXL_UNET

    sd35_large = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                      joint_attention_dim=4096, pooled_projection_dim=2048, num_layers=38, num_attention_heads=38,
                      caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm")
    if name == "flux-dev":
        return _meta_detection("flux_dit", FluxConfig())
    if name == "sd3.5-large":
        return _meta_detection("mmdit", mmdit_config(sd35_large))
    return _meta_detection("ldm_unet", unet_config({"sdxl": SDXL_UNET, "sd15": SD15_UNET}[name]))


PLAIN, FP8 = Option(False, None, False), Option(True, None, False)
CHOICES = {  # (model, device GiB) -> the option chosen at 1024 x 1024 with 32 GiB of host memory
    ("flux-dev", 8): Option(True, "group", False),  # T5-XXL alone (8.9 GiB in bf16) needs its blocks moved
    ("flux-dev", 12): Option(True, "group", False),  # the fp8 DiT (11.1 GiB) does not fit whole
    ("flux-dev", 16): Option(True, "model", False),
    ("flux-dev", 24): Option(True, None, True),  # fp8 DiT + T5 + CLIP + VAE, the decode in tiles
    ("sd3.5-large", 8): Option(False, "group", False),
    ("sd3.5-large", 12): Option(True, "model", False),
    ("sd3.5-large", 16): Option(True, "model", False),
    ("sd3.5-large", 24): FP8,
    ("sdxl", 8): Option(False, None, True),  # the whole-image decode at 1024 px is what does not fit
    ("sdxl", 12): PLAIN, ("sdxl", 16): PLAIN, ("sdxl", 24): PLAIN,
    ("sd15", 8): PLAIN, ("sd15", 12): PLAIN, ("sd15", 16): PLAIN, ("sd15", 24): PLAIN,
}


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-large", "sdxl", "sd15"])
def test_choices_at_8_12_16_24_gib(released, name):
    for gib in (8, 12, 16, 24):
        chosen = plan(released[name], 1024, 1024, device_free=gib * GIB, host_free=HOST)
        assert chosen.option == CHOICES[name, gib], (name, gib, chosen.explain())
        assert chosen.device_bytes <= 0.9 * gib * GIB and chosen.host_bytes <= 0.9 * HOST
        assert len(chosen.rejected) == [Option(f, o, t) for o, f in ((None, False), (None, True), ("model", False),
                                                                      ("model", True), ("group", False),
                                                                      ("group", True))
                                        for t in (False, True)
                                        if f is False or name in ("flux-dev", "sd3.5-large")].index(chosen.option)


def test_explanation_names_the_choice_the_estimates_and_what_was_assumed(released):
    text = plan(released["flux-dev"], 1024, 1024, device_free=16 * GIB, host_free=HOST).explain()
    assert "denoiser in fp8, model offload" in text and "of 16.00 GiB free" in text
    assert "text_encoder_2 not in the files given" in text  # T5-XXL counted at its released size
    assert "not chosen: plain weights, all on the device" in text
    assert "dit 11.09 GiB" in text  # 11.9 B parameters, Linear weights in 1 byte


def test_without_an_accelerator_the_device_is_the_host(released):
    chosen = plan(released["sd3.5-large"], 1024, 1024, device_type="cpu", host_free=24 * GIB)
    assert chosen.option == FP8 and chosen.device_type == "cpu"
    # FLUX-dev's fp8 DiT and bf16 T5-XXL together do not fit in 24 GiB: refused, with the shortfall
    with pytest.raises(MemoryPlanError, match=r"smallest plan \(denoiser in fp8, all on the device, tiled VAE\)"
                                              r".* GiB short on the host"):
        plan(released["flux-dev"], 1024, 1024, device_type="cpu", host_free=24 * GIB)


def test_refusals_name_the_shortfall_on_each_side(released):
    with pytest.raises(MemoryPlanError, match="short on the device"):
        plan(released["flux-dev"], 1024, 1024, device_free=1 * GIB, host_free=HOST)
    with pytest.raises(MemoryPlanError, match="short on the host"):  # offload needs the weights on the host
        plan(released["flux-dev"], 1024, 1024, device_free=8 * GIB, host_free=16 * GIB)


def test_larger_images_and_batches_need_more(released):
    small = plan(released["sdxl"], 1024, 1024, device_free=24 * GIB, host_free=HOST)
    large = plan(released["sdxl"], 2048, 2048, device_free=24 * GIB, host_free=HOST)
    batch = plan(released["sdxl"], 1024, 1024, device_free=24 * GIB, host_free=HOST, batch=4)
    def activation(chosen):
        return chosen.phases["sample"] - sum(chosen.weights.values())

    assert activation(large) > 3 * activation(small) and activation(batch) > 3 * activation(small)


def test_a_model_in_several_files_is_planned_whole(tmp_path):
    from tests.tiny_flux import reference_models, write_bfl_files

    files = write_bfl_files(tmp_path, *reference_models())
    whole = plan([files[r] for r in ("dit", "vae", "text_encoder", "text_encoder_2")], 256, 256,
                 device_type="cpu", host_free=8 * GIB)
    assert not whole.assumed and set(whole.weights) == {"dit", "vae", "text_encoder", "text_encoder_2"}
    alone = plan(files["dit"], 256, 256, device_type="cpu", host_free=64 * GIB)
    assert len(alone.assumed) == 3 and alone.weights["text_encoder_2"] > 9 * 10 ** 9  # T5-XXL as released


def test_memory_sizes():
    assert parse_size("8GiB") == parse_size("8GB") == parse_size("8g") == 8 * GIB
    assert parse_size("512MiB") == 512 * 2 ** 20 and parse_size("1.5G") == int(1.5 * GIB)
    with pytest.raises(InvalidInputError, match="8GiB"):
        parse_size("eight")


def test_estimate_of_a_generation_against_its_measured_peak():
    """The demo model (fp32, on the CPU) at 256 and at 640 px, where the plan tiles the decode: the weights plus
    the peak of live tensor bytes during a whole generation, against the plan's estimate, within 15%."""
    from diffstudio.memory.measure import TensorPeak

    path = diffstudio.loader.default_model_path()
    models = diffstudio.load(path)
    weights = sum(p.numel() * p.element_size() for m in models.components.values()
                  if isinstance(m, torch.nn.Module) for p in m.parameters())
    pipe = diffstudio.Pipeline(models)
    for size, host in ((256, 64 * GIB), (640, 1.4 * GIB)):  # a small host leaves room for the tiled decode only
        chosen = plan(path, size, size, device_type="cpu", host_free=int(host), dtype=torch.float32)
        assert chosen.tiled_vae == (size == 640)
        with TensorPeak() as peak:
            pipe("a red circle", width=size, height=size, steps=1, progress=False, tiled_vae=chosen.tiled_vae)
        measured, estimated = weights + peak.peak, chosen.device_bytes - HOST_BASELINE
        assert abs(estimated - measured) <= 0.15 * measured, (size, estimated, measured)


def test_plan_command(capsys):
    from diffstudio.cli import main

    path = str(diffstudio.loader.default_model_path())
    assert main(["plan", path, "--width", "512", "--height", "512", "--device-memory", "8GiB",
                 "--host-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "sd15 at 512x512" in out and "of 8.00 GiB free" in out and "load with: diffstudio.load(" in out
    assert "or: diffstudio generate ... --dtype bf16" in out
    assert main(["plan", path, "--device-memory", "1MiB", "--host-memory", "24GiB"]) == 2
    assert "MemoryPlanError" in capsys.readouterr().err
