"""A tiny FLUX.1 (dev or schnell) built with the reference libraries (diffusers, transformers).

Random weights, FLUX.1 conventions at small widths: 2x2-packed 16-channel latents (64 input
channels), 128-wide attention heads (so the RoPE split 16/56/56 applies and detection needs no
stored config), a 16-channel VAE without quant convs, CLIP-L-style and T5-style text encoders.
Written in every layout users have:

* ``write_diffusers_folder``: a diffusers FluxPipeline folder;
* ``write_bfl_files``: BFL's release layout, one file per component (the transformer with bare
  keys as in ``flux1-dev.safetensors``, the VAE as ``ae.safetensors``, ``clip_l``, ``t5xxl``);
* ``write_bundle``: ComfyUI's all-in-one checkpoint (``model.diffusion_model.``, ``vae.``,
  ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``), optionally with
  the transformer's Linear weights in float8 (``flux1-dev-fp8``-style).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_sd15 import randomise

HIDDEN = 128  # one 128-wide head
DIT = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
           num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=64, axes_dims_rope=(16, 56, 56))
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
           latent_channels=16, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, use_quant_conv=False,
           use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)
T5 = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
SCHEDULER = {"dev": dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                         use_dynamic_shifting=True, shift=3.0),
             "schnell": dict(use_dynamic_shifting=False, shift=1.0)}


def reference_models(variant: str = "dev", seed: int = 0):
    """(transformer, vae, clip, t5): diffusers / transformers modules with random weights, eval mode."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dit = FluxTransformer2DModel(**DIT, guidance_embeds=variant == "dev")
    vae = AutoencoderKL(**VAE)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP))
    t5 = T5EncoderModel(T5Config(**T5))
    for i, m in enumerate((dit, vae, clip, t5)):
        randomise(m, seed + i)
        m.eval()
    return dit, vae, clip, t5


def write_diffusers_folder(folder: Path, dit, vae, clip, t5, variant: str = "dev") -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffstudio.conditioning.tokenizers import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    dit.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    load_tokenizer("clip").save_pretrained(folder / "tokenizer")
    load_tokenizer("t5").save_pretrained(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant]).save_pretrained(folder / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def bfl_state_dicts(dit, vae, clip, t5) -> dict[str, dict[str, torch.Tensor]]:
    """Each component in its released single-file layout (our diffusers -> original converters)."""
    from diffstudio.convert.clip import canonical_clip_keys
    from diffstudio.convert.flux import flux_from_diffusers
    from diffstudio.convert.vae import vae_from_diffusers

    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    return {"dit": flux_from_diffusers(dit.state_dict()), "vae": vae_from_diffusers(vae.state_dict()),
            "text_encoder": canonical_clip_keys(clip.state_dict()), "text_encoder_2": t5_sd}


def to_float8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """flux1-dev-fp8 style: matrices in float8_e4m3fn, vectors (biases, norm scales) in bf16."""
    return {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16) for k, v in sd.items()}


def _save(sd: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_bfl_files(folder: Path, dit, vae, clip, t5) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sds = bfl_state_dicts(dit, vae, clip, t5)
    names = {"dit": "flux1.safetensors", "vae": "ae.safetensors", "text_encoder": "clip_l.safetensors",
             "text_encoder_2": "t5xxl.safetensors"}
    return {role: _save(sds[role], folder / name) for role, name in names.items()}


BUNDLE_PREFIXES = {"dit": "model.diffusion_model.", "vae": "vae.", "text_encoder": "text_encoders.clip_l.transformer.",
                   "text_encoder_2": "text_encoders.t5xxl.transformer."}


def write_bundle(path: Path, dit, vae, clip, t5, fp8: bool = False) -> Path:
    sds = bfl_state_dicts(dit, vae, clip, t5)
    if fp8:
        sds["dit"] = to_float8(sds["dit"])
    return _save({BUNDLE_PREFIXES[role] + k: v for role, sd in sds.items() for k, v in sd.items()}, path)
