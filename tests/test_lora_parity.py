"""LoRA parity with the reference: a tiny SD 1.x in diffusers/transformers carries a random peft LoRA
(non-zero B); the LoRA is saved as diffusers writes it and in kohya format (our own rule in this test,
and diffusers' ``convert_state_dict_to_kohya``); our loaded model patched with each file must give
the reference's LoRA-enabled outputs (fp32, relative error < 1e-4), in both patch modes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import diffstudio
from tests.tiny_sd15 import reference_models, write_single_file

TOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _kohya_by_rule(unet_sd: dict, text_sd: dict, unet_alpha: float, text_alpha: float) -> dict:
    """Independent rule of thumb: kohya = diffusers module path with '_' for '.', lora_A -> lora_down,
    text modules under HF CLIP's released names (with `text_model.`), alpha stored per layer."""
    out = {}
    for sd, prefix, alpha, extra in ((unet_sd, "lora_unet_", unet_alpha, ""),
                                     (text_sd, "lora_te_", text_alpha, "text_model.")):
        for key, value in sd.items():
            module, part = key.rsplit(".lora_", 1)
            name = prefix + (extra + module).replace(".", "_")
            out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_parity")
    unet, vae, text = reference_models()
    base = write_single_file(root / "base.safetensors", unet, vae, text)
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False)
    unet.add_adapter(ucfg)
    text = inject_adapter_in_model(tcfg, text)
    unet_sd, text_sd = get_peft_model_state_dict(unet), get_peft_model_state_dict(text)
    assert all(v.abs().sum() > 0 for k, v in unet_sd.items() if "lora_B" in k)  # a LoRA that does something

    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(root / "peft", unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
                                              unet_lora_adapter_metadata=ucfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=tcfg.to_dict())
    files = {"peft": root / "peft" / "pytorch_lora_weights.safetensors",
             "kohya": root / "kohya.safetensors", "kohya_diffusers": root / "kohya_diffusers.safetensors"}
    save_file(_kohya_by_rule(unet_sd, text_sd, 8, 3), str(files["kohya"]))

    from diffusers.utils import convert_state_dict_to_kohya

    # diffusers' converter writes alpha = rank, so fold alpha / rank into B first.
    folded = {f"unet.{k}": v * (8 / 4 if "lora_B" in k else 1) for k, v in unet_sd.items()}
    folded.update({f"text_encoder.{k}": v * (3 / 2 if "lora_B" in k else 1) for k, v in text_sd.items()})
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(folded).items()},
              str(files["kohya_diffusers"]))

    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 64, generator=g))
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    with torch.no_grad():
        ref_unet = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        ref_text = text(ids).last_hidden_state
    return dict(base=base, files=files, inputs=inputs, ids=ids, ref_unet=ref_unet, ref_text=ref_text)


@pytest.mark.parametrize("mode", ["merged", "on_the_fly"])
@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya_diffusers"])
def test_patched_model_matches_diffusers_with_lora(lora_world, layout, mode):
    models = diffstudio.load(lora_world["base"])
    x, t, ctx = lora_world["inputs"]
    with torch.no_grad():
        base_out = models.unet(x, t, ctx)
        assert rel_err(base_out, lora_world["ref_unet"]) > 1e-2  # the LoRA changes the output
        handle = models.apply_lora(lora_world["files"][layout], mode=mode)
        assert rel_err(models.unet(x, t, ctx), lora_world["ref_unet"]) < TOL
        text_out = models.text_encoder(lora_world["ids"]).last_hidden_state
        assert rel_err(text_out, lora_world["ref_text"]) < TOL
        handle.remove()
        assert torch.equal(models.unet(x, t, ctx), base_out)


def test_peft_alpha_comes_from_the_adapter_metadata(lora_world):
    from diffstudio.patches.apply import read_lora
    from diffstudio.patches.formats import parse_lora

    sd, metadata, _ = read_lora(lora_world["files"]["peft"])
    layers = parse_lora(sd, metadata).layers
    assert {layer.scale for layer in layers if layer.scope == "denoiser"} == {8 / 4}
    assert {layer.scale for layer in layers if layer.scope == "text"} == {3 / 2}


def test_dora_matches_peft(tmp_path):
    unet, vae, text = reference_models(seed=3)
    base = write_single_file(tmp_path / "base.safetensors", unet, vae, text)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "ff.net.2"], init_lora_weights=False,
                     use_dora=True)
    unet = inject_adapter_in_model(cfg, unet)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:  # off its initial value ||W + BA||, or DoRA == LoRA
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    sd = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    assert any("lora_magnitude_vector" in k for k in sd)
    save_file(sd, str(tmp_path / "dora.safetensors"))
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 64, generator=g)
    models = diffstudio.load(base)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        handle = models.apply_lora(tmp_path / "dora.safetensors")
        assert "DoRA" in handle.report.format
        assert rel_err(models.unet(x, t, ctx), ref) < TOL
        handle.remove()
        handle = models.apply_lora(tmp_path / "dora.safetensors", mode="on_the_fly")
        assert rel_err(models.unet(x, t, ctx), ref) < TOL
