"""SDXL LoRAs: parity with diffusers/peft on the tiny SDXL (UNet + both text encoders), for the
diffusers file and kohya files in both UNet spellings (diffusers paths and the LDM-style
`input_blocks_...` some SDXL trainers write), with `lora_te1_` / `lora_te2_`."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import diffstudio
from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.families.sdxl import vector_condition
from tests import tiny_sdxl as tiny

TOL = 1e-4


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _kohya(sds: dict[str, dict], alphas: dict[str, float], ldm_unet: bool) -> dict:
    """Our test's own rule: kohya prefix + module path with '_' (the UNet optionally in LDM names,
    found by renaming a '.weight' key through the UNet converter), alpha per layer."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out = {}
    for role, sd in sds.items():
        modules = {k.rsplit(".lora_", 1)[0] for k in sd}
        # kohya spells CLIP with `text_model.` (transformers 5's CLIPTextModel leaves it out).
        names = {m: ("text_model." + m if role != "unet" and not m.startswith("text_model.") else m) for m in modules}
        if ldm_unet and role == "unet":
            ldm = unet_from_diffusers(dict(tiny_unet_keys))
            by_id = {id(v): k for k, v in ldm.items()}
            names = {m: by_id[id(tiny_unet_keys[m + ".weight"])].rsplit(".weight", 1)[0] for m in modules}
        for key, value in sd.items():
            module, part = key.rsplit(".lora_", 1)
            name = prefixes[role] + names[module].replace(".", "_")
            out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alphas[role]))
    return out


tiny_unet_keys: dict = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sdxl")
    ref = tiny.reference_models()
    base = tiny.write_single_file(root / "sdxl.safetensors", ref)
    tiny_unet_keys.update(ref.unet.state_dict())
    cfgs = {"unet": LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]),
            "text_encoder": LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "fc1"]),
            "text_encoder_2": LoraConfig(r=3, lora_alpha=3, init_lora_weights=False,
                                         target_modules=["k_proj", "v_proj", "out_proj", "fc2"])}
    ref.unet.add_adapter(cfgs["unet"])
    ref.text_encoder = inject_adapter_in_model(cfgs["text_encoder"], ref.text_encoder)
    ref.text_encoder_2 = inject_adapter_in_model(cfgs["text_encoder_2"], ref.text_encoder_2)
    sds = {role: get_peft_model_state_dict(getattr(ref, role)) for role in cfgs}

    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        root / "peft", unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
        text_encoder_2_lora_layers=sds["text_encoder_2"], unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=cfgs["text_encoder_2"].to_dict())
    alphas = {role: cfg.lora_alpha for role, cfg in cfgs.items()}
    files = {"peft": root / "peft" / "pytorch_lora_weights.safetensors",
             "kohya": root / "kohya.safetensors", "kohya_ldm": root / "kohya_ldm.safetensors"}
    save_file(_kohya(sds, alphas, ldm_unet=False), str(files["kohya"]))
    save_file(_kohya(sds, alphas, ldm_unet=True), str(files["kohya_ldm"]))
    assert any(k.startswith("lora_unet_input_blocks_") for k in _kohya(sds, alphas, ldm_unet=True))
    return ref, base, files


@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya_ldm"])
def test_sdxl_lora_matches_diffusers(world, layout):
    ref, base, files = world
    models = diffstudio.load(base)
    assert models.family.name == "sdxl"
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, tiny.POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 1024.0, 1024.0], [512.0, 640.0, 0.0, 0.0, 448.0, 576.0]])
    y = vector_condition(pooled, time_ids, models.unet.config.adm_in_channels)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    with torch.no_grad():
        expected = ref.unet(x, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        handle = models.apply_lora(files[layout])
        assert handle.report.coverage == 1.0
        assert rel_err(models.unet(x, t, context, y=y), expected) < TOL
        assert rel_err(models.text_encoder(ids).last_hidden_state, ref.text_encoder(ids).last_hidden_state) < TOL
        assert rel_err(models.text_encoder_2(ids).text_embeds, ref.text_encoder_2(ids).text_embeds) < TOL
    groups = handle.report.groups
    assert {"text encoder 1", "text encoder 2", "unet down", "unet mid", "unet up"} <= set(groups)


def test_doctor_names_sdxl_without_a_model(world):
    from diffstudio.patches import inspect_lora

    report = inspect_lora(world[2]["kohya"])
    assert report.family_guess == "sdxl" and report.coverage is None
