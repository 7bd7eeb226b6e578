"""Training under several processes (`torchrun`/`accelerate launch`, gloo on the CPU) follows the 1-process
run with the same global batch, and a run resumes under another process count; so does a run sharded with
FSDP2 (``shard="fsdp"``, train/sharding.py). LoRA and ControlNet training (tests/ddp_train_job.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny_sd15

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from diffstudio.demo.shapes import write_dataset

    folder = tmp_path_factory.mktemp("ddp")
    model = tiny_sd15.write_single_file(folder / "tiny.safetensors", *tiny_sd15.reference_models())
    data = folder / "data"
    write_dataset(data, 4, 64, 0)
    return model, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, model, data, out, workdir, steps: int, stop_after: int = 0, shard: str = "",
            kind: str = "lora"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "tests" / "ddp_train_job.py"), kind,
               str(model), str(data), str(out), str(workdir), str(steps), str(stop_after), *[shard][:bool(shard)]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _config(job, out, workdir):
    from diffstudio.train.lora import LoRATrainConfig

    model, data = job
    return LoRATrainConfig(data=str(data), out=str(out), model=str(model), rank=4, steps=4, batch_size=2, lr=1e-2,
                           resolution=64, checkpoint_every=1, workdir=str(workdir), buckets=False)


@pytest.fixture(scope="module")
def single(job, tmp_path_factory):
    """The LoRA a single process trains in 4 steps of batch 2."""
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    folder = tmp_path_factory.mktemp("one")
    return load_file(str(train_lora(_config(job, folder / "one.safetensors", folder / "w1"))))


def _assert_equal_runs(single: dict, other: dict) -> None:
    assert single.keys() == other.keys()
    moved = [k for k in single if k.endswith("lora_up.weight") and single[k].abs().max() > 0]
    assert moved, "training did not move the adapters"
    # Adam moves a weight whose gradient is near 0 by ~lr whatever its sign, so a last-bit difference can flip a
    # few weights by up to 2 lr; without averaged gradients nearly every weight differs (~99%, by ~2e-2).
    diff = torch.cat([(other[k] - single[k]).abs().flatten() for k in single])
    assert (diff > 1e-4).float().mean() < 0.01
    assert diff.median() < 1e-6


def test_two_processes_then_one_equal_one_process_throughout(job, single, tmp_path):
    """Steps 1-2 under 2 processes (each half of every batch of 2), steps 3-4 resumed in 1 process: the LoRA
    equals the one trained by a single process all along, within fp32 summation order."""
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    model, data = job
    _launch(2, model, data, tmp_path / "two.safetensors", tmp_path / "w2", steps=4, stop_after=2)
    assert not (tmp_path / "two.safetensors").exists()  # stopped after 2 steps: nothing exported yet
    _assert_equal_runs(single, load_file(str(train_lora(_config(job, tmp_path / "two.safetensors",
                                                                tmp_path / "w2")))))


def test_sharded_run_equals_one_process_and_resumes_either_way(job, single, tmp_path):
    """FSDP2 over 2 processes: steps 1-2 sharded, then steps 3-4 resumed from that checkpoint once in 1 process
    and once sharded again over 2 (which exports from the sharded model, given back whole): both LoRAs equal
    the 1-process run's. The job also checks that the base model comes back unchanged."""
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    model, data = job
    _launch(2, model, data, tmp_path / "a.safetensors", tmp_path / "wa", steps=4, stop_after=2, shard="fsdp")
    checkpoint = torch.load(tmp_path / "wa" / "checkpoint" / "state.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in checkpoint["model"].values())  # full tensors, the usual format
    shutil.copytree(tmp_path / "wa", tmp_path / "wb")
    _assert_equal_runs(single, load_file(str(train_lora(_config(job, tmp_path / "a.safetensors",
                                                                tmp_path / "wa")))))
    _launch(2, model, data, tmp_path / "b.safetensors", tmp_path / "wb", steps=4, shard="fsdp")
    _assert_equal_runs(single, load_file(str(tmp_path / "b.safetensors")))


def test_sharded_controlnet_training_equals_one_process(tmp_path):
    """A ControlNet trained 4 steps of batch 2 by 2 FSDP-sharded processes (each half of every batch, its control
    images included) equals the one a single process trains, within fp32 summation order."""
    from safetensors.torch import load_file

    from diffstudio.demo.controlnet_build import write_control_dataset
    from diffstudio.train.controlnet import ControlNetTrainConfig, train_controlnet

    model = tiny_sd15.write_single_file(tmp_path / "tiny.safetensors", *tiny_sd15.reference_models())
    data = write_control_dataset(tmp_path / "data", 4, progress=False)
    one = train_controlnet(ControlNetTrainConfig(
        data=str(data), out=str(tmp_path / "one.safetensors"), model=str(model), steps=4, batch_size=2, lr=1e-3,
        resolution=64, checkpoint_every=1, workdir=str(tmp_path / "w1"), buckets=False,
        hint_block_channels=[8, 16, 16, 32]))
    _launch(2, model, data, tmp_path / "two.safetensors", tmp_path / "w2", steps=4, shard="fsdp", kind="controlnet")
    single, other = load_file(str(one)), load_file(str(tmp_path / "two.safetensors"))
    assert single.keys() == other.keys()
    zero_convs = [k for k in single if k.startswith("zero_convs")]
    assert zero_convs and all(single[k].abs().max() > 0 for k in zero_convs)  # trained away from zero
    diff = torch.cat([(other[k] - single[k]).abs().flatten() for k in single])
    assert (diff > 1e-4).float().mean() < 0.01 and diff.median() < 1e-6


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    from diffstudio.errors import InvalidInputError
    from diffstudio.train.loop import data_parallel_rows

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert data_parallel_rows(4) == slice(2, 4)
    with pytest.raises(InvalidInputError, match="multiple of the number of processes"):
        data_parallel_rows(3)


def test_unknown_sharding_and_mixed_dtypes_are_refused(tmp_path):
    from diffstudio.errors import InvalidInputError
    from diffstudio.train.loop import train
    from diffstudio.train.sharding import ShardedModel

    model = torch.nn.Linear(2, 2)
    with pytest.raises(InvalidInputError, match="unknown sharding mode 'zero9'"):
        train(model, lambda m, step: m(torch.ones(1, 2)).sum(), steps=1, out_dir=tmp_path, shard="zero9")
    model.bias.data = model.bias.data.bfloat16()  # a bf16 base with fp32 adapters, say: FSDP wants one dtype
    with pytest.raises(InvalidInputError, match="one parameter dtype"):
        ShardedModel(model)
