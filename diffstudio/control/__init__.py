"""Control images for ControlNets: annotators that turn an image into a control image (docs/controlnet.md)."""

from diffstudio.control.annotators import blur, canny, canny_edges, hint_tensor, inpaint, tile

__all__ = ["blur", "canny", "canny_edges", "hint_tensor", "inpaint", "tile"]
