"""Every file format's key mapping and delta, on fake files with real key names.

For each format the weight change the patch makes (W' - W of the parameter the layer names) must
equal the format's formula evaluated here independently of diffstudio.patches.deltas."""

from __future__ import annotations

import pytest
import torch

from diffstudio.demo.untrained import untrained_demo_models

A = 3.0  # alpha stored in the files


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


@pytest.fixture()
def sd15():
    return untrained_demo_models()


def weight_change(models, files: dict, role: str, param: str, **kwargs) -> torch.Tensor:
    module = models.components[role]
    before = module.state_dict()[param].clone()
    handle = models.apply_lora(files, **kwargs)
    after = module.state_dict()[param].clone()
    handle.remove()
    assert torch.equal(module.state_dict()[param], before)
    return after - before


# SD 1.x demo UNet (64 channels): input_blocks.1 = down_blocks.0 (ResBlock .0 + transformer .1).
TO_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"           # (64, 64)
CONV1 = "input_blocks.1.0.in_layers.2.weight"                               # (64, 64, 3, 3)
KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"


def test_kohya_locon_3x3_down_1x1_up(sd15):
    down, up = r(4, 64, 3, 3), r(64, 4, 1, 1, seed=1)
    files = {f"{KOHYA_CONV1}.lora_down.weight": down, f"{KOHYA_CONV1}.lora_up.weight": up,
             f"{KOHYA_CONV1}.alpha": torch.tensor(A)}
    expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * A / 4
    assert torch.allclose(weight_change(sd15, files, "unet", CONV1), expected, atol=1e-5)


def test_locon_cp_mid(sd15):
    down, mid, up = r(4, 64, 1, 1), r(4, 4, 3, 3, seed=2), r(64, 4, 1, 1, seed=1)
    files = {f"{KOHYA_CONV1}.lora_down.weight": down, f"{KOHYA_CONV1}.lora_mid.weight": mid,
             f"{KOHYA_CONV1}.lora_up.weight": up, f"{KOHYA_CONV1}.alpha": torch.tensor(A)}
    expected = torch.zeros(64, 64, 3, 3)
    for y in range(3):
        for x in range(3):
            expected[:, :, y, x] = up[:, :, 0, 0] @ mid[:, :, y, x] @ down[:, :, 0, 0]
    assert torch.allclose(weight_change(sd15, files, "unet", CONV1), expected * A / 4, atol=1e-5)


def test_ldm_style_kohya_names_reach_the_same_weight(sd15):
    down, up = r(2, 64), r(64, 2, seed=1)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    files = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}  # no alpha: scale 1
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), up @ down, atol=1e-5)


def test_loha(sd15):
    w1a, w1b, w2a, w2b = r(64, 4), r(4, 64, seed=1), r(64, 4, seed=2), r(4, 64, seed=3)
    files = {f"{KOHYA_TO_Q}.hada_w1_a": w1a, f"{KOHYA_TO_Q}.hada_w1_b": w1b, f"{KOHYA_TO_Q}.hada_w2_a": w2a,
             f"{KOHYA_TO_Q}.hada_w2_b": w2b, f"{KOHYA_TO_Q}.alpha": torch.tensor(A)}
    expected = (w1a @ w1b) * (w2a @ w2b) * A / 4
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), expected, atol=1e-4)


def test_loha_cp_on_a_conv(sd15):
    t1, t2 = r(4, 4, 3, 3), r(4, 4, 3, 3, seed=5)
    w1a, w1b, w2a, w2b = r(4, 64, seed=1), r(4, 64, seed=2), r(4, 64, seed=3), r(4, 64, seed=4)  # (r, out), (r, in)
    files = {f"{KOHYA_CONV1}.hada_t1": t1, f"{KOHYA_CONV1}.hada_t2": t2, f"{KOHYA_CONV1}.hada_w1_a": w1a,
             f"{KOHYA_CONV1}.hada_w1_b": w1b, f"{KOHYA_CONV1}.hada_w2_a": w2a, f"{KOHYA_CONV1}.hada_w2_b": w2b,
             f"{KOHYA_CONV1}.alpha": torch.tensor(A)}
    w1, w2 = torch.zeros(64, 64, 3, 3), torch.zeros(64, 64, 3, 3)
    for y in range(3):
        for x in range(3):
            w1[:, :, y, x] = w1a.T @ t1[:, :, y, x] @ w1b
            w2[:, :, y, x] = w2a.T @ t2[:, :, y, x] @ w2b
    assert torch.allclose(weight_change(sd15, files, "unet", CONV1), w1 * w2 * A / 4, rtol=1e-4, atol=1e-3)


def _kron(a, b):  # independent Kronecker product of two matrices
    return torch.einsum("ab,cd->acbd", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


@pytest.mark.parametrize("prefix", ["lora_unet_", "lycoris_"])
def test_lokr_whole_w1_low_rank_w2(sd15, prefix):
    name = prefix + "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w1, w2a, w2b = r(8, 4), r(8, 2, seed=1), r(2, 16, seed=2)
    files = {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
             f"{name}.alpha": torch.tensor(A)}
    expected = _kron(w1, w2a @ w2b) * A / 2
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), expected, atol=1e-4)


def test_lokr_whole_factors_ignore_alpha(sd15):
    w1, w2 = r(4, 4), r(16, 16, seed=1)
    files = {f"{KOHYA_TO_Q}.lokr_w1": w1, f"{KOHYA_TO_Q}.lokr_w2": w2, f"{KOHYA_TO_Q}.alpha": torch.tensor(A)}
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), _kron(w1, w2), atol=1e-4)


def test_lokr_cp_conv(sd15):
    w1a, w1b = r(4, 2), r(2, 8, seed=1)
    t2, w2a, w2b = r(2, 2, 3, 3, seed=2), r(2, 16, seed=3), r(2, 8, seed=4)  # W2: (16, 8, 3, 3)
    files = {f"{KOHYA_CONV1}.lokr_w1_a": w1a, f"{KOHYA_CONV1}.lokr_w1_b": w1b, f"{KOHYA_CONV1}.lokr_t2": t2,
             f"{KOHYA_CONV1}.lokr_w2_a": w2a, f"{KOHYA_CONV1}.lokr_w2_b": w2b, f"{KOHYA_CONV1}.alpha": torch.tensor(A)}
    w1 = w1a @ w1b
    expected = torch.zeros(64, 64, 3, 3)
    for y in range(3):
        for x in range(3):
            expected[:, :, y, x] = _kron(w1, w2a.T @ t2[:, :, y, x] @ w2b)
    assert torch.allclose(weight_change(sd15, files, "unet", CONV1), expected * A / 2, rtol=1e-4, atol=1e-4)


def test_full_diff_on_weight_and_bias(sd15):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    diff, diff_b = r(64, 64, 1, 1), r(64, seed=1)
    files = {f"{name}.diff": diff, f"{name}.diff_b": diff_b}
    assert torch.allclose(weight_change(sd15, files, "unet", "input_blocks.1.1.proj_in.weight"), diff)
    assert torch.allclose(weight_change(sd15, files, "unet", "input_blocks.1.1.proj_in.bias"), diff_b)


def test_peft_default_adapter_and_text_encoder_prefix(sd15):
    a, b = r(2, 64), r(64, 2, seed=1)
    files = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight": a,
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight": b,
             "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.default.weight": r(2, 64, seed=2),
             "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.default.weight": r(256, 2, seed=3)}
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), b @ a, atol=1e-5)
    change = weight_change(sd15, files, "text_encoder", "encoder.layers.1.mlp.fc1.weight")
    assert torch.allclose(change, r(256, 2, seed=3) @ r(2, 64, seed=2), atol=1e-5)


def test_diffusers_attention_processor_names(sd15):
    a, b = r(2, 64), r(64, 2, seed=1)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    files = {f"{block}.processor.to_out_lora.down.weight": a, f"{block}.processor.to_out_lora.up.weight": b}
    param = "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    assert torch.allclose(weight_change(sd15, files, "unet", param), b @ a, atol=1e-5)


def test_kohya_text_encoder_and_strengths(sd15):
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = r(2, 64), r(64, 2, seed=1)
    files = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(A),
             f"{KOHYA_TO_Q}.lora_down.weight": down, f"{KOHYA_TO_Q}.lora_up.weight": up}
    param = "encoder.layers.0.self_attn.q_proj.weight"
    change = weight_change(sd15, files, "text_encoder", param, strength=0.5, text_strength=2.0)
    assert torch.allclose(change, up @ down * A / 2 * 2.0, atol=1e-5)
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q, strength=0.5), up @ down * 0.5, atol=1e-5)


def test_kohya_dora_scale(sd15):
    down, up, m = r(2, 64), r(64, 2, seed=1) * 0.1, r(64, 1, seed=2).abs() + 0.5
    files = {f"{KOHYA_TO_Q}.lora_down.weight": down, f"{KOHYA_TO_Q}.lora_up.weight": up,
             f"{KOHYA_TO_Q}.dora_scale": m}
    base = sd15.unet.state_dict()[TO_Q].clone()
    adapted = base + up @ down
    expected = adapted / adapted.norm(dim=1, keepdim=True) * m - base
    assert torch.allclose(weight_change(sd15, files, "unet", TO_Q), expected, atol=1e-5)


# --- SDXL: te1 / te2 -------------------------------------------------------------------------------


def test_sdxl_te1_te2_prefixes(tmp_path):
    import diffstudio
    from tests import tiny_sdxl

    models = diffstudio.load(tiny_sdxl.write_single_file(tmp_path / "sdxl.safetensors", tiny_sdxl.reference_models()))
    files, expected = {}, {}
    for prefix, role in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        width = models.components[role].config.hidden_size
        name = f"{prefix}text_model_encoder_layers_0_self_attn_v_proj"
        down, up = r(2, width, seed=len(prefix)), r(width, 2, seed=7)
        files.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        expected[role] = up @ down
    for role, delta in expected.items():
        param = next(k for k in models.components[role].state_dict() if k.endswith("layers.0.self_attn.v_proj.weight"))
        assert torch.allclose(weight_change(models, files, role, param), delta, atol=1e-5)


# --- FLUX: kohya / BFL, diffusers (split q/k/v into the fused qkv), XLabs ---------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    import diffstudio
    from tests import tiny_flux

    path = tiny_flux.write_bundle(tmp_path_factory.mktemp("flux") / "flux.safetensors", *tiny_flux.reference_models())
    return diffstudio.load(path)


H = 128  # tiny FLUX hidden width


def test_flux_kohya_bfl_names(flux):
    down, up = r(4, H), r(3 * H, 4, seed=1)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    files = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(A)}
    change = weight_change(flux, files, "dit", "double_blocks.0.img_attn.qkv.weight")
    assert torch.allclose(change, up @ down * A / 4, atol=1e-5)


def test_flux_diffusers_q_k_v_land_in_row_slices_of_qkv(flux):
    files, expected = {}, torch.zeros(3 * H, H)
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        a, b = r(2, H, seed=i), r(H, 2, seed=10 + i)
        files[f"transformer.transformer_blocks.0.attn.{proj}.lora_A.weight"] = a
        files[f"transformer.transformer_blocks.0.attn.{proj}.lora_B.weight"] = b
        expected[i * H:(i + 1) * H] = b @ a
    change = weight_change(flux, files, "dit", "double_blocks.0.img_attn.qkv.weight")
    assert torch.allclose(change, expected, atol=1e-5)
    # The single blocks' fused linear1 = [q; k; v; mlp]: proj_mlp goes to the rows after q, k, v.
    mlp_rows = flux.dit.state_dict()["single_blocks.0.linear1.weight"].shape[0] - 3 * H
    a, b = r(2, H, seed=20), r(mlp_rows, 2, seed=21)
    files = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": a,
             "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": b}
    change = weight_change(flux, files, "dit", "single_blocks.0.linear1.weight")
    assert torch.allclose(change[3 * H:], b @ a, atol=1e-5) and not change[:3 * H].any()


def test_flux_xlabs_processor_names(flux):
    down, up = r(4, H), r(3 * H, 4, seed=1)
    files = {"double_blocks.0.processor.qkv_lora2.down.weight": down,
             "double_blocks.0.processor.qkv_lora2.up.weight": up}
    change = weight_change(flux, files, "dit", "double_blocks.0.txt_attn.qkv.weight")
    assert torch.allclose(change, up @ down, atol=1e-5)
    from diffstudio.patches import inspect_lora

    report = inspect_lora(files, flux)
    assert report.family_guess == "flux" and report.coverage == 1.0 and "XLabs" in report.format


def test_on_the_fly_on_a_float8_flux_keeps_the_weights_and_adds_the_lora(tmp_path):
    import diffstudio
    from tests import tiny_flux

    models = diffstudio.load(tiny_flux.write_bundle(tmp_path / "fp8.safetensors", *tiny_flux.reference_models(),
                                                    fp8=True))
    layer = models.dit.double_blocks[0].img_attn.qkv
    assert layer.weight.dtype == torch.float8_e4m3fn
    stored = layer.weight.clone()
    down, up = r(4, H), r(3 * H, 4, seed=1)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    handle = models.apply_lora({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                f"{name}.alpha": torch.tensor(A)}, mode="on_the_fly", strength=0.5)
    x = r(2, 5, H, seed=3)
    with torch.no_grad():
        out = layer(x)
    expected = x @ stored.float().T + layer.bias + (x @ down.T @ up.T) * A / 4 * 0.5
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))  # still the float8 bytes
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ stored.float().T + layer.bias, rtol=1e-5, atol=1e-5)
