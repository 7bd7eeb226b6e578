"""LoRA training: buckets, exact resume, and a kohya export that diffusers itself loads."""

from __future__ import annotations

import math

import pytest
import torch

from diffstudio.train.buckets import bucket_batches, bucket_sizes, nearest_bucket
from tests import tiny_sd15


def test_buckets_hold_about_the_same_pixels_and_respect_the_multiple():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.75 * 512 * 512 <= w * h <= 512 * 512 * 1.01
        assert 0.5 <= w / h <= 2.0
    assert nearest_bucket(1920, 1080, sizes)[0] > nearest_bucket(1920, 1080, sizes)[1]  # landscape stays landscape
    w, h = nearest_bucket(1000, 1000, sizes)
    assert w == h


def test_bucket_batches_never_mix_buckets_and_cover_each_image_once_per_epoch():
    buckets = [0, 1, 0, 2, 1, 0, 0, 2, 1]
    batch = 2
    per_epoch = sum(math.ceil(buckets.count(b) / batch) for b in set(buckets))
    seen = []
    for step in range(per_epoch):
        idx = bucket_batches(buckets, batch, step, seed=3)
        assert len({buckets[i] for i in idx}) == 1
        seen += idx
    assert sorted(seen) == list(range(len(buckets)))
    assert bucket_batches(buckets, batch, 5, seed=3) == bucket_batches(buckets, batch, 5, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import diffstudio

    folder = tmp_path_factory.mktemp("tiny")
    unet, vae, text = tiny_sd15.reference_models()
    path = tiny_sd15.write_single_file(folder / "tiny.safetensors", unet, vae, text)
    return path, unet, vae, text, diffstudio


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from diffstudio.demo.shapes import write_dataset

    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder, 4, 64, 0)
    return folder


def _config(data, out, model, **kw):
    from diffstudio.train.lora import LoRATrainConfig

    return LoRATrainConfig(data=str(data), out=str(out), model=str(model), rank=4, steps=4, lr=1e-2,
                           resolution=64, checkpoint_every=2, **kw)


def test_an_interrupted_lora_run_resumes_exactly(tiny_model, dataset, tmp_path):
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    path = tiny_model[0]
    whole = train_lora(_config(dataset, tmp_path / "a.safetensors", path, workdir=str(tmp_path / "ra")))
    cfg = _config(dataset, tmp_path / "b.safetensors", path, workdir=str(tmp_path / "rb"))
    train_lora(cfg, stop_after=2)  # killed after 2 of 4 steps
    resumed = train_lora(cfg)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ups = [v for k, v in a.items() if k.endswith("lora_up.weight")]
    assert any(u.abs().max() > 0 for u in ups), "training did not move the adapters"


def test_kohya_export_loads_in_diffusers_and_applies_the_trained_update(tiny_model, dataset, tmp_path):
    """diffusers' own kohya reader must see exactly W + (alpha / r) up @ down on every trained layer."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer
    from diffstudio.train.lora import train_lora

    path, unet, vae, text, _ = tiny_model
    lora = train_lora(_config(dataset, tmp_path / "k.safetensors", path, workdir=str(tmp_path / "rk")))
    sd = load_file(str(lora))
    assert all(k.startswith("lora_unet_") for k in sd)

    from diffusers import EulerDiscreteScheduler

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(), unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, 64)
    t = torch.tensor([500])
    with torch.no_grad():
        base = unet(x, t, ctx).sample.clone()
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        with_lora = pipe.unet(x, t, ctx).sample
    pipe.unload_lora_weights()
    assert (with_lora - base).abs().max() > 1e-4, "diffusers read the file but applied nothing"

    # Independent expectation: merge the file's update into a fresh copy of the diffusers UNet by hand.
    import copy
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    by_kohya = {"lora_unet_" + n.replace(".", "_"): m for n, m in modules.items()}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        stem = key[: -len(".lora_down.weight")]
        down, up, alpha = sd[key], sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"]
        module = by_kohya[stem]
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
        with torch.no_grad():
            module.weight += delta.reshape(module.weight.shape)
    with torch.no_grad():
        expected = merged(x, t, ctx).sample
    torch.testing.assert_close(with_lora, expected, rtol=1e-4, atol=1e-5)


def test_peft_export_has_diffusers_names_with_the_scale_folded_in(tiny_model, dataset, tmp_path):
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    path = tiny_model[0]
    out = train_lora(_config(dataset, tmp_path / "p.safetensors", path, workdir=str(tmp_path / "rp"),
                             export_format="peft", alpha=2.0))
    sd = load_file(str(out))
    assert sd and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in sd)
    assert any(".down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A" in k for k in sd)


def test_training_leaves_the_base_model_as_it_was(tiny_model, dataset, tmp_path):
    import diffstudio
    from diffstudio.train.lora import train_lora

    models = diffstudio.load(tiny_model[0])
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    train_lora(_config(dataset, tmp_path / "c.safetensors", tiny_model[0], workdir=str(tmp_path / "rc")),
               models=models)
    after = models.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_pattern_that_matches_nothing_is_a_named_error(tiny_model, dataset, tmp_path):
    from diffstudio.errors import InvalidInputError
    from diffstudio.train.lora import train_lora

    with pytest.raises(InvalidInputError, match="matches"):
        train_lora(_config(dataset, tmp_path / "x.safetensors", tiny_model[0], workdir=str(tmp_path / "rx"),
                           targets=r"no_such_layer"))


def test_snr_gamma_reaches_the_loss(tiny_model, dataset, tmp_path):
    """Min-SNR weighting (its formula: tests/test_objectives.py) changes what the same run learns."""
    from safetensors.torch import load_file

    from diffstudio.train.lora import train_lora

    path = tiny_model[0]
    plain = load_file(str(train_lora(_config(dataset, tmp_path / "p.safetensors", path, workdir=str(tmp_path / "rp")))))
    weighted = load_file(str(train_lora(_config(dataset, tmp_path / "w.safetensors", path,
                                                workdir=str(tmp_path / "rw"), snr_gamma=1.0))))
    assert plain.keys() == weighted.keys()
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain if k.endswith("lora_up.weight"))


def test_the_cli_trains_and_writes_a_lora(tiny_model, dataset, tmp_path):
    from safetensors import safe_open

    from diffstudio.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["train", "lora", "--model", str(tiny_model[0]), "--data", str(dataset), "--out", str(out),
                 "--steps", "2", "--rank", "2", "--resolution", "64", "--snr-gamma", "5"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd15"


def test_both_exports_load_back_in_diffstudio_as_the_same_update(tiny_model, dataset, tmp_path):
    """Round trip: the kohya and the peft export of one (deterministic) run patch the same weights."""
    import diffstudio
    from diffstudio.train.lora import train_lora

    path = tiny_model[0]
    files = {fmt: train_lora(_config(dataset, tmp_path / f"{fmt}.safetensors", path, alpha=2.0,
                                     workdir=str(tmp_path / f"r{fmt}"), export_format=fmt))
             for fmt in ("kohya", "peft")}
    base = diffstudio.load(path)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    patched = {}
    for fmt, file in files.items():
        handle = base.apply_lora(file)
        patched[fmt] = {k: v.clone() for k, v in base.unet.state_dict().items()}
        handle.remove()
    changed = [k for k in before if not torch.equal(before[k], patched["kohya"][k])]
    assert changed and all(".transformer_blocks." in k or ".proj_" in k for k in changed)
    for k in before:
        torch.testing.assert_close(patched["kohya"][k], patched["peft"][k], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
