"""Diffutoon config files: the schema maps onto toon_shade's arguments, JSON and YAML agree, mistakes are named,
and `diffstudio diffutoon CONFIG --dry-run` prints the plan (the Shapes demo model, motion module and ControlNet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffstudio.cli import main
from diffstudio.video.diffutoon_config import ConfigError, load_config, resolve_config

WEIGHTS = Path(__file__).resolve().parent.parent / "diffstudio" / "demo" / "weights"

FULL = {
    "models": {"model": "anime.safetensors", "motion": "mm.ckpt", "embeddings": ["bad.pt"],
               "loras": [{"file": "style.safetensors", "strength": 0.7}], "dtype": "fp16", "device": "cuda"},
    "input": {"video": "in.mp4", "crop": [0, 0, 640, 360], "start": 10, "end": 100, "width": 1024},
    "controlnets": {"lineart": {"model": "lineart.pth", "scale": 0.6, "annotator": "softedge"},
                    "tile": {"model": "tile.pth"}},
    "smoother": {"preset": "fast"},
    "pipeline": {"prompt": "anime", "negative_prompt": "bad", "steps": 12, "cfg_scale": 6, "seed": 3,
                 "context_length": 16, "context_stride": 4},
    "edit": {"prompt": "blue", "size": 384, "softedge": {"model": "soft.pth", "scale": 0.4},
             "depth": {"model": "depth.pth", "video": "depth.mp4"}, "steps": 15,
             "smoother": {"fastblend": {"mode": "balanced", "window_size": 9}, "steps": [-1]}},
    "output": {"path": "out.mp4", "fps": 24, "work_dir": "work"},
}


def test_the_schema_maps_onto_toon_shade_arguments(tmp_path):
    models, args, output = resolve_config(FULL, tmp_path)
    assert models["model"] == str(tmp_path / "anime.safetensors") and models["motion"] == str(tmp_path / "mm.ckpt")
    assert models["loras"] == [{"file": str(tmp_path / "style.safetensors"), "strength": 0.7}]
    assert args["video"] == str(tmp_path / "in.mp4") and args["crop"] == [0, 0, 640, 360]
    assert (args["start"], args["end"], args["width"]) == (10, 100, 1024) and "height" not in args
    assert args["negative_embeddings"] == [str(tmp_path / "bad.pt")]
    assert args["lineart_controlnet"] == str(tmp_path / "lineart.pth") and args["lineart_scale"] == 0.6
    assert args["lineart"] == "softedge" and args["tile_controlnet"] == str(tmp_path / "tile.pth")
    assert (args["smoother"], args["smoother_steps"]) == ("fast", None)
    assert (args["steps"], args["cfg_scale"], args["seed"], args["context_stride"]) == (12, 6, 3, 4)
    assert args["edit_prompt"] == "blue" and args["edit_size"] == 384 and args["edit_steps"] == 15
    assert args["edit_softedge_controlnet"] == str(tmp_path / "soft.pth") and args["edit_scales"] == (0.4, 0.5)
    assert args["edit_depth"] == str(tmp_path / "depth.mp4")
    assert args["edit_smoother"].mode == "balanced" and args["edit_smoother"].window_size == 9
    assert args["output"] == str(tmp_path / "out.mp4") and args["work_dir"] == str(tmp_path / "work")
    assert args["fps"] == 24.0 and output["fps"] == 24


def test_json_and_yaml_read_the_same(tmp_path):
    import yaml

    (tmp_path / "a.json").write_text(json.dumps(FULL))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(FULL))
    a, b = load_config(tmp_path / "a.json"), load_config(tmp_path / "a.yaml")
    assert a[0] == b[0] and a[2] == b[2]
    assert {k: v for k, v in a[1].items() if k != "edit_smoother"} == \
        {k: v for k, v in b[1].items() if k != "edit_smoother"}


@pytest.mark.parametrize("change, message", [
    ({"pipeline": {"prompt": "x", "stpes": 3}}, "stpes"),
    ({"extra": {}}, "unknown section"),
    ({"models": {"model": "m"}}, "models.motion"),
    ({"input": {}}, "input.video"),
    ({"controlnets": {"lineart": {"scale": 1}}}, "needs model"),
    ({"smoother": {"preset": "slow"}}, "accurate or fast"),
    ({"controlnets": {"lineart": {"model": "l", "annotator": "nosuchpackage.mod:fn"}}}, "cannot import"),
    ({"edit": {"size": 256}}, "edit.prompt"),
])
def test_mistakes_are_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({**FULL, **change}, tmp_path)


def test_an_annotator_can_be_any_importable_function(tmp_path):
    config = {**FULL, "controlnets": {"lineart": {"model": "l", "annotator": "diffstudio.control.annotators:blur"}}}
    from diffstudio.control.annotators import blur

    assert resolve_config(config, tmp_path)[1]["lineart"] is blur


@pytest.mark.skipif(not (WEIGHTS / "shapes-motion.safetensors").exists(), reason="the Shapes weights are not built")
def test_dry_run_prints_the_plan(tmp_path, capsys):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(40):
        Image.fromarray(np.full((64, 96, 3), 4 * i, np.uint8)).save(frames / f"{i:03d}.png")
    config = {"models": {"motion": str(WEIGHTS / "shapes-motion.safetensors")},
              "input": {"video": "frames", "start": 4},
              "controlnets": {"lineart": {"model": str(WEIGHTS / "shapes-controlnet.safetensors"),
                                          "annotator": "canny"}},
              "pipeline": {"prompt": "a red circle"}, "output": {"path": "toon.mp4"}}
    (tmp_path / "toon.json").write_text(json.dumps(config))
    assert main(["diffutoon", str(tmp_path / "toon.json"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["frames"] == 36 and plan["stages"][0]["width"] == 128 and plan["stages"][0]["height"] == 64
    assert plan["stages"][0]["windows"] == 4 and plan["stages"][0]["unet_calls"] == 40  # 10 steps x 4 windows
    assert plan["memory_gib"] > 0
    assert not (tmp_path / "toon.mp4").exists()
    assert main(["diffutoon", str(tmp_path / "missing.json")]) == 2
    assert "ConfigError" in capsys.readouterr().err
