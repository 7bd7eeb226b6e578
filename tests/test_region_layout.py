"""Region layout files and `diffstudio generate --regions`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffstudio import RegionError
from diffstudio.cli import main
from diffstudio.pipeline.region_layout import load_layout
from tests.tiny_sd15 import reference_models, write_diffusers_folder


def write(tmp_path, data, name="layout.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_a_layout_file_loads_with_masks_relative_to_it(tmp_path):
    (tmp_path / "masks").mkdir()
    Image.new("L", (16, 16), 255).save(tmp_path / "masks" / "right.png")
    layout = load_layout(write(tmp_path, {"global_weight": 0.5, "regions": [
        {"prompt": "a red circle", "box": [0, 0, 0.5, 1], "weight": 1.5, "negative_prompt": "blue"},
        {"prompt": "a blue square", "mask": "masks/right.png", "feather": 0.05}]}))
    assert layout.global_weight == 0.5 and len(layout.regions) == 2
    first, second = layout.regions
    assert first.box == (0.0, 0.0, 0.5, 1.0) and first.weight == 1.5 and first.negative_prompt == "blue"
    assert second.mask == str(tmp_path / "masks" / "right.png") and second.feather == 0.05


@pytest.mark.parametrize("data,message", [
    ({"regions": [{"prompt": "x", "box": [0.5, 0, 0.2, 1]}]}, r"regions\[0\]: bad box"),
    ({"regions": [{"prompt": "x", "box": [0, 0, 1]}]}, r"regions\[0\]: a box is four numbers"),
    ({"regions": [{"prompt": "a"}, {"prompt": "x", "mask": "missing.png"}]}, r"regions\[1\]: mask file not found"),
    ({"regions": [{"prompt": "x", "colour": "red"}]}, r"regions\[0\]: unknown key\(s\) \['colour'\]"),
    ({"regions": [], "seed": 3}, r"unknown key\(s\) \['seed'\]"),
    ({"regions": []}, "non-empty list"),
    ({"regions": [{"box": [0, 0, 1, 1]}]}, "needs a 'prompt'"),
    ({"regions": [{"prompt": "x", "weight": -1}]}, "weight"),
    ({"regions": [{"prompt": "x"}], "global_weight": "high"}, "global_weight"),
    ([1, 2], "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_layout_mistakes_are_named_errors(tmp_path, data, message):
    with pytest.raises(RegionError, match=message):
        load_layout(write(tmp_path, data))


def test_generate_with_regions_records_them_in_the_png(tmp_path):
    from diffstudio.io.recipe import read_recipe

    folder = write_diffusers_folder(tmp_path / "m", *reference_models())
    layout = write(tmp_path, {"regions": [{"prompt": "a blue square", "box": [0.5, 0, 1, 1]}]})
    out = tmp_path / "o.png"
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(out), "--steps", "2", "--width", "64",
                 "--height", "64", "--regions", str(layout), "--region-mode", "attention"]) == 0
    regions = read_recipe(out)["extra"]["regions"]
    assert regions["mode"] == "attention" and regions["regions"][0]["prompt"] == "a blue square"


def test_generate_with_a_bad_layout_fails_before_loading_the_model(tmp_path, capsys):
    layout = write(tmp_path, {"regions": [{"prompt": "x", "box": [0, 0, 2, 1]}]})
    assert main(["generate", "x", "--model", str(tmp_path / "no-such-model"), "--regions", str(layout)]) == 2
    err = capsys.readouterr().err
    assert "RegionError" in err and "bad box" in err
