"""A tiny CogVideoX built with the reference libraries (diffusers, transformers): random weights, the release's
conventions at small widths. 2B-style (sinusoidal positions), 5B-style (3D RoPE) and the image-to-video
(5B-I2V: 32 input channels, a learned position table; 1.5-I2V: temporal patches, "ofs") transformers, a T5-style
encoder, diffusers' causal 3D VAE at a tiny width (for the pipeline's decode), written as a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_sd15 import randomise

# Widths: 2 heads x 16 (the sinusoids need a width divisible by 16, the RoPE a head divisible by 8).
DIT = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=24,
           in_channels=16, out_channels=16, sample_width=8, sample_height=6, sample_frames=9,
           max_text_seq_length=226)
STYLES = {"2b": dict(), "5b": dict(use_rotary_positional_embeddings=True),
          "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=32),
          "1.5-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, ofs_embed_dim=24,
                          in_channels=32)}
T5 = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
           norm_num_groups=4, temporal_compression_ratio=4)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
SNR_SHIFT = {"2b": 3.0, "5b": 1.0, "5b-i2v": 1.0, "1.5-i2v": 1.0}
SCALING = {"2b": 1.15258426, "5b": 0.7, "5b-i2v": 0.7, "1.5-i2v": 0.7}
INVERT_SCALE = {"1.5-i2v": True}  # the 1.5 release's VAE config: image latents / scaling factor


def reference_models(style: str = "5b", seed: int = 0):
    """(transformer, t5, vae): diffusers / transformers modules with random weights, eval mode."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    dit = CogVideoXTransformer3DModel(**{**DIT, **STYLES[style]})
    t5 = T5EncoderModel(T5Config(**T5))
    vae = AutoencoderKLCogVideoX(**VAE, scaling_factor=SCALING[style],
                                 invert_scale_latents=INVERT_SCALE.get(style, False))
    for i, m in enumerate((dit, t5, vae)):
        randomise(m, seed + i)
        m.eval()
    if dit.config.use_learned_positional_embeddings:  # a table in the file (a buffer: randomise skips it)
        dit.patch_embed.pos_embedding.normal_(generator=torch.Generator().manual_seed(seed))
    return dit, t5, vae


def reference_scheduler(style: str):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**SCHEDULER, snr_shift_scale=SNR_SHIFT[style])


def write_diffusers_folder(folder: Path, dit, t5, style: str) -> Path:
    """transformer/, text_encoder/, tokenizer/, scheduler/ and model_index.json (no vae/: the pipeline tests plug
    diffusers' VAE in themselves)."""
    from diffstudio.conditioning.tokenizers import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    dit.save_pretrained(folder / "transformer")
    t5.save_pretrained(folder / "text_encoder")
    load_tokenizer("t5").save_pretrained(folder / "tokenizer")
    reference_scheduler(style).save_pretrained(folder / "scheduler")
    index = {"_class_name": "CogVideoXPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "CogVideoXDDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
