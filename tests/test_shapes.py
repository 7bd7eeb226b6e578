"""The Shapes world (diffstudio.demo.shapes) and its scorer (diffstudio.demo.score)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffstudio.demo.score import (
    calibrate,
    color_fractions,
    dominant_color,
    perturb,
    read_background,
    read_image,
    score_prompt,
    to_array,
)
from diffstudio.demo.shapes import (
    ALL_KINDS,
    COLORS,
    EXTRA_KINDS,
    KINDS,
    Scene,
    ShapesDataset,
    ShapeSpec,
    caption,
    parse_background,
    parse_caption,
    position_of,
    render,
    render_video,
    sample_scene,
    sample_video,
    shapes_apart,
    write_dataset,
)


def _pixels(image: Image.Image) -> bytes:
    return image.tobytes()


# ---------------------------------------------------------------- the world


def test_dataset_is_deterministic_per_seed():
    a, b, c = ShapesDataset(12, seed=3), ShapesDataset(12, seed=3), ShapesDataset(12, seed=4)
    for i in range(12):
        assert _pixels(a[i][0]) == _pixels(b[i][0]) and a[i][1] == b[i][1]
    assert sum(_pixels(a[i][0]) != _pixels(c[i][0]) for i in range(12)) >= 10
    # Item i depends on (seed, i) only, not on the dataset length or the access order.
    assert _pixels(ShapesDataset(100, seed=3)[7][0]) == _pixels(a[7][0])
    with pytest.raises(IndexError):
        a[12]


def test_images_are_rgb_and_anti_aliased():
    scene = Scene((ShapeSpec("circle", "red", "center", "large"),), ("white",))
    arr = np.asarray(render(scene, size=64))
    assert arr.shape == (64, 64, 3)
    # Edge pixels are mixtures: more than the two pure colours appear.
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 5


def test_captions_match_their_scenes():
    data = ShapesDataset(80, seed=11)
    omitted = {"position": 0, "size": 0, "background": 0}
    for i in range(len(data)):
        sample = data.sample(i)
        parsed = parse_caption(sample.text)
        assert len(parsed) == len(sample.scene.shapes)
        for want, got in zip(sample.scene.shapes, parsed):
            assert (got.kind, got.color) == (want.kind, want.color)
            assert got.position in ("", want.position) and got.size in ("", want.size)
            omitted["position"] += got.position == ""
            omitted["size"] += got.size == ""
            assert position_of(want.center) == want.position  # the word matches the geometry
        bg = parse_background(sample.text)
        assert bg in (None, sample.scene.background)
        omitted["background"] += bg is None
    # Captions vary: each optional part is sometimes left out, and usually not.
    assert all(0 < v < 60 for v in omitted.values()), omitted


def test_caption_grammar():
    shapes = (ShapeSpec("square", "blue", "top", "small"), ShapeSpec("star", "yellow", "right", "large"))
    assert caption(Scene(shapes, ("black",))) == (
        "a small blue square at the top and a large yellow star on the right, black background")
    split = Scene((ShapeSpec("circle", "red", "left"),), ("white", "gray"))
    assert caption(split) == "a red circle on the left, split white and gray background"
    assert parse_background("split white and gray background") == ("white", "gray")
    assert parse_caption("a red thing") == []


def test_two_shapes_never_touch_and_stay_inside():
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = sample_scene(rng)
        for s in scene.shapes:
            (x, y), r = s.geometry()
            assert 0 <= x - r and x + r <= 1 and 0 <= y - r and y + r <= 1
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            assert a.position != b.position and shapes_apart(a, b)


def test_shapes_apart_equals_a_max_filter_dilation():
    """The overlap test grows one shape's mask by the gap. Reference: PIL's MaxFilter (what it used before
    the separable version, which is ~15x faster); they must agree exactly, or every dataset would change."""
    from diffstudio.demo.shapes import POSITIONS, SHAPE_GAP, _mask, _sample_shape

    def reference(a, b, gap):
        size = 2 * int(round(gap * 128)) + 1  # a 1-pixel MaxFilter is the identity (and crashes Pillow 12.3)
        grown = np.asarray(_mask(a).filter(ImageFilter.MaxFilter(size)) if size > 1 else _mask(a)) > 0
        return not np.any(grown & (np.asarray(_mask(b)) > 0))

    rng = np.random.default_rng(1)
    verdicts = []
    for _ in range(300):
        a, b = (_sample_shape(rng, str(rng.choice(POSITIONS)), KINDS, tuple(COLORS)) for _ in range(2))
        gap = float(rng.choice([0.0, SHAPE_GAP, rng.uniform(0, 0.15)]))
        verdicts.append(reference(a, b, gap))
        assert shapes_apart(a, b, gap) == verdicts[-1], (a, b, gap)
    assert 0.2 < np.mean(verdicts) < 0.8  # both answers were exercised


def test_write_dataset_metadata(tmp_path):
    folder = write_dataset(tmp_path / "shapes", n=5, size=32, seed=2)
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows] == [["file_name", "text"]] * 5
    data = ShapesDataset(5, size=32, seed=2)
    for i, row in enumerate(rows):
        image = Image.open(folder / row["file_name"])
        assert image.size == (32, 32) and image.mode == "RGB"
        assert row["text"] == data[i][1]
        assert _pixels(image.convert("RGB")) == _pixels(data[i][0])


# ---------------------------------------------------------------- the scorer


def test_scorer_reads_ground_truth():
    result = calibrate(n=200, seed=7, perturbations=("clean",))
    acc = result["accuracy"]["clean"]
    assert result["n_shapes"] > 250
    for key in ("color", "kind", "position", "size", "background", "count"):
        assert acc[key] >= 0.98, (key, acc)


def test_scorer_is_robust_to_degradation():
    result = calibrate(n=50, seed=8, perturbations=("blur", "noise", "color_shift", "resample"))
    for how, acc in result["accuracy"].items():
        for key in ("color", "kind", "position", "count"):
            assert acc[key] >= 0.9, (how, key, acc)


def test_perturb_degrades_the_image():
    image = ShapesDataset(1, seed=0)[0][0]
    rng = np.random.default_rng(0)
    for how in ("blur", "noise", "color_shift", "resample"):
        assert _pixels(perturb(image, how, rng)) != _pixels(image), how
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(image, "jpeg", rng)


def test_extra_kinds_are_read_when_asked_for():
    rng = np.random.default_rng(1)
    for i in range(12):
        kind = EXTRA_KINDS[i % 2]
        scene = Scene((ShapeSpec(kind, "green", "center", "large"),), ("white",))
        image = render(scene).filter(ImageFilter.GaussianBlur(0.7)) if i % 3 else render(scene)
        assert [s.kind for s in read_image(image, kinds=ALL_KINDS)] == [kind]
        assert score_prompt(perturb(image, "noise", rng), f"a green {kind}")["kind_ok"]


def test_score_prompt_accepts_the_truth_and_rejects_a_swap():
    shapes = (ShapeSpec("circle", "red", "left", "large"), ShapeSpec("square", "blue", "right", "small"))
    scene = Scene(shapes, ("white", "gray"))
    image = render(scene)
    good = score_prompt(image, caption(scene))
    assert good["all_ok"] and good["count_ok"] and good["background_ok"]
    assert score_prompt(image, "a blue circle on the left")["color_ok"] is False
    assert score_prompt(image, "a red star on the left")["kind_ok"] is False
    assert score_prompt(image, "a red circle on the right")["position_ok"] is False
    assert score_prompt(image, "a small red circle")["size_ok"] is False
    assert score_prompt(image, "a red circle, black background")["background_ok"] is False
    only_one = score_prompt(image, "a red circle")
    assert only_one["all_ok"] and not only_one["count_ok"]  # one asked for, two present
    with pytest.raises(ValueError, match="names no shape"):
        score_prompt(image, "something red")


def test_dominant_color_by_region():
    shapes = (ShapeSpec("square", "red", "left", "large"), ShapeSpec("circle", "cyan", "right", "large"))
    scene = Scene(shapes, ("white",))
    image = render(scene)
    assert dominant_color(image, "left") == "red" and dominant_color(image, "right") == "cyan"
    assert color_fractions(image, (0.0, 0.0, 0.5, 1.0))["red"] > 0.15
    assert dominant_color(render(Scene((), ("light pink",)))) is None  # a bare background


def test_every_colour_and_background_is_read_back():
    for i, color in enumerate(COLORS):
        for bg in ("white", "black", "gray", "light blue", "light pink", "light green"):
            scene = Scene((ShapeSpec(KINDS[i % 4], color, "center", "large"),), (bg,))
            shapes = read_image(render(scene))
            assert [(s.color, s.kind) for s in shapes] == [(color, KINDS[i % 4])], (color, bg)
            assert read_background(render(scene)) == (bg,)


def test_input_formats():
    scene = Scene((ShapeSpec("triangle", "purple", "bottom"),), ("black",))
    image = render(scene)
    arr = np.asarray(image)
    for form in (arr, arr.astype(np.float32) / 255, (arr.astype(np.float32) / 255).transpose(2, 0, 1)):
        assert [(s.kind, s.color, s.position) for s in read_image(form)] == [("triangle", "purple", "bottom")]
    big = render(scene, size=256)  # larger images are read at a working size
    assert [(s.kind, s.position) for s in read_image(big)] == [("triangle", "bottom")]
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_array(arr.astype(np.float32) / 127.5 - 1)
    assert read_image(np.full((64, 64, 3), 255, np.uint8)) == []


# ---------------------------------------------------------------- video


def test_video_shapes_move_linearly_and_change_colour_half_way():
    start = Scene((ShapeSpec("square", "red", center=(0.2, 0.5), radius=0.12),), ("white",))
    end = Scene((ShapeSpec("square", "blue", center=(0.8, 0.5), radius=0.12),), ("white",))
    frames, scenes = render_video(start, end, n_frames=7, size=64)
    assert len(frames) == len(scenes) == 7
    xs = []
    for k, (frame, truth) in enumerate(zip(frames, scenes)):
        (shape,) = read_image(frame)
        xs.append(shape.centroid[0])
        assert shape.kind == "square" and shape.color == truth.shapes[0].color
        assert shape.color == ("red" if k < 3 else "blue")
        assert shape.position == truth.shapes[0].position
    assert [s.shapes[0].position for s in scenes][::3] == ["left", "center", "right"]
    steps = np.diff(xs)
    assert np.allclose(steps, 0.1, atol=0.02)  # 0.6 over 6 steps

    moved, truth = render_video(start, motion=[(0.0, 0.3)], n_frames=4)
    assert truth[-1].shapes[0].center == pytest.approx((0.2, 0.8))
    assert read_image(moved[-1])[0].centroid[1] > read_image(moved[0])[0].centroid[1] + 0.25


def test_sample_video_caption_and_truth():
    clip = sample_video(np.random.default_rng(4), n_frames=5, size=64)
    first, last = clip.scenes[0].shapes[0], clip.scenes[-1].shapes[0]
    assert first.position == clip.info["start"] and last.position == clip.info["end"]
    assert clip.text.startswith(f"a {first.color} {first.kind} moving from the {clip.info['start']}")
    for frame, scene in zip(clip.frames, clip.scenes):
        (shape,) = read_image(frame)
        assert (shape.kind, shape.color, shape.position) == (
            scene.shapes[0].kind, scene.shapes[0].color, scene.shapes[0].position)
