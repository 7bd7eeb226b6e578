"""Adding a Hunyuan-DiT ControlNet to a loaded Hunyuan-DiT model: `add_hunyuan_controlnet(models, path)`.

The Hunyuan-DiT family's ``controlnet_loader``: ``models.add_controlnet(path)`` comes here for Hunyuan-DiT models.
The file or folder (Tencent's ``.pt`` files, diffusers ``HunyuanDiT2DControlNetModel`` folders or single files) is
read by `diffstudio.controlnet_loading.read_controlnet`, checked to fit the loaded DiT, and built in the model's dtype
on its device (docs/controlnet.md, "Hunyuan-DiT ControlNets").
"""

from __future__ import annotations

from pathlib import Path

from diffstudio.errors import ControlNetMismatchError
from diffstudio.models.hunyuan_dit import HunyuanDiTConfig
from diffstudio.models.hunyuan_dit_controlnet import HunyuanDiTControlNet, controlnet_depth

# (field, what it is) that must equal the base DiT's for the ControlNet's inputs and residuals to fit.
FITTING = (("hidden_size", "width"), ("num_heads", "attention heads"), ("patch_size", "patch size"),
           ("in_channels", "latent channels"), ("text_dim", "BERT width"), ("text_dim_t5", "mT5 width"),
           ("text_len", "BERT tokens"), ("text_len_t5", "mT5 tokens"), ("pooler_dim", "pooled text width"))


def fit_problems(controlnet: HunyuanDiTConfig, dit: HunyuanDiTConfig) -> list[str]:
    """Why a ControlNet would not fit a Hunyuan-DiT (empty when it does)."""
    problems = [f"its {what} is {getattr(controlnet, f)}, the DiT's {getattr(dit, f)}"
                for f, what in FITTING if getattr(controlnet, f) != getattr(dit, f)]
    if controlnet_depth(controlnet) != controlnet_depth(dit):
        problems.append(f"it gives {controlnet_depth(controlnet)} residuals, the DiT has {controlnet_depth(dit)} long "
                        "skips")
    if controlnet.size_style_cond != dit.size_style_cond:
        made, base = ("v1.0/v1.1", "v1.2") if controlnet.size_style_cond else ("v1.2", "v1.0/v1.1")
        problems.append(f"it was made for Hunyuan-DiT {made} (size and style conditioning "
                        f"{'on' if controlnet.size_style_cond else 'off'}), the model is {base}")
    return problems


def add_hunyuan_controlnet(models, path: str | Path) -> HunyuanDiTControlNet:
    """Load the Hunyuan-DiT ControlNet at ``path`` for ``models`` (a loaded Hunyuan-DiT `Models`): in its dtype, on
    its device, checked to fit its DiT (`ControlNetMismatchError` otherwise). The model itself is not changed."""
    from diffstudio.controlnet_loading import read_controlnet
    from diffstudio.loader import build_component

    detection, part = read_controlnet(path)
    arch = detection.components["controlnet"].arch
    if detection.family != models.family.name or arch != "hunyuan_dit_controlnet":
        raise ControlNetMismatchError(f"{path} is a ControlNet for {detection.family} models, the loaded model is "
                                      f"{models.family.name}: use a ControlNet made for {models.family.name}")
    problems = fit_problems(part.config, models.denoiser.config)
    if problems:
        raise ControlNetMismatchError(f"{path} is a Hunyuan-DiT ControlNet that does not fit this model's DiT: "
                                      + "; ".join(problems) + ".")
    controlnet = build_component("controlnet", arch, part, models.dtype, models.device, consume=True)
    controlnet.source = str(path)
    return controlnet
