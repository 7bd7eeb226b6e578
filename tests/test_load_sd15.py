"""Loading SD 1.x from every layout users have, checked against the reference libraries."""

from __future__ import annotations

import pytest
import torch

import diffstudio
from tests.tiny_sd15 import reference_models, write_diffusers_folder, write_single_file

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def reference():
    return reference_models()


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    return {"folder": write_diffusers_folder(root / "diffusers", *reference),
            "single": write_single_file(root / "model.safetensors", *reference)}


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_components_match_the_reference(reference, sources, layout):
    unet_ref, vae_ref, text_ref = reference
    models = diffstudio.load(sources[layout])
    assert models.family.name == "sd15"
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        assert rel_err(models.unet(x, t, ctx), unet_ref(x, t, encoder_hidden_states=ctx).sample) < TOL
        images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert rel_err(models.vae.encode(images), vae_ref.encode(images).latent_dist.mean) < TOL
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(models.vae.decode(z), vae_ref.decode(z).sample) < TOL
        ids = models.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert rel_err(models.text_encoder(ids).last_hidden_state, text_ref(ids).last_hidden_state) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_and_cast(reference, tmp_path, dtype):
    path = write_single_file(tmp_path / "half.safetensors", *reference, dtype=dtype)
    det = diffstudio.detect(diffstudio.io.state_dict.read_state_dict(path))
    assert det.components["unet"].dtype == str(dtype).replace("torch.", "")
    models = diffstudio.load(path)  # fp32 by default
    assert models.dtype == torch.float32
    ref = reference[0].state_dict()["conv_in.weight"]
    assert torch.allclose(models.unet.input_blocks[0][0].weight, ref.to(dtype).float())


def test_ckpt_single_file_loads(reference, tmp_path):
    from tests.tiny_sd15 import original_layout_state_dict

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_layout_state_dict(*reference), "global_step": 10}, path)
    assert diffstudio.load(path).family.name == "sd15"


def test_separate_vae_file_replaces_the_bundled_one(reference, sources, tmp_path):
    from safetensors.torch import save_file

    from diffstudio.convert.vae import vae_from_diffusers

    other = reference_models(seed=50)[1]
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_from_diffusers(other.state_dict()).items()}, str(path))
    models = diffstudio.load(sources["single"], path)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(models.vae.decode(z), other.decode(z).sample) < TOL
    assert models.sources["vae"] == str(path)


def test_unet_only_file_is_refused_as_a_base(tmp_path):
    from safetensors.torch import save_file

    from tests.tiny_sd15 import original_layout_state_dict

    sd = original_layout_state_dict(*reference_models())
    vae_only = {k: v.contiguous() for k, v in sd.items() if k.startswith("first_stage_model.")}
    path = tmp_path / "vae.safetensors"
    save_file(vae_only, str(path))
    with pytest.raises(diffstudio.UnknownModelError, match="only vae"):
        diffstudio.load(path)


def test_missing_path_and_empty_folder_are_named_errors(tmp_path):
    with pytest.raises(diffstudio.ModelNotFoundError):
        diffstudio.load(tmp_path / "nope.safetensors")
    with pytest.raises(diffstudio.ModelNotFoundError, match="model_index.json"):
        diffstudio.load(tmp_path)


def test_our_single_file_round_trips_with_configs(reference, sources, tmp_path):
    from diffstudio.save import save_single_file

    models = diffstudio.load(sources["folder"])
    path = save_single_file(models, tmp_path / "resaved.safetensors")
    again = diffstudio.load(path)
    for name, p in models.unet.state_dict().items():
        assert torch.equal(p, again.unet.state_dict()[name])
    assert again.configs["unet"] == models.configs["unet"]
