"""Motion LoRAs (AnimateDiff v2 camera LoRAs, e.g. v2_lora_ZoomIn.ckpt) through the LoRA patcher: once a motion
module is loaded, a LoRA whose layers name its attention projections patches it, in the released names
(``...attention_blocks.0.processor.to_q_lora.down.weight``) and in diffusers' (``unet.down_blocks.0.motion_modules.
0.transformer_blocks.0.attn1.to_q.lora_A.weight``). The expected weights are W + up @ down (the files carry no
alpha: scale 1), computed here from the file's tensors; removing the LoRA gives the module back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffstudio
from diffstudio.errors import LoRAMismatchError

MOTION = Path(__file__).resolve().parent.parent / "diffstudio" / "demo" / "weights" / "shapes-motion.safetensors"
RANK = 4
BLOCK = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.{a}"
DIFFUSERS_BLOCK = "unet.down_blocks.1.motion_modules.0.transformer_blocks.0.attn{n}"


def camera_lora(models, layout: str) -> tuple[dict, dict]:
    """A motion LoRA on both temporal attentions of one block (to_q and to_out), and the expected new weights."""
    params = dict(models.components["motion"].named_parameters())
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    for a in (0, 1):
        for proj, ours in (("to_q", "to_q"), ("to_out", "to_out.0")):
            name = f"{BLOCK.format(a=a)}.{ours}.weight"
            weight = params[name]
            down = torch.randn(RANK, weight.shape[1], generator=g) * 0.1
            up = torch.randn(weight.shape[0], RANK, generator=g) * 0.1
            if layout == "released":
                key = f"{BLOCK.format(a=a)}.processor.{proj}_lora"
                sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
            else:
                key = f"{DIFFUSERS_BLOCK.format(n=a + 1)}.{ours}"
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
            expected[name] = weight.detach().float() + up @ down
    return sd, expected


@pytest.fixture()
def models():
    models = diffstudio.load()
    models.add_motion_module(MOTION)
    return models


@pytest.mark.parametrize("layout", ["released", "diffusers"])
def test_a_motion_lora_patches_the_motion_module_and_comes_off_exactly(models, layout):
    motion = models.components["motion"]
    before = {k: v.detach().clone() for k, v in motion.state_dict().items()}
    unet_before = {k: v.detach().clone() for k, v in models.unet.state_dict().items()}
    sd, expected = camera_lora(models, layout)
    handle = models.apply_lora(sd)
    assert handle.report.matched == handle.report.layers == 4
    now = motion.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(now[name].float(), weight, rtol=1e-5, atol=1e-6)
    untouched = [k for k in before if k not in expected]
    assert all(torch.equal(now[k], before[k]) for k in untouched)
    assert all(torch.equal(v, unet_before[k]) for k, v in models.unet.state_dict().items())
    handle.remove()
    assert all(torch.equal(motion.state_dict()[k], v) for k, v in before.items())


def test_a_motion_lora_without_a_motion_module_is_a_named_error():
    models = diffstudio.load()
    with_module = diffstudio.load()
    with_module.add_motion_module(MOTION)
    sd, _ = camera_lora(with_module, "released")
    with pytest.raises(LoRAMismatchError):
        models.apply_lora(sd)
