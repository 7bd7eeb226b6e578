"""Hunyuan-DiT v1.0 - v1.2 (Li et al. 2024, arXiv:2405.08748): a diffusion transformer
(diffstudio.models.hunyuan_dit) over SDXL's 4-channel latents, conditioned on two text encoders at
once, a bilingual CLIP text tower (a BERT, 77 tokens) and mT5-XL (256 tokens), both with attention
masks, so Chinese and English prompts work alike.

Releases, told apart by structure (``variant_of``):

* **v1.2** (and its distilled checkpoint ``pytorch_model_distill.pt``, same structure, meant for ~25
  steps): the global condition is timestep + pooled mT5 text; trained on the scaled-linear schedule
  0.00085 -> 0.018 (HunyuanDiT's v1.2 training scripts; HunyuanDiT-v1.2-Diffusers' scheduler).
* **v1.0 / v1.1**: the global condition also embeds the image size (original h, w = 1024, 1024;
  target w, h; crop top, left = 0, 0, in the release's order) and a style id (0); schedule
  0.00085 -> 0.03 (HunyuanDiT-v1.1-Diffusers' scheduler_config.json).

v-prediction (the released ``--predict-type v_prediction``); the network also predicts a variance
(learn_sigma, 8 channels) which ``call_denoiser`` drops. The 2D RoPE is computed by the model for
the latent's size. Defaults follow the release: 1024x1024, CFG 6, 50 steps (diffusers' default; the
release samples 100 DDPM steps).

Loading: diffusers folders (HunyuanDiTPipeline: transformer/, text_encoder/ = BertModel,
text_encoder_2/ = T5EncoderModel, vae/, tokenizer/, tokenizer_2/), and the release's own folder
(``t2i/model/pytorch_model_ema.pt`` etc., the roles' ``released`` paths), and all-in-one single files
with ComfyUI's component prefixes. A bare ``pytorch_model_*.pt`` is detected as the DiT alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffstudio.families.base import Defaults, DiscreteSchedule, Family, LatentFormat, Role, TextEncoderSpec

V12_SCHEDULE = DiscreteSchedule(beta_start=0.00085, beta_end=0.018, num_steps=1000, kind="scaled_linear")
V11_SCHEDULE = DiscreteSchedule(beta_start=0.00085, beta_end=0.03, num_steps=1000, kind="scaled_linear")
ORIGINAL_SIZE = (1024, 1024)  # the size condition's "original image size" at inference (the release's default)


def check_dit(config) -> str | None:
    if config.in_channels != 4:
        return f"the Hunyuan-DiT takes {config.in_channels} latent channels; the releases take 4 (SDXL's VAE)"
    return None


def variant_of(config) -> str:
    from diffstudio.detect.hunyuan_dit import variant

    return variant(config)


def conditioning(models, prompts: list[str], *, width: int | None = None, height: int | None = None, **_) -> dict:
    """BERT states (B, 77, 1024) + mask, mT5 states (B, 256, 2048) + mask, and for v1.0/v1.1 the size
    condition (B, 6) and style (B,). clip_skip does not apply: both encoders give their last layer."""
    from diffstudio.conditioning.bert_encode import encode_bert
    from diffstudio.conditioning.prompt_input import parse_prompts
    from diffstudio.conditioning.t5_encode import encode_t5

    config = models.configs[models.family.denoiser_role]
    parsed = parse_prompts(prompts)  # once, for both encoders
    bert, bert_mask = encode_bert(models.text_encoder, models.tokenizer, parsed, max_length=config.text_len,
                                  embeddings=models.embeddings)
    t5, t5_mask = encode_t5(models.text_encoder_2, models.tokenizer_2, parsed, max_length=config.text_len_t5,
                            use_attention_mask=True, embeddings=models.embeddings, name="mT5")
    cond = {"encoder_hidden_states": bert, "text_embedding_mask": bert_mask,
            "encoder_hidden_states_t5": t5, "text_embedding_mask_t5": t5_mask}
    if config.size_style_cond:
        size = [*ORIGINAL_SIZE, width or 1024, height or 1024, 0, 0]
        cond["image_meta_size"] = torch.tensor([size] * len(prompts), dtype=torch.float32)
        cond["style"] = torch.zeros(len(prompts), dtype=torch.long)
    return cond


def call_dit(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The release's forward; with learn_sigma the first half of the channels is the prediction.

    The DiT cuts 2x2 patches, so an odd latent side (an image side that is a multiple of 8 but not of
    16; the release aligns sizes to 16) is padded by one replicated row/column and cropped after."""
    height, width = x.shape[-2:]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return net(x, t, **cond)[:, : x.shape[1], :height, :width]


HUNYUAN_DIT = Family(
    name="hunyuan_dit",
    denoiser_role="dit",
    roles=(
        Role("dit", "hunyuan_dit", ("model.diffusion_model.",), "transformer",
             released=("t2i/model/pytorch_model_ema.pt", "t2i/model/pytorch_model_distill.pt",
                       "t2i/model/pytorch_model_module.pt")),
        Role("vae", "ldm_vae", ("first_stage_model.", "vae."), "vae", released=("t2i/sdxl-vae-fp16-fix",)),
        # ComfyUI's all-in-one files name the two encoders hydit_clip and mt5xl.
        Role("text_encoder", "bert", ("text_encoders.hydit_clip.transformer.",), "text_encoder",
             released=("t2i/clip_text_encoder",)),
        Role("text_encoder_2", "t5_encoder", ("text_encoders.mt5xl.transformer.",), "text_encoder_2",
             released=("t2i/mt5",)),
    ),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "bert_zh", max_length=77),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "mt5", max_length=256)),
    latent=LatentFormat(channels=4, scale=0.13025),
    prediction="v",
    schedule=V12_SCHEDULE,
    defaults=Defaults(width=1024, height=1024, steps=50, cfg_scale=6.0, sampler="euler", scheduler="normal"),
    check_denoiser=check_dit,
    make_conditioning=conditioning,
    diffusers_pipelines=("HunyuanDiTPipeline", "HunyuanDiTPAGPipeline"),
    call_denoiser=call_dit,
    # LoRA targets in the release's names (which the kohya export keeps): self-attention (fused Wqkv, out_proj),
    # cross-attention (q_proj, fused kv_proj, out_proj) and MLP of every block; the modulation and the long-skip
    # linears are left out.
    lora_targets=r"blocks\.\d+\.(attn1\.(Wqkv|out_proj)|attn2\.(q_proj|kv_proj|out_proj)|mlp\.fc[12])",
    variant_of=variant_of,
    variants={"v1.0/v1.1": {"schedule": V11_SCHEDULE}},
    # Tencent's HunyuanDiT-v1.1 / v1.2 ControlNets (models/hunyuan_dit_controlnet.py, docs/controlnet.md).
    controlnet_loader="diffstudio.hunyuan_controlnet_loading:add_hunyuan_controlnet",
)
