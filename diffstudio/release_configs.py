"""The published configs of released checkpoints, in their own config.json form (diffusers and
transformers field names).

Facts, not code: the full-size checks build the reference libraries' modules and ours from them on the
meta device, and the benchmarks build them at real size. Each entry names the file it is taken from;
fields that equal the libraries' defaults may be left out.
"""

from __future__ import annotations

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1)
# runwayml/stable-diffusion-v1-5 vae/config.json (scaling_factor 0.18215, the default)
SD15_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
# openai/clip-vit-large-patch14 text_config (SD 1.x's text_encoder/config.json, SDXL's text_encoder)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32)
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json
SDXL_REFINER_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(384, 768, 1536, 1536),
                         layers_per_block=2,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                         use_linear_projection=True, cross_attention_dim=1280, addition_embed_type="text_time",
                         addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2560, norm_num_groups=32)
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (Kolors ships the same)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text_config (SDXL's text_encoder_2/config.json)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# Kwai-Kolors/Kolors-diffusers unet/config.json: SDXL's UNet with a ChatGLM text projection
KOLORS_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                   layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   use_linear_projection=True, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=5632)
# stabilityai/stable-video-diffusion-img2vid-xt unet/config.json (UNetSpatioTemporalConditionModel; SVD-XT 1.1
# is the same); stabilityai/stable-video-diffusion-img2vid differs only in num_frames
SVD_XT_UNET = dict(sample_size=96, in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
                   up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
                   layers_per_block=2, transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20),
                   cross_attention_dim=1024, addition_time_embed_dim=256, projection_class_embeddings_input_dim=768,
                   num_frames=25)
SVD_UNET = {**SVD_XT_UNET, "num_frames": 14}
# ChatGLM3-6B as Kolors ships it (Kwai-Kolors/Kolors text_encoder/config.json, THUDM/chatglm3-6b-base)
CHATGLM3_6B = dict(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
                   num_attention_heads=32, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                   add_bias_linear=False, original_rope=True, seq_length=32768, rmsnorm=True, post_layer_norm=True,
                   layernorm_epsilon=1e-5, apply_residual_connection_post_layernorm=False)

# THUDM/CogVideoX-2b vae/config.json (AutoencoderKLCogVideoX). CogVideoX-5b and -5b-I2V ship the same layout
# with scaling_factor 0.7; CogVideoX1.5-5B adds invert_scale_latents=True.
COGVIDEOX_2B_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 256, 512),
                        layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32,
                        temporal_compression_ratio=4, sample_height=480, sample_width=720,
                        scaling_factor=1.15258426, use_quant_conv=False, use_post_quant_conv=False,
                        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4)
COGVIDEOX_5B_VAE = {**COGVIDEOX_2B_VAE, "scaling_factor": 0.7}
