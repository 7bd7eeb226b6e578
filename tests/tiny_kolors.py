"""A tiny Kolors built with the reference libraries (diffusers' UNet, VAE and Kolors ChatGLM).

Random weights (never zeros) at small widths but Kolors' structure: an SDXL-style UNet (no attention
at the first level, linear projections, 64-channel heads) with ``encoder_hid_proj`` (text_proj) and a
``y`` of text width + 6 size embeddings; ChatGLM with multi-query attention (4 query heads, 2 key/value
groups) over the real 65,024-entry vocabulary, so the packaged tokenizer's ids fit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.tiny_sd15 import VAE as SD_VAE
from tests.tiny_sd15 import randomise

TEXT_WIDTH = 64
SIZE_EMBED = 8  # addition_time_embed_dim (256 in the release)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(1, 2), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=32,
            encoder_hid_dim=TEXT_WIDTH, encoder_hid_dim_type="text_proj", addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBED, projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * SIZE_EMBED)
VAE = dict(SD_VAE, scaling_factor=0.13025, force_upcast=False)
CHATGLM = dict(num_layers=2, padded_vocab_size=65024, hidden_size=TEXT_WIDTH, ffn_hidden_size=48, kv_channels=16,
               num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
               add_bias_linear=False, original_rope=True, seq_length=512)
# Kolors' released scheduler_config.json (Kwai-Kolors/Kolors-diffusers).
SCHEDULER = dict(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", num_train_timesteps=1100,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
PACKAGED_TOKENIZER = Path(__file__).resolve().parent.parent / "diffstudio" / "data" / "tokenizers" / "chatglm"


def reference_chatglm(seed: int = 0, **overrides):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    model = ChatGLMModel(ChatGLMConfig(**{**CHATGLM, **overrides}), empty_init=False)
    randomise(model, seed)
    return model.eval()


def reference_tokenizer():
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    return ChatGLMTokenizer(str(PACKAGED_TOKENIZER / "tokenizer.model"))


def reference_models(seed: int = 0, in_channels: int = 4):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**{**UNET, "in_channels": in_channels})
    vae = AutoencoderKL(**VAE)
    for i, m in enumerate((unet, vae)):
        randomise(m, seed + i)
        m.eval()
    return unet, vae, reference_chatglm(seed + 2)


def write_diffusers_folder(folder: Path, unet, vae, text) -> Path:
    """A KolorsPipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import EulerDiscreteScheduler

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(PACKAGED_TOKENIZER / name, folder / "tokenizer" / name)
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "KolorsPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": False,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["kolors", "ChatGLMModel"], "tokenizer": ["kolors", "ChatGLMTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_released_text_encoder(folder: Path, text) -> Path:
    """The text encoder as Kwai-Kolors/Kolors ships it: `transformer.`-prefixed keys (LM head and rotary
    buffer included) in pickled .bin shards with a pytorch_model.bin.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {"transformer." + k: v.clone() for k, v in text.state_dict().items()}
    sd["transformer.rotary_pos_emb.inv_freq"] = text.rotary_pos_emb.inv_freq.clone()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, names in shards.items():
        torch.save({k: sd[k] for k in names}, folder / name)
        weight_map.update({k: name for k in names})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**text.config.to_dict(), "architectures": ["ChatGLMModel"]}))
    return folder
