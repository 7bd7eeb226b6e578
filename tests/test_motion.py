"""AnimateDiff motion modules in our UNet: parity with diffusers' UNetMotionModel (tiny, random weights),
the original per-frame GroupNorm, the zero-initialised identity, frame mixing, and the hook's errors."""

from __future__ import annotations

import pytest
import torch
from tiny_motion import SETUPS, inputs, ours, reference, rel_err, run_ours, run_reference
from torch import nn

from diffstudio.errors import InvalidInputError, InvalidSizeError, MotionModuleMismatchError
from diffstudio.models.motion import MotionConfig, MotionModules, PositionalEncoding


class PerFrameGroupNorm(nn.Module):
    """The original AnimateDiff's norm placed into diffusers' AnimateDiffTransformer3D: that module hands
    its norm (B, C, F, H, W); the original normalises each frame, i.e. GroupNorm over (B*F, C, H, W)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)


@pytest.mark.parametrize("name", list(SETUPS))
def test_parity_with_diffusers_unet_motion_model(name):
    """diffusers normalises over all frames together: our norm_across_frames=True must match it."""
    unet, adapter, motion_unet = reference(name)
    model, motion = ours(name, unet, adapter, norm_across_frames=True)
    frames = adapter.config.motion_max_seq_length  # the longest clip the tables allow
    data = inputs(name, batch=2, frames=frames)
    ref = run_reference(motion_unet, name, data)
    out = run_ours(model, name, data, motion=motion, num_frames=frames)
    assert rel_err(out, ref) < 1e-4
    # The motion modules matter: without them the output is far from the reference.
    assert rel_err(run_ours(model, name, data), ref) > 1e-2


@pytest.mark.parametrize("name", ["sd15_v2", "sd15_v3"])
def test_parity_per_frame_norm_of_the_original(name):
    """Default convention (the released code's): diffusers with its temporal norms made per-frame."""
    unet, adapter, motion_unet = reference(name)
    for module in motion_unet.modules():
        if type(module).__name__ == "AnimateDiffTransformer3D":
            module.norm = PerFrameGroupNorm(module.norm)
    model, motion = ours(name, unet, adapter, norm_across_frames=False)
    data = inputs(name, batch=2, frames=4)
    assert rel_err(run_ours(model, name, data, motion=motion, num_frames=4), run_reference(motion_unet, name, data)) \
        < 1e-4
    # ... and the two conventions really differ.
    _, joint = ours(name, unet, adapter, norm_across_frames=True)
    assert rel_err(run_ours(model, name, data, motion=joint, num_frames=4),
                   run_ours(model, name, data, motion=motion, num_frames=4)) > 1e-3


def test_zero_initialised_motion_module_gives_framewise_sd_exactly():
    """proj_out starts at zero (AnimateDiff sec. 4.2): every module is the identity, bit for bit."""
    unet, adapter, _ = reference("sd15_v2")
    model, trained = ours("sd15_v2", unet, adapter, norm_across_frames=False)
    fresh = MotionModules(trained.config).eval()
    assert all(not m.temporal_transformer.proj_out.weight.any() for m in fresh.modules()
               if hasattr(m, "temporal_transformer"))
    data = inputs("sd15_v2", batch=2, frames=3)
    assert torch.equal(run_ours(model, "sd15_v2", data, motion=fresh, num_frames=3), run_ours(model, "sd15_v2", data))


def test_frames_mix_within_a_video_only():
    unet, adapter, _ = reference("sd15_v3")
    model, motion = ours("sd15_v3", unet, adapter, norm_across_frames=False)
    data = inputs("sd15_v3", batch=2, frames=4)
    base = run_ours(model, "sd15_v3", data, motion=motion, num_frames=4)
    data["sample"][0, :, 0] += 1.0  # change frame 0 of video 0
    changed = run_ours(model, "sd15_v3", data, motion=motion, num_frames=4)
    diff = (changed - base).flatten(1).norm(dim=1)  # per frame, (B*F,)
    assert (diff[1:4] > 1e-4).all()  # the other frames of video 0 see it through the temporal attention
    assert torch.equal(changed[4:], base[4:])  # video 1 does not
    # Without motion modules, frames are independent.
    plain = run_ours(model, "sd15_v3", data)
    data["sample"][0, :, 0] -= 1.0
    assert torch.equal(run_ours(model, "sd15_v3", data)[1:], plain[1:])


def test_gradient_checkpointing_with_motion_matches_and_trains_the_modules():
    unet, adapter, _ = reference("sd15_v2")
    model, motion = ours("sd15_v2", unet, adapter, norm_across_frames=False)
    data = inputs("sd15_v2", batch=1, frames=3)
    b, c, f, h, w = data["sample"].shape
    x = data["sample"].permute(0, 2, 1, 3, 4).reshape(f, c, h, w)
    args = (x, data["timestep"].repeat_interleave(f), data["context"])
    plain = model(*args, motion=motion, num_frames=f)
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in motion.parameters()]
    motion.zero_grad()
    model.gradient_checkpointing = True
    checked = model(*args, motion=motion, num_frames=f)
    checked.square().mean().backward()
    assert torch.allclose(checked, plain, atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(motion.parameters(), grads))
    assert any(g.abs().sum() > 0 for g in grads)


def test_hook_errors_are_named():
    unet, adapter, _ = reference("sd15_v2")
    model, motion = ours("sd15_v2", unet, adapter, norm_across_frames=False)
    data = inputs("sd15_v2", batch=1, frames=4)
    with pytest.raises(InvalidInputError, match="num_frames"):
        run_ours(model, "sd15_v2", data, motion=motion)
    with pytest.raises(InvalidInputError, match="divisor"):
        run_ours(model, "sd15_v2", data, motion=motion, num_frames=3)
    too_long = inputs("sd15_v2", batch=1, frames=9)  # the tables hold 8 positions
    with pytest.raises(InvalidSizeError, match="context windows"):
        run_ours(model, "sd15_v2", too_long, motion=motion, num_frames=9)
    wide = MotionModules(MotionConfig(level_channels=[64, 128], modules_per_level=[1, 1], num_heads=2, norm_groups=8))
    with pytest.raises(MotionModuleMismatchError, match="widths"):
        run_ours(model, "sd15_v2", data, motion=wide, num_frames=4)
    deep = MotionModules(MotionConfig(level_channels=[32, 64], modules_per_level=[2, 2], num_heads=2, norm_groups=8))
    with pytest.raises(MotionModuleMismatchError, match="ResBlocks"):
        run_ours(model, "sd15_v2", data, motion=deep, num_frames=4)


def test_hook_sites_follow_the_unet_structure():
    unet, adapter, _ = reference("sdxl")
    model, _ = ours("sdxl", unet, adapter, norm_across_frames=False)
    sites = model.temporal_sites
    # conv_in, then per level: ResBlock(s) then a Downsample (none after the last level).
    assert sites["input"] == [None, ("down", 0, 0), None, ("down", 1, 0), None, ("down", 2, 0)]
    assert sites["middle"] == [("mid", 0, 0)]
    assert sites["output"] == [("up", u, j) for u in range(3) for j in range(2)]


def test_positions_give_the_stored_rows_at_whole_positions_and_the_sinusoid_between():
    """Sub-frame positions (dilated context windows): at whole positions the stored table's rows whatever it holds;
    between them the sinusoid of Vaswani et al. evaluated there, plus the table's departure from it interpolated
    linearly (here the departure is a ramp in the position, so its interpolation is exact)."""
    import math

    dim, rows = 8, 6
    encoding = PositionalEncoding(dim, rows)
    ramp = torch.arange(rows, dtype=torch.float32)[:, None] * torch.linspace(-1, 1, dim)
    encoding.pe += ramp  # a file whose table is not the plain sinusoid
    x = torch.zeros(2, 4, dim)
    whole = torch.tensor([0.0, 1.0, 2.0, 5.0])
    assert torch.allclose(encoding(x, whole)[0], encoding.pe[0, [0, 1, 2, 5]], atol=1e-6)
    assert torch.equal(encoding(x[:, :3]), encoding.pe[:, :3].expand(2, 3, dim))  # no positions: the rows
    between = torch.tensor([0.5, 1 / 3, 2.25, 4.75])
    expected = torch.tensor([[math.sin(p * 10000 ** (-(c - c % 2) / dim)) if c % 2 == 0
                              else math.cos(p * 10000 ** (-(c - c % 2) / dim)) for c in range(dim)]
                             for p in between.tolist()]) + between[:, None] * torch.linspace(-1, 1, dim)
    assert torch.allclose(encoding(x, between)[1], expected, atol=1e-5)
    with pytest.raises(InvalidSizeError, match="positions up to 5.5"):
        encoding(x, torch.tensor([0.0, 1.0, 2.0, 5.5]))


def test_motion_at_positions_is_the_module_at_whole_positions_and_differs_between():
    unet, adapter, _ = reference("sd15_v2")
    model, motion = ours("sd15_v2", unet, adapter, norm_across_frames=False)
    data = inputs("sd15_v2", batch=1, frames=4)
    plain = run_ours(model, "sd15_v2", data, motion=motion, num_frames=4)
    whole = run_ours(model, "sd15_v2", data, motion=motion.at(torch.arange(4.0)), num_frames=4)
    assert rel_err(whole, plain) < 1e-6
    shifted = run_ours(model, "sd15_v2", data, motion=motion.at(torch.arange(4.0) + 1 / 3), num_frames=4)
    assert rel_err(shifted, plain) > 1e-4
    with pytest.raises(InvalidSizeError):
        run_ours(model, "sd15_v2", data, motion=motion.at(torch.arange(3.0)), num_frames=4)  # one per frame
