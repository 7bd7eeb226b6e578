"""Adding a FLUX ControlNet to a loaded FLUX model (``Family.controlnet_loader`` of families/flux.py).

The file or folder is read by ``controlnet_loading.read_controlnet`` (every ControlNet architecture), with
the base transformer's RoPE split and theta as hints; then it must fit the base: the same hidden width
(its residuals are added to the transformer's image tokens), heads, packed input width, text and pooled
widths, and a guidance input only where the base has one (docs/controlnet.md, "FLUX ControlNets").
"""

from __future__ import annotations

from pathlib import Path

from diffstudio.errors import ControlNetMismatchError
from diffstudio.models.flux import FluxConfig
from diffstudio.models.flux_controlnet import FluxControlNet, FluxControlNetConfig

ARCHS = ("flux_controlnet", "xlabs_flux_controlnet")  # InstantX's layout, XLabs'


def fit_problems(controlnet: FluxControlNetConfig, base: FluxConfig) -> list[str]:
    """Why a FLUX ControlNet would not fit a FLUX transformer (empty when it does)."""
    fields = {"hidden_size": "hidden width", "num_heads": "attention heads",
              "in_channels": "packed latent width (in_channels)", "context_in_dim": "text (T5) width",
              "vec_in_dim": "pooled text (CLIP) width"}
    problems = [f"its {what} is {getattr(controlnet, f)}, the transformer's {getattr(base, f)}"
                for f, what in fields.items() if getattr(controlnet, f) != getattr(base, f)]
    if controlnet.guidance_embed and not base.guidance_embed:
        problems.append("it embeds a guidance scale (made for FLUX.1-dev) and this model has no guidance input "
                        "(schnell)")
    return problems


def add_flux_controlnet(models, path: str | Path) -> FluxControlNet:  # or its XLabsFluxControlNet subclass
    """Load the FLUX ControlNet at ``path`` for ``models`` (a loaded FLUX `Models`), in its dtype, on its
    device; `ControlNetMismatchError` when it is another model's ControlNet or does not fit."""
    from diffstudio.controlnet_loading import read_controlnet
    from diffstudio.detect.controlnet import ROLE
    from diffstudio.loader import build_component

    base = models.denoiser.config
    detection, part = read_controlnet(path, {"axes_dim": list(base.axes_dim), "theta": base.theta})
    arch = detection.components[ROLE].arch
    if arch not in ARCHS:
        raise ControlNetMismatchError(f"{path} is a ControlNet for {detection.family} models, the loaded model is "
                                      f"{models.family.name}: use a FLUX ControlNet (InstantX, XLabs, diffusers "
                                      "FluxControlNetModel)")
    problems = fit_problems(part.config, base)
    if problems:
        raise ControlNetMismatchError(f"{path} is a FLUX ControlNet that does not fit this model's transformer: "
                                      + "; ".join(problems) + ". It was made for another base architecture.")
    controlnet = build_component(ROLE, arch, part, models.dtype, models.device, consume=True)
    controlnet.transformer_blocks = (base.depth, base.depth_single_blocks)  # one residual per transformer block
    return controlnet
