"""The annotators run through controlnet-aux (depth, openpose, normal, mlsd, pidinet): how diffstudio finds their
weight files, calls the detector and names what is missing.

controlnet-aux's detectors need torchvision, which does not import with the CPU torch the tests run on, so a
stand-in package takes its place here: its detector classes record the folder ``from_pretrained`` was given and
the options of each call, and draw a known picture. What is checked is ours: the folder and files looked for,
the options passed, the output, and the named errors.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from diffstudio.control import annotators, detectors
from diffstudio.errors import AnnotatorWeightsNotFoundError, MissingExtraError

CLASS_OF = {kind: spec.class_name for kind, spec in detectors.DETECTORS.items()}


@pytest.fixture
def fake_aux(monkeypatch):
    """A stand-in controlnet_aux whose detectors answer with a grey image of the input's size, greyer per kind."""
    loaded, calls = [], []

    def make(name: str, level: int):
        class FakeDetector:
            @classmethod
            def from_pretrained(cls, folder):
                loaded.append((name, folder))
                return cls()

            def __call__(self, image, **options):
                calls.append((name, image.size, options))
                return Image.new("L", image.size, level)

        FakeDetector.__name__ = name
        return FakeDetector

    module = types.ModuleType("controlnet_aux")
    for level, name in enumerate(CLASS_OF.values()):
        setattr(module, name, make(name, 40 * (level + 1)))
    monkeypatch.setitem(sys.modules, "controlnet_aux", module)
    detectors._load.cache_clear()
    yield loaded, calls
    detectors._load.cache_clear()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "Annotators"
    root.mkdir()
    for spec in detectors.DETECTORS.values():
        for name in spec.files:
            (root / name).write_bytes(b"weights")
    return root


def _photo(size=(48, 32)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", list(detectors.DETECTORS))
def test_each_kind_loads_its_detector_from_the_folder_and_passes_the_options(kind, fake_aux, folder):
    loaded, calls = fake_aux
    out = getattr(annotators, kind)(_photo(), folder, detect_resolution=256, image_resolution=128)
    assert loaded == [(CLASS_OF[kind], str(folder.resolve()))]
    name, size, options = calls[0]
    assert name == CLASS_OF[kind] and size == (48, 32)
    assert options["detect_resolution"] == 256 and options["image_resolution"] == 128
    assert options["output_type"] == "pil"
    assert out.mode == "RGB" and out.size == (48, 32)
    level = 40 * (list(CLASS_OF).index(kind) + 1)
    assert np.asarray(out).min() == np.asarray(out).max() == level


def test_a_detector_is_loaded_once_per_folder(fake_aux, folder, tmp_path):
    loaded, _ = fake_aux
    annotators.depth(_photo(), folder)
    annotators.depth(_photo(), folder)
    other = tmp_path / "other"
    other.mkdir()
    (other / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"weights")
    annotators.depth(_photo(), other)
    assert [f for _, f in loaded] == [str(folder.resolve()), str(other.resolve())]


def test_pidinet_draws_soft_edges_not_the_safe_variant_unless_asked(fake_aux, folder):
    _, calls = fake_aux
    annotators.pidinet(_photo(), folder)
    annotators.pidinet(_photo(), folder, safe=True)
    assert calls[0][2]["safe"] is False and calls[1][2]["safe"] is True


def test_a_missing_file_is_named_before_anything_loads(fake_aux, folder):
    loaded, _ = fake_aux
    (folder / "hand_pose_model.pth").unlink()
    with pytest.raises(AnnotatorWeightsNotFoundError, match="hand_pose_model.pth") as err:
        annotators.openpose(_photo(), folder)
    assert "lllyasviel/Annotators" in str(err.value) and loaded == []


def test_without_a_folder_the_error_says_where_to_put_the_file(fake_aux, monkeypatch):
    monkeypatch.delenv("DIFFSTUDIO_ANNOTATORS", raising=False)
    with pytest.raises(AnnotatorWeightsNotFoundError, match="scannet.pt.*DIFFSTUDIO_ANNOTATORS"):
        annotators.normal(_photo())


def test_the_folder_comes_from_the_environment(fake_aux, folder, monkeypatch):
    loaded, _ = fake_aux
    monkeypatch.setenv("DIFFSTUDIO_ANNOTATORS", str(folder))
    annotators.mlsd(_photo())
    assert loaded == [("MLSDdetector", str(folder.resolve()))]


def test_controlnet_aux_that_does_not_import_is_a_named_error(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import raises ImportError
    detectors._load.cache_clear()
    with pytest.raises(MissingExtraError, match="pip install controlnet-aux"):
        annotators.depth(_photo(), folder)


def test_controlnet_aux_without_the_class_is_a_named_error(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    detectors._load.cache_clear()
    with pytest.raises(MissingExtraError, match="no MidasDetector"):
        annotators.depth(_photo(), folder)
    detectors._load.cache_clear()


def test_pickle_loading_is_refused_on_a_torch_that_would_run_their_code(fake_aux, folder, monkeypatch):
    from diffstudio.errors import UnsafeCheckpointError

    loaded, _ = fake_aux
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="weights only"):
        annotators.depth(_photo(), folder)
    assert loaded == []


def test_a_controlnet_unit_and_the_cli_take_the_names(fake_aux, folder, tmp_path, monkeypatch):
    from diffstudio.cli import main
    from diffstudio.pipeline.control import PREPROCESSORS

    assert set(detectors.DETECTORS) <= set(PREPROCESSORS)
    _photo().save(tmp_path / "in.png")
    out = tmp_path / "pose.png"
    assert main(["annotate", "--kind", "openpose", str(tmp_path / "in.png"), "-o", str(out),
                 "--annotators", str(folder), "--detect-resolution", "384"]) == 0
    _, calls = fake_aux
    assert calls[-1][2]["detect_resolution"] == 384 and "image_resolution" not in calls[-1][2]
    assert Image.open(out).size == (48, 32)


def test_the_files_an_annotator_reads_are_checked_before_any_work(tmp_path):
    assert annotators.weight_files("canny") == () and annotators.weight_files("tile") == ()
    assert annotators.weight_files("hed") == ("ControlNetHED.pth",)
    assert annotators.weight_files("lineart_coarse") == ("sk_model2.pth",)
    assert annotators.weight_files("openpose") == ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    annotators.check_weight_files("canny", tmp_path)  # weight-free: nothing to find
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    with pytest.raises(AnnotatorWeightsNotFoundError, match="hand_pose_model.pth"):
        annotators.check_weight_files("openpose", tmp_path)
    for name in ("hand_pose_model.pth", "facenet.pth"):
        (tmp_path / name).write_bytes(b"")
    annotators.check_weight_files("openpose", tmp_path)
