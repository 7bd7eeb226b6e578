"""`diffstudio batch`: a recipe file renders to the Python API's images, resumes, refuses stale outputs, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import diffstudio
from diffstudio.batch import process_share, read_batch, run_batch
from diffstudio.cli import main
from diffstudio.errors import InvalidInputError, StaleRunError
from diffstudio.io.recipe import read_recipe

LINES = [
    {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 1},
    {"prompt": "a blue square", "width": 64, "height": 64, "steps": 3, "seed": 2, "name": "square"},
    {"prompt": "a green triangle", "width": 64, "height": 64, "steps": 2, "seed": 3, "cfg_scale": 2.0},
]


def _write(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def recipes(tmp_path):
    return _write(tmp_path / "recipes.jsonl", LINES)


def test_every_line_renders_the_python_apis_image_with_its_recipe(recipes, tmp_path):
    out = tmp_path / "out"
    written = run_batch(recipes, out, progress=False)
    assert sorted(p.name for p in written) == ["00000.png", "00002.png", "square.png"]
    pipe = diffstudio.Pipeline(diffstudio.load())
    for line, name in zip(LINES, ["00000.png", "square.png", "00002.png"]):
        expected = pipe(progress=False, **{k: v for k, v in line.items() if k != "name"})[0]
        with Image.open(out / name) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        recipe = read_recipe(out / name)
        assert recipe["batch_line"] == line and recipe["prompt"] == line["prompt"]


def test_a_stopped_batch_renders_only_what_is_missing(recipes, tmp_path):
    out = tmp_path / "out"
    run_batch(recipes, out, progress=False)
    kept = (out / "square.png").stat().st_mtime_ns
    (out / "00002.png").unlink()
    again = run_batch(recipes, out, progress=False)
    assert [p.name for p in again] == ["00002.png"]
    assert (out / "square.png").stat().st_mtime_ns == kept


def test_an_output_of_another_recipe_is_refused_unless_restarted(recipes, tmp_path):
    out = tmp_path / "out"
    run_batch(recipes, out, progress=False)
    changed = [dict(LINES[0], prompt="a red square"), *LINES[1:]]
    _write(recipes, changed)
    with pytest.raises(StaleRunError, match="00000.png"):
        run_batch(recipes, out, progress=False)
    written = run_batch(recipes, out, restart=True, progress=False)
    assert len(written) == 3 and read_recipe(out / "00000.png")["batch_line"] == changed[0]


def test_processes_share_the_lines_without_overlap(tmp_path, monkeypatch):
    lines = read_batch(_write(tmp_path / "r.jsonl", [{"prompt": f"p{i}"} for i in range(7)]))
    shares = [process_share(lines, rank, 3) for rank in range(3)]
    assert sorted(line.index for share in shares for line in share) == list(range(7))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert process_share(lines) == shares[1]


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a"}\n{"prompt": ', "line 2: not JSON"),
    ('{"negative_prompt": "x"}', 'line 1: each line is a JSON object with a "prompt"'),
    ('{"prompt": "a", "stepz": 3}', r"line 1: unknown field\(s\) \['stepz'\]"),
    ('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}', "line 2: the name 'x'"),
    ('{"prompt": "a", "name": "../x"}', "line 1: the name '../x'"),
    ('{"prompt": "a", "loras": ["x.safetensors"]}', 'line 1: "loras" is a list'),
    ("\n\n", "holds no recipes"),
])
def test_a_bad_line_is_named_before_anything_loads(tmp_path, text, message):
    path = tmp_path / "r.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=message):
        read_batch(path)


def test_relative_paths_are_read_beside_the_recipe_file(tmp_path):
    lines = read_batch(_write(tmp_path / "r.jsonl", [{"prompt": "a", "model": "m.safetensors",
                                                       "init_image": "in.png", "loras": [["l.safetensors", 0.5]]}]))
    assert lines[0].model == str(tmp_path / "m.safetensors")
    assert lines[0].request["init_image"] == str(tmp_path / "in.png")
    assert lines[0].loras == ((str(tmp_path / "l.safetensors"), 0.5),)


def test_the_command_line_runs_a_batch(recipes, tmp_path, capsys):
    assert main(["batch", str(recipes), "-o", str(tmp_path / "out")]) == 0
    assert "wrote 3 image(s)" in capsys.readouterr().out
    assert main(["batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out")]) == 2
