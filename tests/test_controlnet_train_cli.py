"""The ControlNet commands: `diffstudio train controlnet` writes a ControlNet that loads back, `diffstudio annotate`
writes the annotator's control image, and user errors end in one line with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import diffstudio
from diffstudio.cli import main
from tests import tiny_sd15


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet, vae, text = tiny_sd15.reference_models()
    return tiny_sd15.write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", unet, vae, text)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffstudio.demo.controlnet_build import write_control_dataset

    return write_control_dataset(tmp_path_factory.mktemp("control_data"), 2, progress=False)


def test_train_controlnet_writes_a_file_that_add_controlnet_loads(base, data, tmp_path, capsys):
    out = tmp_path / "cn.safetensors"
    code = main(["train", "controlnet", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--resolution", "64", "--hint-channels", "8,8,16,16", "--save-dtype", "fp16", "--lr", "1e-3"])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    controlnet = diffstudio.load(str(base)).add_controlnet(out)
    assert controlnet.config.hint_block_channels == [8, 8, 16, 16]


def test_train_controlnet_on_captions_only_data_fails_in_one_line(base, tmp_path, capsys):
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a red circle\n", encoding="utf-8")
    code = main(["train", "controlnet", "--model", str(base), "--data", str(tmp_path), "--out",
                 str(tmp_path / "cn.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: InvalidInputError:") and "conditioning_image" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind, extra", [("canny", ["--low", "50", "--high", "120"]), ("tile", ["--factor", "8"]),
                                         ("blur", ["--radius", "2"])])
def test_annotate_writes_the_annotators_control_image(tmp_path, kind, extra):
    from diffstudio.control import annotators
    from diffstudio.demo.shapes import Scene, ShapeSpec, render

    picture = tmp_path / "in.png"
    render(Scene((ShapeSpec("star", "red", "left", "large"),), ("light blue",)), 64).save(picture)
    out = tmp_path / "control.png"
    assert main(["annotate", "--kind", kind, str(picture), "-o", str(out), *extra]) == 0
    expected = {"canny": lambda: annotators.canny(picture, 50, 120), "tile": lambda: annotators.tile(picture, 8),
                "blur": lambda: annotators.blur(picture, 2)}[kind]()
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    if kind == "canny":
        assert 0 < np.asarray(expected).mean() < 128  # edges found, not everything an edge


def test_annotate_a_missing_picture_fails_in_one_line(tmp_path, capsys):
    assert main(["annotate", "--kind", "canny", str(tmp_path / "none.png"), "-o", str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.png" in err
