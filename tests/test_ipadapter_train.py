"""IP-Adapter training: the image keys/values start as the layer's text keys/values, only the adapter (and a new
Shapes encoder) learns, a killed run resumes exactly, a run on other data is refused, the file bundles its Shapes
encoder and loads back through add_ip_adapter, and the command line builds the same config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffstudio
from diffstudio.errors import StaleRunError
from diffstudio.train.ip_adapter import IPAdapterTrainConfig, adapter_for, train_ip_adapter
from tests import tiny_sd15


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    unet, vae, text = tiny_sd15.reference_models()
    return diffstudio.load(str(tiny_sd15.write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors",
                                                           unet, vae, text)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffstudio.demo.ip_adapter_build import write_reference_dataset

    return write_reference_dataset(tmp_path_factory.mktemp("ip_data"), 4, progress=False)


def _config(data, out, **kw) -> IPAdapterTrainConfig:
    kw = {"steps": 4, "lr": 1e-3, "batch_size": 2, "resolution": 64, "checkpoint_every": 2, "encoder_size": 16,
          "encoder_width": 8, "encoder_dim": 12, "caption_dropout": 0.2, "image_dropout": 0.2, **kw}
    return IPAdapterTrainConfig(data=str(data), out=str(out), **kw)


def test_the_image_keys_and_values_start_as_the_text_ones(models):
    unet = models.denoiser
    adapter = adapter_for(unet, 12, 4)
    for kv, layer in zip(adapter.ip_adapter.values(), unet.cross_attention_layers()):
        assert torch.equal(kv.to_k_ip.weight, layer.to_k.weight) and torch.equal(kv.to_v_ip.weight, layer.to_v.weight)


def test_training_writes_an_adapter_with_its_encoder_that_loads_and_steers(tmp_path, models, data):
    before = {k: v.clone() for k, v in models.denoiser.state_dict().items()}
    out = train_ip_adapter(_config(data, tmp_path / "ip.safetensors"), models)
    assert all(torch.equal(before[k], v) for k, v in models.denoiser.state_dict().items())  # the base is frozen
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("image_encoder.") for k in keys) and "image_proj.proj.weight" in keys
    loaded = models.add_ip_adapter(out)  # the bundled encoder, found without image_encoder=
    assert loaded.image_size == 16 and loaded.image_encoder.config.projection_dim == 12
    trained = dict(loaded.adapter.named_parameters())
    fresh = dict(adapter_for(models.denoiser, 12, 4).named_parameters())
    assert any(not torch.allclose(trained[k].float(), fresh[k]) for k in fresh)  # it learned
    pipe = diffstudio.Pipeline(models)
    from diffstudio.demo.ip_adapter_build import reference
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    plain = pipe("a circle", seed=0, steps=2, progress=False)[0]
    steered = pipe("a circle", seed=0, steps=2, progress=False,
                   ip_adapter=[ImagePrompt(reference("blue"), scale=1.0, model=loaded)])[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(steered))


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, models, data):
    whole = train_ip_adapter(_config(data, tmp_path / "whole.safetensors"), models)
    config = _config(data, tmp_path / "split.safetensors")
    assert train_ip_adapter(config, models, stop_after=2) is None
    split = train_ip_adapter(config, models)
    with safe_open(str(whole), "pt") as a, safe_open(str(split), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_run_with_other_settings_is_refused_unless_restarted(tmp_path, models, data):
    train_ip_adapter(_config(data, tmp_path / "a.safetensors", steps=2, workdir=str(tmp_path / "run")), models)
    with pytest.raises(StaleRunError):
        train_ip_adapter(_config(data, tmp_path / "a.safetensors", steps=2, lr=5e-4,
                                 workdir=str(tmp_path / "run")), models)
    assert train_ip_adapter(_config(data, tmp_path / "a.safetensors", steps=2, lr=5e-4, restart=True,
                                    workdir=str(tmp_path / "run")), models).exists()


def test_the_command_line_builds_the_trainers_config(monkeypatch, tmp_path):
    from diffstudio import cli
    from diffstudio.train import ip_adapter

    seen = {}
    monkeypatch.setattr(ip_adapter, "train_ip_adapter", lambda config: seen.setdefault("config", config))
    cli.main(["train", "ip-adapter", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"),
              "--steps", "7", "--image-dropout", "0.2", "--freeze-encoder", "--tokens", "2"])
    config = seen["config"]
    assert (config.steps, config.image_dropout, config.train_encoder, config.num_tokens) == (7, 0.2, False, 2)
    assert config.caption_dropout == IPAdapterTrainConfig("", "").caption_dropout
