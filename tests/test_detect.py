"""Detection by structure: fake state dicts with real key names, the order of the records,
full-size SD 1.5 layouts on the meta device, and the errors for things that are not models."""

from __future__ import annotations

import pytest
import torch

import diffstudio
from diffstudio.families import FAMILIES
from diffstudio.release_configs import CLIP_L, SD15_UNET, SD15_VAE
from tests.meta_checks import assert_every_key_maps
from tests.tiny_sd15 import original_layout_state_dict, reference_models


@pytest.fixture(scope="module")
def tiny_original():
    return original_layout_state_dict(*reference_models())


def test_tiny_single_file_is_sd15_with_three_components(tiny_original):
    det = diffstudio.detect(tiny_original)
    assert det.family == "sd15"
    assert set(det.components) == {"unet", "vae", "text_encoder"}
    assert det.components["unet"].config.context_dim == 64
    assert det.components["unet"].config.num_heads == 8
    assert det.variant is None
    assert det.ignored == ["alphas_cumprod"]


def test_detection_reads_only_names_and_shapes(tiny_original):
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tiny_original.items()}
    assert diffstudio.detect(meta).family == "sd15"


def test_bare_unet_keys_are_a_denoiser_without_other_components(tiny_original):
    bare = {k[len("model.diffusion_model."):]: v for k, v in tiny_original.items()
            if k.startswith("model.diffusion_model.")}
    det = diffstudio.detect(bare)
    assert det.family == "sd15" and set(det.components) == {"unet"}


def test_lone_vae_is_a_component_without_family(tiny_original):
    vae = {k: v for k, v in tiny_original.items() if k.startswith("first_stage_model.")}
    det = diffstudio.detect(vae)
    assert det.family is None and set(det.components) == {"vae"}


def test_nine_channel_unet_is_the_inpainting_variant():
    sd = original_layout_state_dict(*reference_models(in_channels=9))
    det = diffstudio.detect(sd)
    assert det.family == "sd15" and det.variant == "inpaint"


def test_unrelated_state_dict_raises_with_nearest_families():
    sd = {"encoder.layer.0.weight": torch.zeros(3, 3), "classifier.bias": torch.zeros(3)}
    with pytest.raises(diffstudio.UnknownModelError) as err:
        diffstudio.detect(sd)
    message = str(err.value)
    assert "sd15" in message and "encoder.*" in message


def test_sdxl_style_unet_is_not_taken_for_sd15(tiny_original):
    """A `y` embedding (label_emb) means SDXL-style conditioning: SD 1.x must refuse it, not guess."""
    sd = dict(tiny_original)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 16)
    sd["model.diffusion_model.label_emb.0.0.bias"] = torch.zeros(128)
    sd["model.diffusion_model.label_emb.0.2.weight"] = torch.zeros(128, 128)
    sd["model.diffusion_model.label_emb.0.2.bias"] = torch.zeros(128)
    with pytest.raises(diffstudio.UnknownModelError, match="label_emb"):
        diffstudio.detect(sd)


def test_family_records_are_exclusive_on_the_tiny_model(tiny_original):
    """Order matters only if two records accept the same denoiser: each record's test must be exclusive."""
    from diffstudio.detect import _try_family

    accepted = [f.name for f in FAMILIES if _try_family(f, tiny_original, {})[0] is not None]
    assert accepted == ["sd15"]
    assert [f.name for f in FAMILIES][0] == "sd15"


def test_empty_state_dict_is_an_error():
    with pytest.raises(diffstudio.UnknownModelError, match="empty"):
        diffstudio.detect({})


# --- full size on the meta device ---------------------------------------------------------------



def _meta_reference(in_channels: int = 4):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return (UNet2DConditionModel(**{**SD15_UNET, "in_channels": in_channels}), AutoencoderKL(**SD15_VAE),
                CLIPTextModel(CLIPTextConfig(**CLIP_L)))


@pytest.mark.parametrize("in_channels", [4, 9])
def test_full_size_sd15_single_file_maps_every_key(in_channels):

    unet, vae, text = _meta_reference(in_channels)
    sd = original_layout_state_dict(unet, vae, text)
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, in_channels, 3, 3)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    det = diffstudio.detect(sd)
    assert det.family == "sd15" and det.variant == ("inpaint" if in_channels == 9 else None)
    cfg = det.components["unet"].config
    assert (cfg.model_channels, tuple(cfg.channel_mult), tuple(cfg.num_res_blocks)) == (320, (1, 2, 4, 4),
                                                                                        (2, 2, 2, 2))
    assert det.components["text_encoder"].config.num_hidden_layers == 12
    assert_every_key_maps(sd, det)


def test_ema_and_schedule_tensors_are_ignored_and_reported(tiny_original):
    sd = dict(tiny_original)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(32, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    det = diffstudio.detect(sd)
    assert det.family == "sd15"
    assert {"model_ema.decay", "model_ema.diffusion_modelinput_blocks00weight", "alphas_cumprod"} <= set(det.ignored)
