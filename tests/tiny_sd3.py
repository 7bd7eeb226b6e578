"""A tiny Stable Diffusion 3 built with the reference libraries (diffusers, transformers).

Random weights (never zeros) at small widths that keep SD3's conventions, so detection by shape works
as on the real model: MMDiT heads of width 64, CLIP head width 64, T5 heads read off the relative
bias, a 16-channel VAE without quant convs, 8x downscale. The widths keep SD3's relations:
y = pooled CLIP-L + CLIP-G, CLIP-L + CLIP-G narrower than T5 (so their features are zero-padded).
Written as a diffusers folder and as an original-layout single file (through our converters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 64, 64, 192
TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=128,
                   pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=16)
VARIANTS = {"sd3-medium": {}, "sd3.5-large": {"qk_norm": "rms_norm"},
            "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}}
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16,
           norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
CLIP_L = dict(vocab_size=49408, hidden_size=CLIP_L_WIDTH, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=CLIP_L_WIDTH,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_G = dict(CLIP_L, num_hidden_layers=3, hidden_act="gelu", projection_dim=CLIP_G_WIDTH, pad_token_id=0)
T5 = dict(vocab_size=32128, d_model=T5_WIDTH, d_kv=64, num_heads=3, d_ff=96, num_layers=2,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, decoder_start_token_id=0)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """tiny_sd15.randomise, plus diffusers' learned position table (a buffer there)."""
    from tests.tiny_sd15 import randomise as randomise_parameters

    randomise_parameters(module, seed)
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("pos_embed"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))


def reference_models(variant: str = "sd3-medium", seed: int = 0) -> dict:
    """{"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}: diffusers/transformers modules."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    models = {
        "transformer": SD3Transformer2DModel(**TRANSFORMER, **VARIANTS[variant]),
        "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        "text_encoder_3": T5EncoderModel(T5Config(**T5)),
    }
    for i, m in enumerate(models.values()):
        randomise(m, seed + i)
        m.eval()
    return models


def write_diffusers_folder(folder: Path, models: dict) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer, load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name, module in models.items():
        module.save_pretrained(folder / name)
    load_clip_tokenizer().save_pretrained(folder / "tokenizer")
    load_clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")
    load_tokenizer("t5").save_pretrained(folder / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def original_layout_state_dict(models: dict, text_encoders: bool = True, t5: bool = True) -> dict[str, torch.Tensor]:
    """The single-file layout of Stability's releases (sd3_medium_incl_clips_t5xxlfp16.safetensors),
    produced by our diffusers -> original converters. ``text_encoders=False`` is sd3_medium.safetensors
    (MMDiT and VAE only); ``t5=False`` is sd3_medium_incl_clips.safetensors."""
    from diffstudio.convert.clip import canonical_clip_keys
    from diffstudio.convert.mmdit import mmdit_from_diffusers
    from diffstudio.convert.t5 import canonical_t5_keys
    from diffstudio.convert.vae import vae_from_diffusers

    sd = {}
    dit = mmdit_from_diffusers(models["transformer"].state_dict())
    sd.update({"model.diffusion_model." + k: v for k, v in dit.items()})
    sd.update({"first_stage_model." + k: v for k, v in vae_from_diffusers(models["vae"].state_dict()).items()})
    if text_encoders:
        for role, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            clip = canonical_clip_keys(models[role].state_dict())
            sd.update({f"text_encoders.{name}.transformer." + k: v for k, v in clip.items()})
        if t5:
            t5_sd = canonical_t5_keys(models["text_encoder_3"].state_dict())
            sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_sd.items()})
    return sd


def write_single_file(path: Path, models: dict, text_encoders: bool = True, t5: bool = True) -> Path:
    from safetensors.torch import save_file

    sd = original_layout_state_dict(models, text_encoders, t5)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
