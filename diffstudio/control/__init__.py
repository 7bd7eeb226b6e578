"""Control images for ControlNets: annotators that turn an image into a control image (docs/controlnet.md)."""

__all__ = ["blur", "canny", "canny_edges", "hint_tensor", "inpaint", "lineart", "softedge", "tile"]


def __getattr__(name: str):
    # Imported on first use, so that the command line (diffstudio.control.cli) does not load SciPy to start.
    if name in __all__:
        from diffstudio.control import annotators

        return getattr(annotators, name)
    raise AttributeError(f"module 'diffstudio.control' has no attribute {name!r}")
