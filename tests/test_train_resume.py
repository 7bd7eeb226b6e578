"""Starting a LoRA run again: it resumes only the run its work folder holds (same data, base and settings),
--restart starts over, a finished run only exports again, and outputs are never left half written."""

from __future__ import annotations

import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffstudio.errors import InvalidInputError, MissingExtraError, StaleRunError
from diffstudio.train.lora import LoRATrainConfig, train_lora
from tests import tiny_sd15


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet, vae, text = tiny_sd15.reference_models()
    return tiny_sd15.write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", unet, vae, text)


@pytest.fixture(scope="module")
def data_a(tmp_path_factory):
    from diffstudio.demo.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data_a"), 4, 64, seed=0)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory):
    from diffstudio.demo.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data_b"), 4, 64, seed=1)


def _config(data, out, model, **kw) -> LoRATrainConfig:
    kw = {"rank": 4, "steps": 4, "lr": 1e-2, "resolution": 64, "checkpoint_every": 2, **kw}
    return LoRATrainConfig(data=str(data), out=str(out), model=str(model), **kw)


def _same_tensors(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- which run a work folder resumes ------------------------------------------------------------------------


def test_a_run_on_other_data_is_refused_and_the_output_is_left_alone(base, data_a, data_b, tmp_path):
    out = tmp_path / "L.safetensors"
    train_lora(_config(data_a, out, base))
    before = out.read_bytes()
    with pytest.raises(StaleRunError) as err:
        train_lora(_config(data_b, out, base))
    message = str(err.value)
    assert "data: 4 images, sha256 " in message and "--restart" in message and "--workdir" in message
    assert out.read_bytes() == before


def test_changed_settings_are_each_named_old_to_new(base, data_a, tmp_path):
    cfg = _config(data_a, tmp_path / "L.safetensors", base)
    train_lora(cfg, stop_after=2)  # an interrupted run
    with pytest.raises(StaleRunError) as err:  # another rank must not reach the checkpoint's tensors
        train_lora(_config(data_a, tmp_path / "L.safetensors", base, rank=8, lr=1e-3, seed=5))
    message = str(err.value)
    assert "rank: 4 -> 8" in message and "lr: 0.01 -> 0.001" in message and "seed: 0 -> 5" in message
    assert "alpha: 4.0 -> 8.0" in message  # the resolved default (alpha = rank)
    assert "data:" not in message and "steps:" not in message
    assert len(message.splitlines()) < 10


def test_restart_trains_the_new_recipe_from_step_zero(base, data_a, data_b, tmp_path):
    work = tmp_path / "run"
    train_lora(_config(data_a, tmp_path / "a.safetensors", base, workdir=str(work)))
    restarted = train_lora(_config(data_b, tmp_path / "b.safetensors", base, workdir=str(work), restart=True))
    fresh = train_lora(_config(data_b, tmp_path / "fresh.safetensors", base, workdir=str(tmp_path / "fresh")))
    assert _same_tensors(restarted, fresh)
    assert not _same_tensors(restarted, tmp_path / "a.safetensors")


def test_restart_keeps_the_old_run_until_the_new_one_can_start(base, data_a, data_b, tmp_path):
    work = str(tmp_path / "run")
    train_lora(_config(data_a, tmp_path / "a.safetensors", base, workdir=work), stop_after=2)
    with pytest.raises(InvalidInputError, match="matches"):
        train_lora(_config(data_b, tmp_path / "b.safetensors", base, workdir=work, restart=True,
                           targets="no_such_layer"))
    with pytest.raises(FileNotFoundError):
        train_lora(_config(tmp_path / "no_such_folder", tmp_path / "b.safetensors", base, workdir=work,
                           restart=True))
    resumed = train_lora(_config(data_a, tmp_path / "a.safetensors", base, workdir=work))
    straight = train_lora(_config(data_a, tmp_path / "s.safetensors", base, workdir=str(tmp_path / "straight")))
    assert _same_tensors(resumed, straight)


def test_a_finished_run_started_again_exports_without_training(base, data_a, tmp_path, monkeypatch):
    from diffstudio.train import objectives

    out = tmp_path / "L.safetensors"
    first = load_file(str(train_lora(_config(data_a, out, base))))
    out.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(objectives, "diffusion_loss", no_training)
    again = load_file(str(train_lora(_config(data_a, out, base, export_format="kohya", checkpoint_every=7))))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_more_steps_continue_a_constant_rate_run_as_if_it_had_been_asked_for_them(base, data_a, tmp_path):
    straight = train_lora(_config(data_a, tmp_path / "s.safetensors", base, workdir=str(tmp_path / "s"), warmup=2))
    short = _config(data_a, tmp_path / "l.safetensors", base, workdir=str(tmp_path / "l"), warmup=2, steps=2)
    train_lora(short)
    longer = train_lora(_config(data_a, tmp_path / "l.safetensors", base, workdir=str(tmp_path / "l"), warmup=2))
    assert _same_tensors(straight, longer)
    with pytest.raises(StaleRunError, match="past the 2 steps"):  # the checkpoint cannot go back to step 2
        train_lora(short)


def test_more_steps_under_a_cosine_schedule_are_refused_with_the_reason(base, data_a, tmp_path):
    train_lora(_config(data_a, tmp_path / "L.safetensors", base, steps=2, lr_end=1e-3))
    with pytest.raises(StaleRunError, match=r"(?s)steps: 2 -> 4.*half cosine.*steps=2"):
        train_lora(_config(data_a, tmp_path / "L.safetensors", base, steps=4, lr_end=1e-3))


def test_a_checkpoint_that_records_no_recipe_is_refused(base, data_a, tmp_path):
    cfg = _config(data_a, tmp_path / "L.safetensors", base)
    train_lora(cfg, stop_after=2)
    (cfg.work_path() / "checkpoint" / "recipe.json").unlink()
    with pytest.raises(StaleRunError, match="records no recipe"):
        train_lora(cfg)


def test_the_cli_refuses_in_a_few_lines_and_restarts_on_request(base, data_a, data_b, tmp_path, capsys):
    from diffstudio.cli import main

    out = tmp_path / "L.safetensors"
    common = ["train", "lora", "--model", str(base), "--out", str(out), "--steps", "2", "--rank", "2",
              "--resolution", "64"]
    assert main([*common, "--data", str(data_a)]) == 0
    capsys.readouterr()
    assert main([*common, "--data", str(data_b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: StaleRunError:") and "--restart" in err and "Traceback" not in err
    assert main([*common, "--data", str(data_b), "--restart"]) == 0
    fresh = tmp_path / "fresh.safetensors"
    assert main([*common[:5], str(fresh), *common[6:], "--data", str(data_b)]) == 0
    assert _same_tensors(out, fresh)


# --- files written safely ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_lora_files_get_the_mode_the_umask_gives(base, data_a, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = train_lora(_config(data_a, tmp_path / "L.safetensors", base, steps=2))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    for name in ("state.pt", "progress.json", "recipe.json"):
        assert stat.S_IMODE((out.with_name("L.safetensors.run") / "checkpoint" / name).stat().st_mode) == \
            0o666 & ~umask


def test_a_failed_export_leaves_the_existing_file_byte_identical(base, data_a, tmp_path, monkeypatch):
    import safetensors.torch

    from diffstudio.io import safetensors_file

    out = tmp_path / "L.safetensors"
    train_lora(_config(data_a, out, base))
    before = out.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # part of a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(safetensors_file, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        train_lora(_config(data_a, out, base, export_format="peft"))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L.safetensors", "L.safetensors.run"]


def test_a_failed_cache_write_keeps_the_cache_and_the_old_run(base, data_a, tmp_path, monkeypatch):
    cfg = _config(data_a, tmp_path / "L.safetensors", base)
    train_lora(cfg, stop_after=2)
    cache = cfg.work_path() / "cache.pt"
    before = cache.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(50)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):  # another resolution: a new cache, written first
        train_lora(_config(data_a, tmp_path / "L.safetensors", base, resolution=128, restart=True))
    monkeypatch.undo()
    assert cache.read_bytes() == before
    assert (cfg.work_path() / "checkpoint" / "progress.json").exists()  # --restart had not discarded it yet


# --- the train extra ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["peft", "accelerate"])
def test_without_the_train_extra_the_command_says_what_to_install(base, data_a, tmp_path, monkeypatch, capsys,
                                                                   module):
    from diffstudio.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(MissingExtraError) as err:
        train_lora(_config(data_a, tmp_path / "L.safetensors", base))
    assert isinstance(err.value, ImportError) and err.value.name == module
    out = tmp_path / "cli.safetensors"
    assert main(["train", "lora", "--model", str(base), "--data", str(data_a), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "diffstudio[train]"' in err and module in err
    assert not out.exists() and not out.with_name("cli.safetensors.run").exists()
