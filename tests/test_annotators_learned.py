"""The learned annotators (HED soft edges, informative-drawings line art) against controlnet-aux 0.0.10's
HEDdetector and LineartDetector, with random weights in the released files' key layouts.

The reference modules are loaded from the installed controlnet-aux package file by file (``hed/__init__.py``,
``lineart/__init__.py`` and their ``util.py``; they need OpenCV and einops, not torchvision), without running the
package's ``__init__``, which imports every detector. CI installs it with ``pip install --no-deps
controlnet-aux==0.0.10`` (its own dependencies pull torchvision).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffstudio.control import annotators, learned
from diffstudio.errors import AnnotatorWeightsNotFoundError, CorruptFileError, InvalidInputError, UnknownModelError
from diffstudio.models.annotators import HEDNetwork, LineartGenerator


def _reference(module: str):
    """controlnet_aux.<module>, imported without the package's __init__ (skips when the package is absent)."""
    pytest.importorskip("cv2")
    pytest.importorskip("einops")
    if "controlnet_aux" not in sys.modules:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("controlnet-aux is not installed (pip install --no-deps controlnet-aux==0.0.10)")
        package = types.ModuleType("controlnet_aux")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["controlnet_aux"] = package
    return importlib.import_module(f"controlnet_aux.{module}")


def _hed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in ControlNetHED.pth's layout, scaled so the edge map spans the sigmoid's range (the side
    outputs' mean stays O(1) on a 0-255 input)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in HEDNetwork().state_dict().items():
        if name == "norm":
            out[name] = 100 + 50 * torch.rand(value.shape, generator=g)
        elif name.endswith("bias"):
            out[name] = 0.05 * torch.randn(value.shape, generator=g)
        else:
            fan_in = value[0].numel()
            gain = 1 / 64 if name == "block1.convs.0.weight" else 1.0
            std = (2 / fan_in) ** 0.5 * gain * (1.5 if "projection" in name else 1.0)
            out[name] = std * torch.randn(value.shape, generator=g)
    return out


def _lineart_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (value[0].numel() if value.ndim > 1 else 64) ** -0.5 * torch.randn(value.shape, generator=g)
            for name, value in LineartGenerator().state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple:
    """A folder with the three released file names, random weights in their layouts."""
    folder = tmp_path_factory.mktemp("annotators")
    torch.save(_hed_state_dict(), folder / "ControlNetHED.pth")
    torch.save(_lineart_state_dict(1), folder / "sk_model.pth")
    torch.save(_lineart_state_dict(2), folder / "sk_model2.pth")
    return folder


def _images() -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (72, 100, 3), dtype=np.uint8))
    shapes = Image.new("RGB", (96, 80), (230, 220, 200))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((10, 8, 60, 58), fill=(200, 40, 40))
    draw.rectangle((45, 30, 90, 75), fill=(30, 60, 170), outline=(0, 0, 0), width=3)
    y, x = np.mgrid[0:66, 0:130] / 20.0                 # smooth in both directions (a ramp along one side only
    waves = np.stack([np.sin(x + y), np.cos(x * 0.7 - y), np.sin(0.3 * x * y)], -1)   # is near-constant per
    smooth = Image.fromarray((127.5 + 127 * waves).astype(np.uint8))                  # channel: instance norm
    return [("noise", noise), ("shapes", shapes), ("smooth", smooth)]                 # then magnifies rounding)


# (detect_resolution, image_resolution): a larger detection (Lanczos-4 up), a smaller one (area down; one side
# grows for the 66 x 130 gradient, OpenCV's mixed area case) and an output resized from the detection.
SIZES = [(128, 128), (64, 64), (64, 128)]


def test_hed_network_matches_controlnet_aux():
    ref_module = _reference("hed")
    reference = ref_module.ControlNetHED_Apache2()
    ours = HEDNetwork()
    state_dict = _hed_state_dict()
    reference.load_state_dict(state_dict)
    ours.load_state_dict(state_dict)
    x = 255 * torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in zip(ours(x), reference(x), strict=True):
            assert a.shape == b.shape
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


def test_lineart_network_matches_controlnet_aux():
    reference = _reference("lineart").Generator(3, 1, 3).eval()
    ours = LineartGenerator().eval()
    state_dict = _lineart_state_dict()
    reference.load_state_dict(state_dict)
    ours.load_state_dict(state_dict)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(x), reference(x)
    assert a.shape == b.shape == (2, 1, 64, 96)
    assert (a - b).abs().max().item() < 1e-5


def _max_level_difference(ours: Image.Image, theirs: Image.Image) -> int:
    a, b = np.asarray(ours.convert("RGB"), dtype=int), np.asarray(theirs.convert("RGB"), dtype=int)
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("detect, image_res", SIZES)
@pytest.mark.parametrize("safe", [False, True])
def test_hed_annotator_matches_hed_detector(weights, detect, image_res, safe):
    ref_module = _reference("hed")
    network = ref_module.ControlNetHED_Apache2()
    network.load_state_dict(torch.load(weights / "ControlNetHED.pth", weights_only=True))
    detector = ref_module.HEDdetector(network.float().eval())
    spread = []
    for name, image in _images():
        theirs = detector(image, detect_resolution=detect, image_resolution=image_res, safe=safe)
        ours = annotators.hed(image, weights, detect_resolution=detect, image_resolution=image_res, safe=safe)
        spread.append(np.asarray(theirs).std())
        if safe:  # a float32 rounding can tip a value across a step (127 levels): allow a few such pixels
            difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
            assert (difference > 1).mean() < 1e-3, name
        else:
            assert _max_level_difference(ours, theirs) <= 1, name
    assert max(spread) > 10, "flat reference maps test nothing"


@pytest.mark.parametrize("detect, image_res", SIZES)
@pytest.mark.parametrize("coarse", [False, True])
def test_lineart_annotator_matches_lineart_detector(weights, detect, image_res, coarse):
    ref_module = _reference("lineart")
    models = []
    for file in ("sk_model.pth", "sk_model2.pth"):
        model = ref_module.Generator(3, 1, 3)
        model.load_state_dict(torch.load(weights / file, weights_only=True))
        models.append(model.eval())
    detector = ref_module.LineartDetector(*models)
    ours_fn = annotators.lineart_coarse if coarse else annotators.lineart_realistic
    for name, image in _images():
        theirs = detector(image, coarse=coarse, detect_resolution=detect, image_resolution=image_res)
        ours = ours_fn(image, weights, detect_resolution=detect, image_resolution=image_res)
        assert np.asarray(theirs).std() > 10, f"{name}: a flat reference map tests nothing"
        assert _max_level_difference(ours, theirs) <= 1, name


@pytest.mark.parametrize("method, flag", [("linear", "INTER_LINEAR"), ("area", "INTER_AREA"),
                                          ("lanczos4", "INTER_LANCZOS4")])
@pytest.mark.parametrize("src, dst", [((96, 160), (128, 64)), ((66, 100), (128, 64)), ((37, 53), (100, 70)),
                                      ((64, 64), (32, 32))])
def test_resize_matches_opencv(method, flag, src, dst):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    ours = learned.resize(pixels, dst, method).astype(int)
    theirs = cv2.resize(pixels, dst, interpolation=getattr(cv2, flag)).astype(int)
    assert np.abs(ours - theirs).max() <= (0 if method == "lanczos4" else 1)  # OpenCV rounds between passes
    assert (ours != theirs).mean() < 0.15
    values = rng.standard_normal(src).astype(np.float32)
    if method == "linear":
        assert np.abs(learned.resize(values, dst, method) - cv2.resize(values, dst, interpolation=cv2.INTER_LINEAR)
                      ).max() < 1e-4


def test_output_keeps_the_input_size_and_polarity(weights):
    image = _images()[1][1]
    for fn in (annotators.hed, annotators.lineart_realistic, annotators.lineart_coarse):
        out = fn(image, weights, detect_resolution=64)
        assert out.size == image.size and out.mode == "RGB"
    blank = Image.new("RGB", (64, 64), "white")
    lines = np.asarray(annotators.lineart_realistic(blank, weights, detect_resolution=64))
    generator = LineartGenerator().eval()
    generator.load_state_dict(_lineart_state_dict(1))
    with torch.no_grad():
        raw = generator(torch.ones(1, 3, 64, 64))[0, 0].numpy()
    assert np.abs(lines[..., 0].astype(int) - (255 - (raw * 255).astype(np.uint8))).max() <= 0


def test_full_size_layouts_on_meta_device():
    with torch.device("meta"):
        hed, line = HEDNetwork(), LineartGenerator()
    assert sum(v.numel() for v in hed.state_dict().values()) == 14_716_168            # VGG-16 convs + 5 + norm
    assert "block5.convs.2.weight" in hed.state_dict() and "model2.2.conv_block.5.weight" in line.state_dict()
    try:
        hed_ref, line_ref = _reference("hed"), _reference("lineart")
    except pytest.skip.Exception:
        return
    with torch.device("meta"):
        pairs = [(hed, hed_ref.ControlNetHED_Apache2()), (line, line_ref.Generator(3, 1, 3))]
    for ours, theirs in pairs:
        shapes = [{k: v.shape for k, v in module.state_dict().items()} for module in (ours, theirs)]
        assert shapes[0] == shapes[1]


def test_missing_weights_name_the_file_and_repository(tmp_path, monkeypatch):
    monkeypatch.delenv(learned.ANNOTATORS_ENV, raising=False)
    with pytest.raises(AnnotatorWeightsNotFoundError, match="DIFFSTUDIO_ANNOTATORS") as err:
        annotators.hed(Image.new("RGB", (64, 64)))
    assert "ControlNetHED.pth" in str(err.value) and "lllyasviel/Annotators" in str(err.value)
    with pytest.raises(AnnotatorWeightsNotFoundError, match="sk_model2.pth.*lllyasviel/Annotators"):
        annotators.lineart_coarse(Image.new("RGB", (64, 64)), tmp_path)
    with pytest.raises(AnnotatorWeightsNotFoundError, match="does not exist"):
        annotators.lineart_realistic(Image.new("RGB", (64, 64)), tmp_path / "nowhere")


def test_corrupt_and_wrong_files_are_named(weights, tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CorruptFileError):
        annotators.hed(Image.new("RGB", (64, 64)), tmp_path)
    torch.save(_lineart_state_dict(), tmp_path / "wrong.pth")                       # a line-art file given to HED
    with pytest.raises(UnknownModelError, match="not the HED network"):
        annotators.hed(Image.new("RGB", (64, 64)), tmp_path / "wrong.pth")
    with pytest.raises(InvalidInputError):
        annotators.hed(Image.new("RGB", (64, 64)), weights, detect_resolution=32)


def test_networks_are_cached_per_file(weights, tmp_path):
    first = learned.load_network("hed", "ControlNetHED.pth", weights, "cpu", "HED")
    assert learned.load_network("hed", "ControlNetHED.pth", str(weights), "cpu", "HED") is first
    copy = tmp_path / "ControlNetHED.pth"
    copy.write_bytes((weights / "ControlNetHED.pth").read_bytes())
    assert learned.load_network("hed", "ControlNetHED.pth", tmp_path, "cpu", "HED") is not first


def test_preprocess_names_env_and_cli(weights, tmp_path, monkeypatch):
    from diffstudio.cli import main
    from diffstudio.pipeline.control import control_image

    image = _images()[1][1]
    monkeypatch.setenv(learned.ANNOTATORS_ENV, str(weights))
    for name in ("hed", "lineart_coarse"):  # the names, at a small detection size (512 takes seconds on a CPU)
        monkeypatch.setattr(annotators, name, functools.partial(getattr(learned, name), detect_resolution=64))
    hint = control_image(image, "hed", 64, 64)
    expected = learned.hed(image, weights, detect_resolution=64).resize((77, 64), Image.LANCZOS).crop((6, 0, 70, 64))
    assert torch.equal(hint, annotators.hint_tensor(expected))
    assert not torch.allclose(hint, control_image(image, "lineart_coarse", 64, 64))
    image.save(tmp_path / "in.png")
    monkeypatch.delenv(learned.ANNOTATORS_ENV)
    with pytest.raises(AnnotatorWeightsNotFoundError):
        control_image(image, "hed", 64, 64)
    out = tmp_path / "lines.png"
    assert main(["annotate", "--kind", "lineart_realistic", str(tmp_path / "in.png"), "-o", str(out),
                 "--annotators", str(weights), "--detect-resolution", "64"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)),
                          np.asarray(learned.lineart_realistic(image, weights, detect_resolution=64)))
