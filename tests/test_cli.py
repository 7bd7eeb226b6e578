"""The command line: `diffstudio info` and `diffstudio generate` on a tiny model; its errors (one line, exit 2,
before anything loads), the wiring of generate's options, the torch-free parser, LoRA files where models go."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffstudio.cli import main
from tests.tiny_sd15 import reference_models, write_diffusers_folder, write_single_file


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return write_single_file(tmp_path_factory.mktemp("cli") / "tiny.safetensors", *reference_models())


def test_info_names_family_components_and_ignored_keys(single, capsys):
    assert main(["info", str(single)]) == 0
    out = capsys.readouterr().out
    assert "family: sd15" in out
    for role in ("unet", "vae", "text_encoder"):
        assert role in out
    assert "ignored 1 non-weight keys: alphas_cumprod" in out


def test_info_on_garbage_is_a_named_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["info", str(bad)]) == 2
    assert "CorruptFileError" in one_error_line(capsys)


def test_generate_writes_a_png_with_its_recipe(tmp_path):
    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    out = tmp_path / "o.png"
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(out), "--steps", "2",
                 "--width", "64", "--height", "64", "--seed", "5", "--sampler", "dpmpp_2m",
                 "--scheduler", "karras"]) == 0
    with Image.open(out) as image:
        assert image.size == (64, 64)
        assert "Seed: 5" in image.text["parameters"]
        assert '"sampler": "dpmpp_2m"' in image.text["diffstudio"]


def test_generate_with_offload_and_fp8_flags(tmp_path):
    """--offload goes through to load(): on the CPU every mode gives the plain run's image; --storage fp8 is
    refused for a UNet with the loader's named error."""
    import numpy as np

    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--width", "64", "--height", "64"]
    images = []
    for extra in ([], ["--offload", "group"], ["--offload", "sequential"]):
        out = tmp_path / f"{len(images)}.png"
        assert main([*args, "-o", str(out), *extra]) == 0
        with Image.open(out) as image:
            images.append(np.asarray(image))
    assert all(np.array_equal(images[0], other) for other in images[1:])
    assert main([*args, "-o", str(tmp_path / "fp8.png"), "--storage", "fp8"]) == 2


def test_generate_compile_flag_compiles_the_denoiser_and_keeps_the_image(tmp_path, monkeypatch):
    """--compile goes through Models.compile (here with dynamo's eager backend: inductor takes minutes) and gives
    the plain run's image; --compile freeze asks for frozen weights."""
    import numpy as np

    from diffstudio.loader import Models

    asked, compile_for_real = [], Models.compile

    def eager_compile(self, backend="inductor", mode=None, freeze=False):
        asked.append(freeze)
        return compile_for_real(self, backend="eager")

    monkeypatch.setattr(Models, "compile", eager_compile)
    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--width", "64", "--height", "64"]
    images = []
    for extra in ([], ["--compile"], ["--compile", "freeze"]):
        out = tmp_path / f"{len(images)}.png"
        assert main([*args, "-o", str(out), *extra]) == 0
        with Image.open(out) as image:
            images.append(np.asarray(image))
    torch.compiler.reset()
    assert asked == [False, True]
    assert all(np.array_equal(images[0], other) for other in images[1:])


def test_generate_refuses_a_bad_size(tmp_path, capsys):
    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    assert main(["generate", "x", "--model", str(folder), "--width", "65", "--steps", "1"]) == 2
    assert "InvalidSizeError" in capsys.readouterr().err


# --- errors: one line, before anything loads ---------------------------------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def no_loading(monkeypatch, tmp_path):
    """Relative paths resolve in an empty folder; loading a model fails the test."""
    import diffstudio

    def load(*paths, **kwargs):
        raise AssertionError("the model was loaded before the command line's own checks")

    monkeypatch.setattr(diffstudio, "load", load)
    monkeypatch.delenv("DIFFSTUDIO_LORA_DIRS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv,expected", [
    (["--sigmas", "1,2,abc"], "'abc' in '1,2,abc' is not a number"),
    (["--sampler", "nope"], "'euler_ancestral'"),
    (["--scheduler", "nope"], "'karras'"),
    (["--steps", "many"], "argument --steps"),
    (["-o", "x.gif"], ".png .jpg .jpeg .webp"),
    (["--init-image", "nope.png"], "init image not found: nope.png"),
    (["--init-image", "in.png", "--mask", "nope.png"], "mask image not found: nope.png"),
    (["--regions", "nope.json"], "region layout file not found: nope.json"),
    (["--lora", "nope.safetensors:0.5"], "LoRA file not found: nope.safetensors"),
    (["--model", "nope.safetensors"], "model not found: nope.safetensors"),
    (["--vae", "nope.safetensors"], "VAE file not found: nope.safetensors"),
    (["--lora-dir", "nope"], "LoRA folder not found: nope (from --lora-dir)"),
    (["--threads", "0"], "argument --threads"),
    (["--device", "gpu"], "--device gpu: not a device name"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_users_mistake_is_one_error_line_before_loading(no_loading, capsys, argv, expected):
    Image.new("RGB", (64, 64)).save(no_loading / "in.png")
    assert main(["generate", "a red circle", *argv]) == 2
    assert expected in one_error_line(capsys)


def test_a_lora_folder_from_the_environment_must_exist(no_loading, capsys, monkeypatch):
    monkeypatch.setenv("DIFFSTUDIO_LORA_DIRS", "nope")
    assert main(["generate", "x"]) == 2
    assert "LoRA folder not found: nope (from DIFFSTUDIO_LORA_DIRS)" in one_error_line(capsys)


def test_cuda_on_a_machine_without_it_is_named_before_loading(no_loading, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "x", "--device", "cuda"]) == 2
    line = one_error_line(capsys)
    assert "--device cuda" in line and "use --device cpu" in line


def test_a_multi_line_error_message_is_printed_on_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(3, 3)}, str(path))
    assert main(["info", str(path)]) == 2
    assert "UnknownModelError" in one_error_line(capsys)


# --- generate's wiring: options reach the pipeline, outputs are written safely ------------------------------

class FakePipeline:
    """Records what the command line hands the pipeline; returns one image per batch item."""

    calls: list = []

    def __init__(self, models):
        self.lora_dirs = []
        self.error = getattr(models, "error", None)

    def __call__(self, prompt, negative_prompt="", **kwargs):
        FakePipeline.calls.append({"prompt": prompt, "lora_dirs": list(self.lora_dirs), **kwargs})
        if self.error is not None:
            raise self.error
        images = []
        for i in range(kwargs.get("batch_size", 1)):
            image = Image.new("RGB", (64, 64), (255, 0, 0))
            image.info["diffstudio_recipe"] = {"prompt": prompt, "seed": kwargs["seed"] + i, "steps": 2}
            images.append(image)
        return images


@pytest.fixture()
def fake_pipeline(monkeypatch, tmp_path):
    import types

    import diffstudio

    models = types.SimpleNamespace(error=None)
    monkeypatch.setattr(diffstudio, "load", lambda *paths, **kwargs: models)
    monkeypatch.setattr(diffstudio, "Pipeline", FakePipeline)
    monkeypatch.delenv("DIFFSTUDIO_LORA_DIRS", raising=False)
    FakePipeline.calls = []
    return models


def test_guidance_and_lora_folders_reach_the_pipeline(fake_pipeline, tmp_path, monkeypatch):
    import os

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("DIFFSTUDIO_LORA_DIRS", os.pathsep.join([str(tmp_path / "c"), ""]))
    out = tmp_path / "o.png"
    assert main(["generate", "x <lora:ink:0.5>", "-o", str(out), "--guidance", "2.5",
                 "--lora-dir", str(tmp_path / "a"), "--lora-dir", str(tmp_path / "b")]) == 0
    (call,) = FakePipeline.calls
    assert call["guidance"] == 2.5
    assert call["lora_dirs"] == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]  # the options first, then the env
    # options not given are left to the pipeline's defaults (strength without an init image is an error there)
    assert not {"strength", "steps", "sampler", "init_image", "region_mode"} & set(call)


def test_a_prompt_tag_that_resolves_nowhere_names_the_options(fake_pipeline, tmp_path, capsys):
    from diffstudio.errors import LoRANotFoundError

    fake_pipeline.error = LoRANotFoundError("<lora:ink>: no ink{.safetensors} in no folders (set the pipeline's "
                                            "lora_dirs)")
    assert main(["generate", "x <lora:ink>", "-o", str(tmp_path / "o.png")]) == 2
    line = one_error_line(capsys)
    assert "LoRANotFoundError" in line and "--lora-dir DIR" in line and "DIFFSTUDIO_LORA_DIRS" in line


@pytest.mark.parametrize("name,expected", [("o.jpg", "JPEG"), ("o.webp", "WEBP"), ("o.png", "PNG")])
def test_the_output_suffix_chooses_the_format(fake_pipeline, tmp_path, name, expected):
    from diffstudio.io.recipe import read_recipe

    out = tmp_path / name
    assert main(["generate", "a red circle", "-o", str(out), "--seed", "7"]) == 0
    with Image.open(out) as image:
        assert image.format == expected
    assert read_recipe(out)["seed"] == 7


def test_a_failed_run_leaves_the_existing_output_alone(fake_pipeline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"yesterday's image")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    assert main(["generate", "a red circle", "-o", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert out.read_bytes() == b"yesterday's image" and [p.name for p in tmp_path.iterdir()] == ["o.png"]


# --- the parser: torch-free, documented -------------------------------------------------------------------

def test_building_and_parsing_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from diffstudio.cli import build_parser; p = build_parser(); p.format_help(); "
            "p.parse_args(['generate', 'x', '--sampler', 'euler']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_python_m_diffstudio_is_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "diffstudio", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "generate" in done.stdout and "fastblend" in done.stdout
    done = subprocess.run([sys.executable, "-m", "diffstudio", "generate", "x", "--sampler", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: argument --sampler")


def test_generate_help_shows_defaults_and_every_sampler_and_schedule(capsys):
    from diffstudio.sampling_names import SAMPLER_NAMES, SCHEDULER_NAMES

    with pytest.raises(SystemExit) as stop:
        main(["generate", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: out.png)" in text and "(default: fp32)" in text and "(default: cpu)" in text
    for name in SAMPLER_NAMES + SCHEDULER_NAMES:
        assert name in text


def test_the_choices_are_the_registries():
    from diffstudio.sampling import SAMPLERS, SCHEDULERS
    from diffstudio.sampling_names import SAMPLER_NAMES, SCHEDULER_NAMES

    assert SAMPLER_NAMES == tuple(SAMPLERS) and SCHEDULER_NAMES == tuple(SCHEDULERS)


def test_fastblend_s_arguments_come_when_the_command_is_used(capsys):
    pytest.importorskip("imageio")
    with pytest.raises(SystemExit):
        main(["fastblend", "--help"])
    assert "--guide" in capsys.readouterr().out


# --- LoRA files where a model is expected, and the doctor's family ------------------------------------------

@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A kohya LoRA on the tiny SD 1.x (64-wide context: its names alone say no family), with the metadata
    diffstudio's trainer writes (diffstudio/train/lora.py: ss_base_model_version = the family's name)."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.randn(2, 64), f"{name}.lora_up.weight": torch.randn(32, 2),
               f"{name}.alpha": torch.tensor(2.0)}
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd15",
                                            "ss_training_comment": "trained with diffstudio"})
    return path


def test_info_on_a_lora_says_so_in_one_line(tiny_lora, capsys):
    assert main(["info", str(tiny_lora)]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "a LoRA file" in out and "made for sd15" in out
    assert f"diffstudio lora inspect {tiny_lora}" in out


def test_a_lora_given_as_the_model_points_to_lora(tiny_lora, capsys):
    assert main(["generate", "x", "--model", str(tiny_lora)]) == 2
    assert f"pass it with --lora {tiny_lora}" in one_error_line(capsys)


def test_lora_inspect_reads_the_family_our_trainer_stores(tiny_lora, capsys):
    assert main(["lora", "inspect", str(tiny_lora)]) == 0
    assert "made for: sd15 (the file's metadata: ss_base_model_version sd15)" in capsys.readouterr().out
