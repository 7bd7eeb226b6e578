"""A tiny SDXL base and refiner built with the reference libraries (diffusers, transformers).

Random weights, SDXL's *structure* at small widths, so detection by structure works exactly as on
the released models:
  * base UNet: three levels, no transformer at the first, transformer blocks at the last (depths
    [0, 1, 2] here, [0, 2, 10] released), linear projections, 64-channel heads, a ``text_time`` vector
    input of width P + 6·E (P: bigG's projection width, E: each size value's Fourier width);
  * refiner UNet: four levels, transformer blocks only in the middle two ([0, 2, 2, 0] here,
    [0, 4, 4, 0] released), vector width P + 5·E (size, crop, aesthetic score);
  * CLIP ViT-L (quick_gelu) and OpenCLIP bigG with a text projection (gelu), head width 64.

Writers produce the three layouts users have: the original single file (LDM keys, bigG in OpenCLIP
names under ``conditioner.embedders.N.model.``), a diffusers folder, and lone component files.
The released configs, for meta-device checks, are `diffstudio.release_configs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from diffstudio import release_configs as release
from tests.tiny_sd15 import CLIP as CLIP_L  # CLIP-L at width 64: quick_gelu, one 64-wide head
from tests.tiny_sd15 import VAE as SD15_VAE
from tests.tiny_sd15 import randomise

TIME_DIM = 8  # E: Fourier width of each micro-condition (256 released)
CLIP_G = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
              eos_token_id=49407, pad_token_id=49407)
POOLED = CLIP_G["projection_dim"]  # P
VAE = dict(SD15_VAE, scaling_factor=0.13025)

UNET_BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2), use_linear_projection=True,
                 cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
                 addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                 projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, norm_num_groups=32)
UNET_REFINER = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128),
                    layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=2, attention_head_dim=(1, 1, 2, 2), use_linear_projection=True,
                    cross_attention_dim=CLIP_G["hidden_size"], addition_embed_type="text_time",
                    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
                    norm_num_groups=32)


# Single-file prefixes (the sgm conditioner's embedder order).
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX, BIGG_PREFIX, REFINER_BIGG_PREFIX = ("conditioner.embedders.0.transformer.",
                                                   "conditioner.embedders.1.model.", "conditioner.embedders.0.model.")


def _build(unet_cfg: dict, vae_cfg: dict, clips: dict, seed: int) -> SimpleNamespace:
    """diffusers/transformers modules, randomised (never zeros), in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg)}
    for role, cfg in clips.items():
        cls = CLIPTextModelWithProjection if role == "text_encoder_2" else CLIPTextModel
        parts[role] = cls(CLIPTextConfig(**cfg))
    for i, module in enumerate(parts.values()):
        randomise(module, seed + i)
        module.eval()
    return SimpleNamespace(**parts)


def reference_models(seed: int = 0, in_channels: int = 4) -> SimpleNamespace:
    """Tiny SDXL base: .unet, .vae, .text_encoder (CLIP-L), .text_encoder_2 (bigG with projection)."""
    return _build({**UNET_BASE, "in_channels": in_channels}, VAE,
                  {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G}, seed)


def refiner_reference_models(seed: int = 10) -> SimpleNamespace:
    """Tiny SDXL refiner: .unet, .vae, .text_encoder_2 (bigG with projection)."""
    return _build(UNET_REFINER, VAE, {"text_encoder_2": CLIP_G}, seed)


def meta_reference_models(refiner: bool = False) -> SimpleNamespace:
    """The released SDXL base (or refiner) on the meta device: names and shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**(release.SDXL_REFINER_UNET if refiner else release.SDXL_UNET)),
                 "vae": AutoencoderKL(**release.SDXL_VAE),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**release.CLIP_G))}
        if not refiner:
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**release.CLIP_L))
    return SimpleNamespace(**parts)


# --- the original single-file layout ---------------------------------------------------------------------


def openclip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    """bigG in OpenCLIP names (as SDXL single files store it), with the logit_scale files carry."""
    from diffstudio.convert.clip import canonical_clip_keys, clip_to_openclip

    sd = clip_to_openclip(canonical_clip_keys(text_encoder_2.state_dict()))
    sd["logit_scale"] = torch.tensor(4.6052, device=next(iter(sd.values())).device)
    return sd


def original_layout_state_dict(models: SimpleNamespace) -> dict[str, torch.Tensor]:
    """The single-file layout of a base (``text_encoder`` present) or a refiner, via our converters."""
    from diffstudio.convert.clip import canonical_clip_keys
    from diffstudio.convert.unet import unet_from_diffusers
    from diffstudio.convert.vae import vae_from_diffusers

    sd = {UNET_PREFIX + k: v for k, v in unet_from_diffusers(models.unet.state_dict()).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_from_diffusers(models.vae.state_dict()).items()})
    base = hasattr(models, "text_encoder")
    if base:
        sd.update({CLIP_L_PREFIX + k: v for k, v in canonical_clip_keys(models.text_encoder.state_dict()).items()})
    bigg_prefix = BIGG_PREFIX if base else REFINER_BIGG_PREFIX
    sd.update({bigg_prefix + k: v for k, v in openclip_state_dict(models.text_encoder_2).items()})
    return sd


def save(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    from safetensors.torch import save_file

    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_single_file(path: Path, models: SimpleNamespace, dtype: torch.dtype | None = None) -> Path:
    return save(path, original_layout_state_dict(models), dtype)


def write_vae_file(path: Path, vae, layout: str = "diffusers") -> Path:
    """A lone VAE file like madebyollin/sdxl-vae-fp16-fix ("diffusers" keys) or sdxl_vae.safetensors ("original")."""
    from diffstudio.convert.vae import vae_from_diffusers

    sd = vae.state_dict() if layout == "diffusers" else vae_from_diffusers(vae.state_dict())
    return save(path, sd)


# --- the diffusers folder layout --------------------------------------------------------------------------


def write_diffusers_folder(folder: Path, models: SimpleNamespace) -> Path:
    """A StableDiffusionXLPipeline folder (base) or StableDiffusionXLImg2ImgPipeline folder (refiner)."""
    from diffusers import EulerDiscreteScheduler

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer

    base = hasattr(models, "text_encoder")
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
             "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": base,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    models.unet.save_pretrained(folder / "unet")
    models.vae.save_pretrained(folder / "vae")
    models.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    load_clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")
    if base:
        models.text_encoder.save_pretrained(folder / "text_encoder")
        load_clip_tokenizer().save_pretrained(folder / "tokenizer")
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    else:
        index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
