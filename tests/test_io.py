"""diffstudio.io: safe and lazy weight reading, atomic writing, folders, images, the PNG recipe."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffstudio.errors import (
    CorruptFileError,
    ModelNotFoundError,
    NaNError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from diffstudio.io import (
    component_files,
    decode_metadata_value,
    download,
    images_to_tensor,
    load_mask,
    load_safetensors,
    read_component,
    read_file_metadata,
    read_model_index,
    read_recipe,
    read_safetensors_header,
    read_state_dict,
    read_state_dict_meta,
    save_png,
    save_safetensors,
    tensor_to_images,
    unwrap_state_dict,
)


class RunsShell:
    """A pickle payload that, if ever unpickled unsafely, creates ``marker`` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesFile:
    """A pickle payload that would write ``marker`` through builtins.exec."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def small_sd():
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5), "ids": torch.arange(4)}


# -- pickles: refused, never run -------------------------------------------------------------------
@pytest.mark.parametrize("payload", [RunsShell, WritesFile])
@pytest.mark.parametrize("layout", ["zip", "legacy", "plain_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    obj = {"state_dict": {"w": torch.zeros(2)}, "evil": payload(marker)}
    if layout == "plain_pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    assert not marker.exists()
    expected = "os.system" if payload is RunsShell else "builtins.exec"
    assert expected in str(info.value) and ".safetensors" in str(info.value)


def _class_in_fake_module(monkeypatch, module_name, class_name):
    """A class that pickles as ``module_name.class_name``; the module exists only while we save."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(class_name, (), {"__module__": module_name})
    setattr(sys.modules[module_name], class_name, cls)
    return cls


def test_training_metadata_loads_as_inert_objects(tmp_path, monkeypatch):
    callback = _class_in_fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint",
                                     "ModelCheckpoint")()
    callback.best_score = np.float64(0.25)
    path = tmp_path / "sd-v1.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": callback}, "arr": np.arange(3)}, path)
    embedding = tmp_path / "embedding.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, 3))}),
                "name": "cat"}, embedding)
    monkeypatch.undo()  # the class is gone: loading must not need (or import) it
    assert "pytorch_lightning" not in sys.modules
    assert set(read_state_dict(path)) == {"w"}
    loaded = read_state_dict(embedding)
    assert set(loaded) == {"string_to_param.*"} and not loaded["string_to_param.*"].requires_grad


def test_unknown_class_is_refused_by_name(tmp_path, monkeypatch):
    config = _class_in_fake_module(monkeypatch, "mytrainer.config", "TrainConfig")()
    torch.save({"w": torch.ones(1), "config": config}, tmp_path / "m.pt")
    monkeypatch.undo()
    with pytest.raises(UnsafeCheckpointError, match="mytrainer.config.TrainConfig"):
        read_state_dict(tmp_path / "m.pt")


def test_lightning_checkpoint_unwraps_and_reports_dropped(tmp_path):
    inner = {"model.w": torch.ones(2, 2), "cond": {"proj": torch.zeros(3)}, "note": "text"}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": inner, "global_step": 7, "optimizer_states": [{"lr": 1.0}]}, path)
    sd = read_state_dict(path)
    assert set(sd) == {"model.w", "cond.proj"}
    assert torch.equal(sd["model.w"], torch.ones(2, 2))
    _, report = unwrap_state_dict(torch.load(path, weights_only=True))
    assert report.wrapper_path == ["state_dict"]
    assert {"global_step", "optimizer_states", "note"} <= set(report.dropped)


def test_legacy_pickle_and_deepspeed_module_wrapper(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"module": {"w": torch.full((2,), 3.0)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["w"], torch.full((2,), 3.0))


@pytest.mark.parametrize("damage", ["empty", "truncated_zip", "truncated_legacy"])
def test_damaged_pickles_are_corrupt(tmp_path, damage):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(64)}, path, _use_new_zipfile_serialization=damage != "truncated_legacy")
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    with pytest.raises(CorruptFileError):
        read_state_dict(path)


# -- safetensors: validated before use --------------------------------------------------------------
def test_truncated_safetensors_names_sizes(tmp_path):
    path = save_safetensors({"w": torch.randn(256, 256)}, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "truncated" in message and "re-download" in message and "m.safetensors" in message


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b'{"w": {}}')
    with pytest.raises(CorruptFileError, match="truncated"):
        read_safetensors_header(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", bytes(range(7, 71)),
                                     b"<html>404 not found</html>" * 4])
def test_garbage_or_empty_safetensors_is_corrupt(tmp_path, content):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError):
        read_state_dict(path)


def test_header_offsets_outside_data_are_corrupt(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CorruptFileError, match="needs 16 bytes"):
        read_safetensors_header(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_safetensors_round_trip_keeps_dtype_and_metadata(tmp_path, dtype):
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in small_sd().items()}
    path = save_safetensors(sd, tmp_path / "sub" / "m.safetensors", {"config": {"ch": 4}, "name": "x"})
    back = read_state_dict(path)
    assert back.keys() == sd.keys()
    assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    meta = read_file_metadata(path)
    assert meta["name"] == "x" and decode_metadata_value(meta["config"]) == {"ch": 4}
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left behind
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's private 0600


def test_dtype_cast_touches_floats_only_and_keys_subset(tmp_path):
    path = save_safetensors(small_sd(), tmp_path / "m.safetensors")
    sd = load_safetensors(path, dtype=torch.float16, keys=["a.weight", "ids"])
    assert set(sd) == {"a.weight", "ids"}
    assert sd["a.weight"].dtype == torch.float16 and sd["ids"].dtype == torch.int64


def test_save_breaks_shared_storage(tmp_path):
    base = torch.randn(4, 4)
    path = save_safetensors({"w": base, "tied": base, "view": base[1:]}, tmp_path / "m.safetensors")
    back = read_state_dict(path)
    assert torch.equal(back["tied"], base) and torch.equal(back["view"], base[1:])


def test_magic_bytes_beat_the_extension(tmp_path):
    path = save_safetensors({"w": torch.ones(2)}, tmp_path / "renamed.ckpt")
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


# -- metadata without loading ------------------------------------------------------------------------
def test_meta_reading_has_shapes_and_dtypes_on_meta_device(tmp_path):
    sd = {"w": torch.randn(3, 5).to(torch.bfloat16), "ids": torch.arange(7)}
    for path in (save_safetensors(sd, tmp_path / "m.safetensors"), tmp_path / "m.ckpt"):
        if path.suffix == ".ckpt":
            torch.save({"state_dict": sd, "epoch": 1}, path)
        meta, _ = read_state_dict_meta(path)
        assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in meta.items()} == {
            "w": ((3, 5), torch.bfloat16, "meta"), "ids": ((7,), torch.int64, "meta")}


# -- formats and paths --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content", [("model.onnx", b"\x08\x07onnx-ish bytes"),
                                           ("model.gguf", b"GGUF\x03\x00\x00\x00rest")])
def test_unknown_format_lists_what_is_supported(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError, match="safetensors"):
        read_state_dict(path)


def test_missing_path_suggests_near_names(tmp_path):
    save_safetensors({"w": torch.ones(1)}, tmp_path / "dreamshaper_8.safetensors")
    with pytest.raises(ModelNotFoundError, match="dreamshaper_8.safetensors"):
        read_state_dict(tmp_path / "dreamshaper8.safetensors")
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is a FileNotFoundError too
        read_state_dict(tmp_path / "nope" / "x.safetensors")


# -- diffusers / HF folders ----------------------------------------------------------------------------
def test_sharded_folder_reads_all_shards(tmp_path):
    sd = small_sd()
    shards = {"model-00001-of-00002.safetensors": ["a.weight"],
              "model-00002-of-00002.safetensors": ["b.bias", "ids"]}
    for name, keys in shards.items():
        save_safetensors({k: sd[k] for k in keys}, tmp_path / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    back, config = read_component(tmp_path)
    assert config == {"hidden_size": 4}
    assert all(torch.equal(back[k], sd[k]) for k in sd) and back.keys() == sd.keys()
    assert set(read_state_dict_meta(tmp_path)[0]) == set(sd)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="00002"):
        read_component(tmp_path)


def test_variant_preferred_then_fallback(tmp_path):
    save_safetensors({"w": torch.ones(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_safetensors({"w": torch.ones(1).half()}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    torch.save({"w": torch.ones(1)}, tmp_path / "diffusion_pytorch_model.bin")
    assert component_files(tmp_path, "fp16")[0].name == "diffusion_pytorch_model.fp16.safetensors"
    assert component_files(tmp_path)[0].name == "diffusion_pytorch_model.safetensors"
    assert component_files(tmp_path, "bf16")[0].name == "diffusion_pytorch_model.safetensors"
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    assert component_files(tmp_path)[0].name == "diffusion_pytorch_model.fp16.safetensors"
    assert read_component(tmp_path, variant="fp16")[0]["w"].dtype == torch.float16


def test_bin_is_used_only_without_safetensors(tmp_path):
    torch.save({"w": torch.full((2,), 2.0)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(read_component(tmp_path)[0]["w"], torch.full((2,), 2.0))


def test_empty_folder_and_pipeline_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        read_state_dict(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "safety_checker": [None, None]}))
    assert read_model_index(tmp_path) == {"_class_name": "StableDiffusionPipeline",
                                          "unet": ("diffusers", "UNet2DConditionModel")}
    with pytest.raises(UnsupportedFormatError, match="read_component"):
        read_state_dict(tmp_path)


# -- images ----------------------------------------------------------------------------------------------
def test_image_tensor_round_trip_and_nan():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    t = images_to_tensor([Image.fromarray(pixels)])
    assert t.shape == (1, 3, 6, 8) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_images(t)[0]), pixels)
    assert np.asarray(tensor_to_images(torch.full((3, 2, 2), 5.0))[0]).min() == 255  # clamped
    with pytest.raises(NaNError):
        tensor_to_images(torch.full((1, 3, 2, 2), float("nan")))


def test_load_mask_white_is_one_and_resizes(tmp_path):
    image = Image.new("L", (4, 2), 0)
    image.paste(255, (2, 0, 4, 2))  # right half white
    image.save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png")
    assert mask.shape == (1, 1, 2, 4) and mask[0, 0, 0, 3] == 1 and mask[0, 0, 0, 0] == 0
    assert load_mask(tmp_path / "mask.png", (8, 4)).shape == (1, 1, 4, 8)


# -- the PNG recipe -------------------------------------------------------------------------------------
def test_png_recipe_round_trip_and_a1111_chunk(tmp_path):
    recipe = {"prompt": "a red circle, on grey", "negative_prompt": "blurry", "steps": 20,
              "sampler": "euler_ancestral", "scheduler": "karras", "cfg_scale": 7.0, "seed": 1,
              "width": 64, "height": 32, "model": "shapes", "strength": 0.5, "clip_skip": 2,
              "sigmas": [14.6, 0.0]}
    path = save_png(Image.new("RGB", (64, 32), "grey"), tmp_path / "out.png", recipe)
    assert read_recipe(path) == recipe
    with Image.open(path) as image:
        parameters = image.text["parameters"]
    assert parameters == ("a red circle, on grey\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                          "Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x32, Model: shapes, "
                          "Denoising strength: 0.5, Clip skip: 2")


def test_reads_a_hand_written_a1111_png(tmp_path):
    text = ("masterpiece, a cat\nsecond line\nNegative prompt: lowres, bad hands\n"
            'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 768x512, '
            'Model hash: abc123, Model: dream, Lora hashes: "x: 1, y: 2", Clip skip: 2')
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(tmp_path / "a1111.png", pnginfo=info)
    recipe = read_recipe(tmp_path / "a1111.png")
    assert recipe["prompt"] == "masterpiece, a cat\nsecond line"
    assert recipe["negative_prompt"] == "lowres, bad hands"
    assert (recipe["steps"], recipe["cfg_scale"], recipe["seed"]) == (30, 6.5, 1234)
    assert (recipe["sampler"], recipe["scheduler"]) == ("dpmpp_2m", "karras")
    assert (recipe["width"], recipe["height"], recipe["model"], recipe["clip_skip"]) == (768, 512, "dream", 2)
    assert recipe["extra"]["a1111"] == {"Lora hashes": "x: 1, y: 2"}


def test_png_without_recipe_is_named(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    with pytest.raises(UnsupportedFormatError, match="no generation recipe"):
        read_recipe(tmp_path / "plain.png")


# -- download ----------------------------------------------------------------------------------------------
def test_download_offline_says_how_to_place_the_file(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as info:
        download("someone/some-model", "model.safetensors", cache_dir=tmp_path)
    assert "https://huggingface.co/someone/some-model/resolve/" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="local path"):
        download("someone/some-model", cache_dir=tmp_path)


def test_safetensors_whose_header_length_starts_with_a_pickle_byte(tmp_path):
    """A header of 0x..80 bytes begins the file with 0x80, a pickle's protocol opcode: still safetensors."""
    from safetensors.torch import save_file

    from diffstudio.io.state_dict import file_format, read_file_metadata

    path = tmp_path / "x.safetensors"
    for pad in range(256):
        save_file({"w": torch.zeros(1)}, str(path), metadata={"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert file_format(path) == "safetensors"
    assert read_file_metadata(path) == {"note": "x" * pad}
