"""The command line: `diffstudio info` and `diffstudio generate` on a tiny model."""

from __future__ import annotations

import pytest
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
    assert "CorruptFileError" in capsys.readouterr().err


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


def test_generate_refuses_a_bad_size(tmp_path, capsys):
    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    assert main(["generate", "x", "--model", str(folder), "--width", "65", "--steps", "1"]) == 2
    assert "InvalidSizeError" in capsys.readouterr().err
