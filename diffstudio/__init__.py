"""diffstudio: a unified diffusion engine.

    import diffstudio
    models = diffstudio.load("model.safetensors")        # or a diffusers folder; none = the demo model
    images = diffstudio.Pipeline(models)("a red circle", steps=20, seed=1)
"""

from __future__ import annotations

from diffstudio.detect import Detection, detect
from diffstudio.errors import (
    ConversionError,
    CorruptFileError,
    DiffstudioError,
    InvalidInputError,
    InvalidSizeError,
    ModelNotFoundError,
    NaNError,
    RegionError,
    UnknownModelError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from diffstudio.loader import Models, load
from diffstudio.pipeline.generate import Pipeline
from diffstudio.pipeline.regions import Region, RegionLayout
from diffstudio.video.render import VideoPipeline

__version__ = "0.1.0"


def download(repo_id: str, filename: str | None = None, **kwargs):
    """Fetch a model from the Hugging Face Hub (needs internet); returns the local path."""
    from diffstudio.io.download import download as _download

    return _download(repo_id, filename, **kwargs)


__all__ = [
    "ConversionError", "CorruptFileError", "Detection", "DiffstudioError", "InvalidInputError",
    "InvalidSizeError", "Models", "ModelNotFoundError", "NaNError", "Pipeline", "Region", "RegionError",
    "RegionLayout", "UnknownModelError",
    "UnsafeCheckpointError", "UnsupportedFormatError", "detect", "download", "load",
    "VideoPipeline",
]
