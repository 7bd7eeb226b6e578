"""`diffstudio video` end to end on the packaged demo model with a tiny random motion module written to a file:
text to video into an .mp4, then a re-render of that video with the smoother and a work folder into PNGs, and
errors as named exceptions with exit code 2."""

from __future__ import annotations

import json

import torch

from diffstudio.cli import main
from diffstudio.io.safetensors_file import save_safetensors
from diffstudio.models.motion import MotionConfig, MotionModules
from diffstudio.video import video_io


def write_motion_module(path) -> str:
    """Motion modules that fit the demo UNet (widths 64, 128, 128; one ResBlock per level), every weight random
    (proj_out too, so they move), with their config in the metadata as diffstudio writes it."""
    config = MotionConfig(level_channels=[64, 128, 128], modules_per_level=[1, 1, 1], max_frames=32)
    torch.manual_seed(0)
    modules = MotionModules(config)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_safetensors(modules.state_dict(), path, metadata={"diffstudio": json.dumps(
        {"configs": {"motion": config.to_dict()}})})
    return str(path)


def test_video_command_end_to_end(tmp_path, capsys):
    motion = write_motion_module(tmp_path / "mm_tiny.safetensors")
    out = tmp_path / "out.mp4"
    assert main(["video", "a red circle moving to the right", "--motion", motion, "--frames", "6", "--steps", "2",
                 "--context-length", "4", "--context-stride", "2", "--context-dilation", "2", "-o", str(out),
                 "--quiet"]) == 0
    frames = video_io.read_frames(str(out))
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)

    folder = tmp_path / "rerender"
    args = ["video", "a blue circle", "--motion", motion, "--input", str(out), "--strength", "0.5", "--steps", "4",
            "--context-length", "4", "--smoother", "fastblend", "--smoother-steps", "1,-1",
            "--work-dir", str(tmp_path / "work"), "-o", str(folder), "--quiet"]
    assert main(args) == 0
    assert len(video_io.list_frame_files(str(folder))) == 6
    assert (tmp_path / "work" / "state.safetensors").exists()

    assert main([*args[:-3], "--sampler", "dpmpp_2m", "-o", str(folder), "--quiet"]) == 2
    assert "UnresumableSamplerError" in capsys.readouterr().err
    assert main([*args[:-3], "--seed", "5", "-o", str(folder), "--quiet"]) == 2
    assert "StaleRenderError" in capsys.readouterr().err
