"""Released ControlNet layouts at full size on the meta device: diffusers' ControlNetModel at the real SD 1.5 and
SDXL configs, converted to cldm names, has exactly our model's keys and shapes, and detection places it."""

from __future__ import annotations

import inspect

import pytest
import torch

from diffstudio.convert.controlnet import controlnet_from_diffusers, controlnet_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.controlnet import controlnet_config_from_diffusers
from diffstudio.models.controlnet import ControlNetModel
from diffstudio.release_configs import SD15_UNET, SDXL_UNET

RELEASED = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def meta_reference(family: str):
    """diffusers ControlNetModel with the encoder of the released UNet (what lllyasviel's sd15 ControlNets and
    diffusers' SDXL ControlNets are), on the meta device."""
    from diffusers import ControlNetModel as Reference

    accepted = set(inspect.signature(Reference.__init__).parameters)
    config = {k: v for k, v in RELEASED[family].items() if k in accepted}
    with torch.device("meta"):
        return Reference(**config)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_released_layout_converts_to_ours_and_is_detected(family, prefix):
    ref = meta_reference(family)
    cldm = controlnet_from_diffusers(ref.state_dict())
    config = controlnet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = ControlNetModel(config).state_dict()
    assert {k: tuple(v.shape) for k, v in cldm.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    # The released cldm names (control_v11p_sd15_canny.pth): spot checks of the hint encoder and zero convs.
    if family == "sd15":
        assert tuple(cldm["input_hint_block.14.weight"].shape) == (320, 256, 3, 3)
        assert tuple(cldm["zero_convs.11.0.weight"].shape) == (1280, 1280, 1, 1)
        assert len([k for k in cldm if k.startswith("zero_convs.") and k.endswith("weight")]) == 12
    else:
        assert tuple(cldm["label_emb.0.0.weight"].shape) == (1280, 2816)
        assert len([k for k in cldm if k.startswith("zero_convs.") and k.endswith("weight")]) == 9

    det = detect({prefix + k: v for k, v in cldm.items()})
    assert det.family == family and list(det.components) == ["controlnet"]
    found = det.components["controlnet"].config
    assert found == config  # heads, groups: the family's conventions are the released ones
    assert set(controlnet_to_diffusers(cldm, found)) == set(ref.state_dict())
    # The diffusers layout is placed too.
    assert detect(ref.state_dict()).components["controlnet"].layout == "diffusers"
