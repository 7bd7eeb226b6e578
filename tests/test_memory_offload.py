"""Model and sequential offload (memory/offload.py) and fp8 storage at load, on the CPU: the moves happen in the
order of the calls (recorded, with a fake device), and the images are bit-identical with and without offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.errors import InvalidInputError
from diffstudio.memory.offload import Offloader, sequential_units

ARGS = dict(width=64, height=64, steps=2, seed=3, progress=False)


@pytest.fixture(scope="module")
def demo():
    return diffstudio.load()


def _image(models) -> np.ndarray:
    return np.asarray(diffstudio.Pipeline(models)("a red circle", **ARGS)[0])


def test_model_offload_moves_each_component_for_its_calls_in_order(demo):
    plain = _image(demo)
    moves = []
    names = {id(m): r for r, m in demo.components.items() if isinstance(m, torch.nn.Module)}
    modules = {r: m for r, m in demo.components.items() if isinstance(m, torch.nn.Module)}

    def record(module, where):  # a fake device: log the move, keep the weights where they are
        if isinstance(module, torch.nn.Module):
            moves.append((names.get(id(module), "?"), str(where)))
        return module

    offloader = Offloader(modules, "cuda", "model", move=record)
    try:
        offloaded = _image(demo)
    finally:
        offloader.remove()
    to_device = [role for role, where in moves if where == "cuda"]
    assert to_device == ["text_encoder", "unet", "vae"]
    # each goes back to the host before the next comes (and the last one when the offload is removed)
    assert moves[len(modules):] == [("text_encoder", "cuda"), ("text_encoder", "cpu"), ("unet", "cuda"),
                                    ("unet", "cpu"), ("vae", "cuda"), ("vae", "cpu")]
    assert np.array_equal(plain, offloaded)


def test_offload_on_the_cpu_gives_the_same_image():
    plain = _image(diffstudio.load())
    for mode in ("model", "group", "sequential"):
        models = diffstudio.load(offload=mode, device="cpu")
        assert np.array_equal(plain, _image(models)), mode
        models.enable_offload(None, "cpu")
        assert models.__dict__["offloader"] is None


def test_sequential_offload_moves_the_blocks_one_at_a_time(demo):
    unet = demo.unet
    units = sequential_units(unet)
    assert len(units) == len(unet.input_blocks) + len(unet.output_blocks) + 1  # and the middle block
    moves = []
    unit_names = {id(u): i for i, u in enumerate(units)}

    def record(module, where):
        if isinstance(module, torch.nn.Module):
            moves.append((unit_names.get(id(module), type(module).__name__), str(where)))
        return module

    modules = {r: m for r, m in demo.components.items() if isinstance(m, torch.nn.Module)}
    offloader = Offloader(modules, "cuda", "sequential", {"unet"}, move=record)
    try:
        with torch.inference_mode():
            unet(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, demo.configs["unet"].context_dim))
    finally:
        offloader.remove()
    block_moves = [m for m in moves[len(modules):] if isinstance(m[0], int)]
    # every block in, then out, before the next comes in: one block on the device at a time
    assert [w for _, w in block_moves] == ["cuda", "cpu"] * len(units)
    assert sorted({i for i, _ in block_moves}) == list(range(len(units)))
    assert all(block_moves[2 * k][0] == block_moves[2 * k + 1][0] for k in range(len(units)))


def test_unknown_offload_mode_is_refused(demo):
    with pytest.raises(InvalidInputError, match="sequential"):
        demo.clone().enable_offload("disk", "cpu")


def test_fp8_storage_at_load_and_refused_where_the_model_cannot(tmp_path):
    from tests.tiny_flux import reference_models, write_bundle

    path = write_bundle(tmp_path / "aio.safetensors", *reference_models())
    # FLUX's T5 is offloaded block by block too; the image is the same
    args = dict(ARGS, steps=1)
    plain = np.asarray(diffstudio.Pipeline(diffstudio.load(path))("a cat", **args)[0])
    offloaded = diffstudio.load(path, offload="sequential")
    assert set(offloaded.offloader._resident) == {"dit", "text_encoder", "text_encoder_2"}  # the VAE moves whole
    t5 = offloaded.text_encoder_2
    units = sequential_units(t5)
    assert units[-len(t5.encoder.block):] == list(t5.encoder.block)  # (the tiny vocabulary is a block of its own)
    assert np.array_equal(plain, np.asarray(diffstudio.Pipeline(offloaded)("a cat", **args)[0]))
    models = diffstudio.load(path, dtype=torch.float32, storage="fp8")
    linears = [m for m in models.dit.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert models.dtype == torch.float32
    assert models.vae.encoder.conv_in.weight.dtype == torch.float32  # only the denoiser
    with pytest.raises(InvalidInputError, match="float8"):
        diffstudio.load(diffstudio.loader.default_model_path(), storage="fp8")


def _recording_offload(models, moves: list, labels: dict):
    """Model offload with a fake device: every move is logged (label, where) and the weights stay on the CPU."""
    models.enable_offload("model", "cpu")
    offloader = models.offloader
    offloader.device = torch.device("cuda")

    def record(module, where):
        if isinstance(module, torch.nn.Module):
            moves.append((labels.get(id(module), type(module).__name__), str(where)))
        return module

    offloader.move = record
    return offloader


def test_add_ons_travel_with_the_denoiser_and_the_image_encoder_moves_for_its_call():
    from diffstudio.demo.controlnet_build import WEIGHTS as CONTROLNET
    from diffstudio.demo.controlnet_build import outline
    from diffstudio.demo.ip_adapter_build import WEIGHTS as IP_ADAPTER
    from diffstudio.demo.ip_adapter_build import reference
    from diffstudio.demo.shapes import Scene, ShapeSpec
    from diffstudio.pipeline.control import ControlNetUnit
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    models = diffstudio.load()
    controlnet, adapter = models.add_controlnet(CONTROLNET), models.add_ip_adapter(IP_ADAPTER)
    unit = ControlNetUnit(controlnet, outline(Scene((ShapeSpec("star", "blue", "left", "large"),))))
    args = dict(ARGS, controlnets=[unit], ip_adapter=ImagePrompt(reference("green"), model=adapter))
    plain = np.asarray(diffstudio.Pipeline(models)("a star", **args)[0])

    labels = {id(m): r for r, m in models.components.items()}
    labels.update({id(controlnet): "controlnet", id(adapter.adapter): "adapter", id(adapter.image_encoder): "encoder"})
    moves = []
    offloader = _recording_offload(models, moves, labels)
    assert offloader.companions["unet"] and any(m is adapter.image_encoder for m in offloader.components.values())
    del moves[:]
    offloaded = np.asarray(diffstudio.Pipeline(models)("a star", **args)[0])
    offloader.release()
    assert np.array_equal(plain, offloaded)
    to_device = [label for label, where in moves if where == "cuda"]
    # each goes in once: the add-ons called at every step never send the UNet away
    assert sorted(to_device) == sorted(["text_encoder", "encoder", "unet", "controlnet", "adapter", "vae"])
    i = to_device.index("unet")
    assert set(to_device[i:i + 3]) == {"unet", "controlnet", "adapter"}
    unet_out = moves.index(("unet", "cpu"))
    assert {("controlnet", "cpu"), ("adapter", "cpu")} <= set(moves[unet_out:unet_out + 3])
    models.enable_offload("sequential", "cpu")  # the add-ons join a UNet that moves block by block
    assert set(models.offloader.companions["unet"]) == {f"controlnet:{CONTROLNET.resolve()}", "ip_adapter:0"}
    assert np.array_equal(plain, np.asarray(diffstudio.Pipeline(models)("a star", **args)[0]))


def test_a_motion_module_added_under_offload_travels_with_the_unet():
    from diffstudio.demo.motion_build import BUILD_DEFAULTS

    weights = BUILD_DEFAULTS["out"]
    models = diffstudio.load()
    motion = models.add_motion_module(weights)

    def clip():
        frames = diffstudio.VideoPipeline(models)("a red circle", num_frames=4, **ARGS)
        return [np.asarray(f) for f in frames]

    plain = clip()
    labels = {id(m): r for r, m in models.components.items()}
    moves = []
    offloader = _recording_offload(models, moves, labels)
    assert offloader.companions["unet"] == {"motion": motion} and "motion" not in offloader.components
    replaced = models.add_motion_module(weights)  # a new module takes the slot; the old one leaves
    assert offloader.companions["unet"] == {"motion": replaced}
    labels[id(replaced)] = "motion"
    del moves[:]
    offloaded = clip()
    offloader.release()
    assert all(np.array_equal(a, b) for a, b in zip(plain, offloaded))
    assert [label for label, where in moves if where == "cuda"].count("motion") == 1


def test_group_offload_fetches_the_next_block_while_one_runs(demo):
    """Group offload on the CPU (synchronous copies, the same bookkeeping as CUDA's side stream): every block but
    the very first arrives fetched ahead (its copy started while the block before it ran), the device never holds
    more than the running block and the next, and the image is the plain run's."""
    plain = _image(demo)
    models = demo.clone()
    models.enable_offload("group", "cpu")
    streamer = models.offloader._streamers["unet"]
    ready, seen = streamer.ready, {"calls": 0, "fetched_ahead": 0, "most": 0}

    def spied_ready(unit):
        seen["calls"] += 1
        seen["fetched_ahead"] += streamer.pending is not None and streamer.pending[0] is unit
        ready(unit)
        seen["most"] = max(seen["most"], streamer.blocks_on_device())

    streamer.ready = spied_ready
    try:
        assert np.array_equal(plain, _image(models))
    finally:
        models.enable_offload(None, "cpu")
    units = len(sequential_units(models.unet))
    assert seen["calls"] == ARGS["steps"] * units  # one call per step (CFG batched), every block
    assert seen["fetched_ahead"] == seen["calls"] - 1
    assert seen["most"] <= 2
