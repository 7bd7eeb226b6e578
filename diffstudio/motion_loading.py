"""Load an AnimateDiff motion module file and add it to a loaded model (docs/animatediff.md).

Reads ``.safetensors`` and ``.ckpt``/``.pt`` (weights-only unpickling, io/pickle_checkpoint.py) and
diffusers ``MotionAdapter`` folders; the released layout and diffusers' layout both load. The modules
are checked against the model's UNet (one width and one module count per level) before they are added.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffstudio.convert.motion import complete_positions, motion_from_diffusers
from diffstudio.detect.motion import derive_motion_config, is_motion_layout, stored_motion_config
from diffstudio.errors import MotionModuleMismatchError
from diffstudio.io import read_file_metadata, read_state_dict
from diffstudio.models.motion import MotionConfig, MotionModules
from diffstudio.models.unet import UNetModel


def motion_state_dict(sd: dict, metadata: dict | None = None, hints: dict | None = None,
                      what: str = "the state dict") -> tuple[dict, MotionConfig]:
    """Any supported layout -> (complete released-layout state dict, config). A config stored with the
    weights wins over one derived from shapes; ``hints`` fill what shapes cannot tell (heads, groups)."""
    layout = is_motion_layout(sd)
    if layout is None:
        heads = sorted({k.split(".")[0] for k in sd})[:6]
        raise MotionModuleMismatchError(f"{what} is not an AnimateDiff motion module (no down_blocks.0.motion_modules"
                                        f" keys; its top-level keys are {heads}). Pass an mm_*.ckpt / .safetensors "
                                        "motion module file or a diffusers MotionAdapter folder.")
    canonical = dict(sd) if layout == "original" else motion_from_diffusers(sd)
    config = stored_motion_config(metadata) or derive_motion_config(canonical, hints)
    return complete_positions(canonical, config), config


def read_motion_modules(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        hints: dict | None = None) -> MotionModules:
    """A motion module file or MotionAdapter folder -> MotionModules with its weights (eval mode)."""
    sd, config = motion_state_dict(read_state_dict(path), read_file_metadata(path), hints, what=str(path))
    with torch.device("meta"):
        modules = MotionModules(config)
    modules.load_state_dict(sd, assign=True)
    return modules.to(device=device, dtype=dtype).eval()


def add_motion_module(models, path: str | Path, hints: dict | None = None) -> MotionModules:
    """Read a motion module and add it to `models` (a loader.Models) as its ``motion`` component.

    Raises MotionModuleMismatchError when the model's denoiser is not an LDM UNet or the modules do
    not fit it (an SDXL module on SD 1.x, a v1.5 module on SDXL). The UNet itself is not changed: a
    video pipeline passes ``motion=models.motion, num_frames=F`` to it (docs/animatediff.md).
    """
    unet = models.denoiser
    if not isinstance(unet, UNetModel):
        raise MotionModuleMismatchError(f"AnimateDiff motion modules go into an LDM UNet (SD 1.x, SDXL); this "
                                        f"{models.family.name} model's denoiser is a {type(unet).__name__}")
    modules = read_motion_modules(path, dtype=models.dtype, device=models.device, hints=hints)
    reason = modules.mismatch(unet.config)
    if reason:
        raise MotionModuleMismatchError(f"{path}: {reason}. Use a motion module made for {models.family.name} "
                                        "(mm_sd_v15*/v3_sd15_mm for SD 1.x, mm_sdxl_v10_beta for SDXL).")
    models.components["motion"] = modules
    models.configs["motion"] = modules.config
    models.sources["motion"] = str(path)
    return modules
