"""The ControlNet annotators that are not built in, run through controlnet-aux's detectors: ``depth`` (MiDaS
DPT-Hybrid), ``openpose`` (body), ``normal`` (NormalBae), ``mlsd`` (straight lines) and ``pidinet`` (PiDiNet soft
edges). Each reads its weight files from the annotator folder that the learned built-in annotators use
(``weights_dir=``, ``diffstudio annotate --annotators DIR`` or ``$DIFFSTUDIO_ANNOTATORS``), holding the files of
the Hugging Face repository lllyasviel/Annotators; nothing is downloaded.

controlnet-aux is an optional package (``pip install controlnet-aux``, which needs a torchvision that matches
torch). Its detectors read the ``.pth`` pickles with ``torch.load``'s default, which refuses code only from torch
2.6 on: on an older torch they are refused rather than run. A missing file raises
``AnnotatorWeightsNotFoundError`` naming it; the package missing raises ``MissingExtraError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

from diffstudio.control.learned import weights_file
from diffstudio.errors import MissingExtraError, UnsafeCheckpointError
from diffstudio.io.images import ImageLike, load_image


@dataclass(frozen=True)
class Detector:
    """controlnet-aux's class, the files its ``from_pretrained(folder)`` reads, and what the error calls it."""

    class_name: str
    files: tuple[str, ...]
    what: str
    options: dict = field(default_factory=dict)  # call options of the ControlNet 1.1 preprocessor


DETECTORS = {
    "depth": Detector("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",), "the MiDaS depth annotator"),
    "openpose": Detector("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
                         "the OpenPose annotator"),
    "normal": Detector("NormalBaeDetector", ("scannet.pt",), "the NormalBae normal-map annotator"),
    "mlsd": Detector("MLSDdetector", ("mlsd_large_512_fp32.pth",), "the M-LSD line annotator"),
    "pidinet": Detector("PidiNetDetector", ("table5_pidinet.pth",), "the PiDiNet soft-edge annotator",
                        {"safe": False}),
}


def _check_safe_loading() -> None:
    import torch
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < "2.6" or os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") != "0":
        raise UnsafeCheckpointError(
            "controlnet-aux's detectors read pickles with torch.load's default, which runs their code unless "
            "torch >= 2.6 loads weights only (and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is unset): refused")


def _controlnet_aux():
    try:
        import controlnet_aux
    except Exception as err:  # noqa: BLE001 - also a torchvision that does not match torch fails at import
        raise MissingExtraError(
            f"this annotator runs through controlnet-aux, which did not import ({type(err).__name__}: {err}): "
            "pip install controlnet-aux (with a torchvision built for your torch)") from err
    return controlnet_aux


@lru_cache(maxsize=4)
def _load(kind: str, folder: str):
    _check_safe_loading()
    name = DETECTORS[kind].class_name
    detector = getattr(_controlnet_aux(), name, None)
    if detector is None:
        raise MissingExtraError(f"the installed controlnet-aux has no {name}: pip install -U controlnet-aux")
    return detector.from_pretrained(folder)


def detect(kind: str, image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """The ``kind`` control image of ``image`` (white-on-black edges and lines, a depth or normal map, a pose
    skeleton), as controlnet-aux's detector draws it; ``options`` go to the detector's call
    (``detect_resolution``, ``image_resolution``, ...)."""
    spec = DETECTORS[kind]
    paths = [weights_file(name, weights_dir, spec.what) for name in spec.files]
    detector = _load(kind, str(paths[0].parent.resolve()))
    out = detector(load_image(image), **{**spec.options, "output_type": "pil", **options})
    return out.convert("RGB")


def depth(image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """MiDaS (DPT-Hybrid) depth, near is bright: ``dpt_hybrid-midas-501f0c75.pt``."""
    return detect("depth", image, weights_dir, **options)


def openpose(image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """OpenPose body skeletons on black: ``body_pose_model.pth`` (plus the hand and face files it loads)."""
    return detect("openpose", image, weights_dir, **options)


def normal(image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """NormalBae surface normals as RGB: ``scannet.pt``."""
    return detect("normal", image, weights_dir, **options)


def mlsd(image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """M-LSD straight line segments, white on black: ``mlsd_large_512_fp32.pth``."""
    return detect("mlsd", image, weights_dir, **options)


def pidinet(image: ImageLike, weights_dir: str | Path | None = None, **options) -> Image.Image:
    """PiDiNet soft edges, white on black (the softedge ControlNet's other annotator): ``table5_pidinet.pth``."""
    return detect("pidinet", image, weights_dir, **options)
