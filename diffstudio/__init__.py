"""diffstudio: a unified diffusion engine.

    import diffstudio
    models = diffstudio.load("model.safetensors")        # or a diffusers folder; none = the demo model
    images = diffstudio.Pipeline(models)("a red circle", steps=20, seed=1)

The public names below are imported on first use (PEP 562), so ``import diffstudio`` and the
command line's ``--help`` do not pay for torch: the command line must be able to choose the
OpenMP thread policy before torch starts (diffstudio/threads.py).
"""

from __future__ import annotations

import importlib
import sys
import types

from diffstudio.errors import (
    ConversionError,
    CorruptFileError,
    DiffstudioError,
    InvalidInputError,
    InvalidSizeError,
    MemoryPlanError,
    ModelNotFoundError,
    NaNError,
    RegionError,
    UnknownModelError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "Detection": "diffstudio.detect",
    "Models": "diffstudio.loader",
    "load": "diffstudio.loader",
    "Pipeline": "diffstudio.pipeline.generate",
    "Region": "diffstudio.pipeline.regions",
    "RegionLayout": "diffstudio.pipeline.regions",
    "Request": "diffstudio.pipeline.request",
    "ControlNetUnit": "diffstudio.pipeline.control",
    "ImagePrompt": "diffstudio.pipeline.ip_adapter",
    "TiledDiffusion": "diffstudio.pipeline.tiled_diffusion",
    "HiresFix": "diffstudio.pipeline.hires",
    "VideoPipeline": "diffstudio.video.render",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):  # dunder probes (copy, inspect, pickle) are no submodules
        raise AttributeError(f"module 'diffstudio' has no attribute {name!r}")
    try:  # `diffstudio.io.state_dict` and friends work without an explicit import, as before
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'diffstudio' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"detect"})


class _Package(types.ModuleType):
    """``diffstudio.detect`` is the detect() function, although a subpackage has the same name.

    Importing a subpackage binds it on its parent (``diffstudio.detect = <module>``); this property
    keeps the function under the public name, as an eager ``from diffstudio.detect import detect``
    in this file would. The subpackage stays importable as ``diffstudio.detect.<module>``.
    """

    @property
    def detect(self):
        from diffstudio.detect import detect

        return detect

    @detect.setter
    def detect(self, module) -> None:  # the import system binding the subpackage: keep the function
        pass


sys.modules[__name__].__class__ = _Package


def download(repo_id: str, filename: str | None = None, **kwargs):
    """Fetch a model from the Hugging Face Hub (needs internet); returns the local path."""
    from diffstudio.io.download import download as _download

    return _download(repo_id, filename, **kwargs)


__all__ = [
    "ControlNetUnit", "ConversionError", "CorruptFileError", "Detection", "DiffstudioError", "HiresFix", "ImagePrompt",
    "InvalidInputError", "MemoryPlanError",
    "InvalidSizeError", "Models", "ModelNotFoundError", "NaNError", "Pipeline", "Region", "RegionError",
    "RegionLayout", "Request", "TiledDiffusion", "UnknownModelError",
    "UnsafeCheckpointError", "UnsupportedFormatError", "detect", "download", "load",
    "VideoPipeline",
]
