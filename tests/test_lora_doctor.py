"""The LoRA doctor (full / partial / zero coverage), `diffstudio lora inspect`, `generate --lora`,
and `<lora:name:w>` prompt tags reaching apply_lora through the pipeline."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import diffstudio
from diffstudio.cli import main
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import LoRAMismatchError
from diffstudio.patches import active_loras, inspect_lora
from tests.tiny_sd15 import reference_models, write_single_file


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def layer(name: str, out: int, inp: int, seed: int = 0) -> dict:
    return {f"{name}.lora_down.weight": r(2, inp, seed=seed), f"{name}.lora_up.weight": r(out, 2, seed=seed + 1),
            f"{name}.alpha": torch.tensor(2.0)}


# SD 1.x demo model widths: 64 at level 0, context 64, CLIP 64 wide.
GOOD = {**layer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 64, 64),
        **layer("lora_unet_mid_block_attentions_0_proj_out", 128, 128, seed=2),
        **layer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 64, 64, seed=4)}
# What an SDXL LoRA looks like to an SD 1.x model: a second text encoder, 2048-wide cross-attention.
SDXL_ONLY = {**layer("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", 1280, 1280, seed=6),
             **layer("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k", 1280, 2048, seed=8),
             **layer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 64, 2048, seed=10)}


@pytest.fixture()
def models():
    return untrained_demo_models()


def test_full_coverage_reports_every_group_without_warning(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = models.apply_lora(GOOD)
    report = handle.report
    assert report.coverage == 1.0 and report.base_family == "sd15"
    assert report.groups == {"unet down": [1, 1], "unet mid": [1, 1], "text encoder 1": [1, 1]}
    assert "kohya/LyCORIS LoRA" in report.format
    assert "100.0 %" in report.text()


def test_partial_coverage_warns_with_the_numbers(models):
    with pytest.warns(UserWarning, match=r"3/6 layers matched \(50\.0 %\)") as caught:
        handle = models.apply_lora({**GOOD, **SDXL_ONLY})
    assert "text encoder 2 0/1" in str(caught[0].message)
    report = handle.report
    assert report.groups["unet down"] == [1, 3]
    assert any("shape mismatch" in pattern for pattern in report.unmatched)
    te2 = "lora_teN_text_model_encoder_layers_N_self_attn_q_proj (no layer of this name in the model)"
    assert report.unmatched[te2] == 1


def test_zero_coverage_is_a_named_error_that_names_the_family(models):
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    with pytest.raises(LoRAMismatchError, match="looks made for sdxl"):
        models.apply_lora(SDXL_ONLY)
    assert all(torch.equal(v, before[k]) for k, v in models.unet.state_dict().items())  # nothing applied


def test_a_file_with_no_lora_layers_is_refused(models):
    with pytest.raises(LoRAMismatchError, match="no LoRA"):
        models.apply_lora({"model.diffusion_model.input_blocks.0.0.weight": r(4, 4)})


def test_report_without_a_model_guesses_the_family():
    report = inspect_lora(GOOD)
    assert report.coverage is None and report.family_guess is None  # 64-wide: no released family
    assert inspect_lora(SDXL_ONLY).family_guess == "sdxl"
    sd15_like = layer("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k", 320, 768)
    assert inspect_lora(sd15_like).family_guess == "sd15"


# --- command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    model = write_single_file(root / "tiny.safetensors", *reference_models())
    # tiny_sd15: 32 channels at level 0, context 64.
    lora = root / "style.safetensors"
    save_file({k: v.contiguous() for k, v in
               layer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 64).items()},
              str(lora))
    wrong = root / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in SDXL_ONLY.items()}, str(wrong))
    return model, lora, wrong


def test_cli_inspect(tiny, capsys):
    model, lora, wrong = tiny
    assert main(["lora", "inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "format: kohya/LyCORIS LoRA" in out and "unet down" in out
    assert main(["lora", "inspect", str(lora), "--model", str(model)]) == 0
    assert "1/1 layers matched (100.0 %)" in capsys.readouterr().out
    assert main(["lora", "inspect", str(wrong), "--model", str(model)]) == 2
    captured = capsys.readouterr()
    assert "0/3 layers matched" in captured.out and "LoRAMismatchError" in captured.err


def test_cli_generate_with_lora(tiny, tmp_path):
    model, lora, _ = tiny
    out = tmp_path / "o.png"
    args = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--width", "64", "--height", "64"]
    assert main(args + ["-o", str(out), "--lora", f"{lora}:0.8"]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert '"loras": [{"name": "style.safetensors"' in image.text["diffstudio"]
        assert '"strength": 0.8' in image.text["diffstudio"]


def test_prompt_tags_apply_through_the_pipeline(tiny):
    model, lora, _ = tiny
    models = diffstudio.load(model)
    param = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w0 = models.unet.state_dict()[param].clone()
    pipe = diffstudio.Pipeline(models)
    pipe.lora_dirs = [lora.parent]
    image = pipe("a circle <lora:style:0.5>", width=64, height=64, steps=1, progress=False)[0]
    assert image.info["diffstudio_recipe"]["extra"]["loras"][0]["strength"] == 0.5
    assert not torch.equal(models.unet.state_dict()[param], w0)  # the tag's clone is in the shared weights
    assert active_loras(models) == []  # the model itself never has the tag's LoRA
    pipe("a circle", width=64, height=64, steps=1, progress=False)  # no tag: the model's own weights again
    assert torch.equal(models.unet.state_dict()[param], w0)
