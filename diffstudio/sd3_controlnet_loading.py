"""Adding an SD3 / SD3.5 ControlNet to a loaded SD3 model: `add_sd3_controlnet(models, path) -> SD3ControlNet`.

The SD3 family's ``controlnet_loader``: ``models.add_controlnet(path)`` comes here for SD3 models. The file or
folder is read by `diffstudio.controlnet_loading.read_controlnet` (single files in diffusers' or our names,
Stability's SD3.5 files, diffusers ``SD3ControlNetModel`` folders), checked to fit the loaded MMDiT, and built in
the model's dtype on its device (docs/controlnet.md, "SD3 ControlNets").
"""

from __future__ import annotations

from pathlib import Path

from diffstudio.errors import ControlNetMismatchError
from diffstudio.models.mmdit import MMDiTConfig
from diffstudio.models.sd3_controlnet import SD3ControlNet, SD3ControlNetConfig


def fit_problems(controlnet: SD3ControlNetConfig, mmdit: MMDiTConfig, latent_channels: int) -> list[str]:
    """Why a ControlNet's residuals or inputs would not fit an MMDiT (empty when they do)."""
    problems = []
    if controlnet.hidden_size != mmdit.hidden_size:
        problems.append(f"its residuals are {controlnet.hidden_size} wide, the MMDiT's image tokens "
                        f"{mmdit.hidden_size}")
    if controlnet.num_heads != mmdit.num_heads:
        problems.append(f"it has {controlnet.num_heads} attention heads, the MMDiT {mmdit.num_heads}")
    if controlnet.patch_size != mmdit.patch_size:
        problems.append(f"its patches are {controlnet.patch_size} pixels a side, the MMDiT's {mmdit.patch_size} "
                        "(its tokens would not line up with the MMDiT's)")
    if controlnet.hint_channels != latent_channels:
        extra = (" (the control latent plus a mask channel: an inpainting ControlNet, which diffstudio does not run)"
                 if controlnet.hint_channels == latent_channels + 1 else "")
        problems.append(f"it reads {controlnet.hint_channels}-channel control latents{extra}, the model's latents "
                        f"have {latent_channels}")
    if controlnet.own_embedding and controlnet.in_channels != mmdit.in_channels:
        problems.append(f"it takes {controlnet.in_channels}-channel latents, the MMDiT {mmdit.in_channels}")
    if controlnet.joint and controlnet.context_in_dim != mmdit.context_in_dim:
        problems.append(f"its text tokens are {controlnet.context_in_dim} wide, the MMDiT's {mmdit.context_in_dim}")
    if controlnet.adm_in_channels != mmdit.adm_in_channels:
        problems.append(f"its pooled text vector is {controlnet.adm_in_channels} wide, the MMDiT's "
                        f"{mmdit.adm_in_channels}")
    return problems


def add_sd3_controlnet(models, path: str | Path) -> SD3ControlNet:
    """Load the SD3 ControlNet at ``path`` for ``models`` (a loaded SD3 `Models`): in its dtype, on its device,
    checked to fit its MMDiT (`ControlNetMismatchError` otherwise). The model itself is not changed."""
    from diffstudio.controlnet_loading import read_controlnet
    from diffstudio.loader import build_component

    mmdit = models.denoiser.config
    # Heads are in no shape without QK-norm: the base's (a config.json or stored config wins).
    detection, part = read_controlnet(path, dit_hints={"num_heads": mmdit.num_heads})
    arch = detection.components["controlnet"].arch
    if detection.family != models.family.name or arch != "sd3_controlnet":
        raise ControlNetMismatchError(f"{path} is a ControlNet for {detection.family} models, the loaded model is "
                                      f"{models.family.name}: use a ControlNet made for {models.family.name}")
    problems = fit_problems(part.config, mmdit, models.family.latent.channels)
    if problems:
        raise ControlNetMismatchError(f"{path} is an SD3 ControlNet that does not fit this model's MMDiT: "
                                      + "; ".join(problems) + ". It was made for another base model.")
    controlnet = build_component("controlnet", arch, part, models.dtype, models.device, consume=True)
    if not part.config.own_embedding:  # SD3.5's: x is embedded by the base MMDiT's patch embedding
        controlnet.use_base_embedding(models.denoiser)
    if part.config.zero_pooled:
        # InstantX's ControlNets were trained on unshifted control latents (z * scale; diffusers' pipeline applies
        # no shift for them); the pipeline hands (z - shift) * scale.
        latent = models.family.latent
        controlnet.hint_offset = latent.shift * latent.scale
    controlnet.source = str(path)
    return controlnet
