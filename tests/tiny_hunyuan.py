"""A tiny Hunyuan-DiT built with the reference libraries (diffusers, transformers).

Random weights at small widths, but the released conventions where the tokenizers and detection
need them: 77 BERT tokens and 256 mT5 tokens, the real vocabularies (47,020 WordPiece entries,
250,112 SentencePiece ids), BERT heads of width 64, an 8-head attention pool, 2x2 patches, an
8x VAE. Written as a diffusers HunyuanDiTPipeline folder and in the release's own layout
(t2i/model/pytorch_model_ema.pt, t2i/clip_text_encoder/, t2i/mt5/, t2i/sdxl-vae-fp16-fix/, t2i/tokenizer/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_sd15 import randomise  # noqa: F401  (re-exported for the tests)

BERT_WIDTH, T5_WIDTH = 64, 32


def dit_kwargs(style: bool = False) -> dict:
    return dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, hidden_size=16,
                num_layers=4, mlp_ratio=2.5, learn_sigma=True, cross_attention_dim=BERT_WIDTH,
                cross_attention_dim_t5=T5_WIDTH, pooled_projection_dim=16, text_len=77, text_len_t5=256,
                sample_size=8, use_style_cond_and_image_meta_size=style)


VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
           latent_channels=4, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025)
BERT = dict(vocab_size=47020, hidden_size=BERT_WIDTH, num_hidden_layers=2, num_attention_heads=1,
            intermediate_size=37, max_position_embeddings=80, type_vocab_size=2)
MT5 = dict(vocab_size=250112, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
           relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
           use_cache=False, tie_word_embeddings=False)




def reference_dit(style: bool = False, seed: int = 0):
    from diffusers import HunyuanDiT2DModel

    dit = HunyuanDiT2DModel(**dit_kwargs(style))
    randomise(dit, seed)
    return dit.eval()


def reference_models(style: bool = False, seed: int = 0):
    """(dit, vae, bert, mt5): diffusers HunyuanDiT2DModel, AutoencoderKL, transformers BertModel, T5EncoderModel."""
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    vae = AutoencoderKL(**VAE)
    bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
    t5 = T5EncoderModel(T5Config(**MT5))
    for i, m in enumerate((vae, bert, t5)):
        randomise(m, seed + 1 + i)
        m.eval()
    return reference_dit(style, seed), vae, bert, t5


def copy_tokenizer(kind: str, folder: Path) -> None:
    """The packaged tokenizer files (vocab.txt / spiece.model + configs), as the releases ship them."""
    import shutil

    from diffstudio.conditioning.tokenizers import PACKAGED

    folder.mkdir(parents=True, exist_ok=True)
    for file in (PACKAGED / kind).iterdir():
        shutil.copy(file, folder / file.name)


def save_bin(module, folder: Path, extra: dict | None = None) -> None:
    """A transformers model as config.json + pytorch_model.bin (the release's format)."""
    module.config.save_pretrained(folder)
    torch.save({**module.state_dict(), **(extra or {})}, folder / "pytorch_model.bin")


def write_diffusers_folder(folder: Path, dit, vae, bert, t5) -> Path:
    from diffusers import DDPMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    dit.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    bert.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    copy_tokenizer("bert_zh", folder / "tokenizer")
    copy_tokenizer("mt5", folder / "tokenizer_2")
    DDPMScheduler(beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
    index = {"_class_name": "HunyuanDiTPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "HunyuanDiT2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_released_folder(root: Path, dit, vae, bert, t5) -> Path:
    """The layout of Tencent-Hunyuan/HunyuanDiT(-v1.x): the DiT as a pickled state dict in the release's
    names, the text encoders as pytorch_model.bin folders, the fp16-fix SDXL VAE as a diffusers folder."""
    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers

    t2i = root / "t2i"
    (t2i / "model").mkdir(parents=True, exist_ok=True)
    torch.save(hunyuan_dit_from_diffusers(dit.state_dict()), t2i / "model" / "pytorch_model_ema.pt")
    # Older transformers saved BERT's position_ids buffer: the loader must drop it.
    save_bin(bert, t2i / "clip_text_encoder", {"embeddings.position_ids": torch.arange(80)[None]})
    save_bin(t5, t2i / "mt5")
    vae.save_pretrained(t2i / "sdxl-vae-fp16-fix")
    copy_tokenizer("bert_zh", t2i / "tokenizer")
    copy_tokenizer("mt5", t2i / "mt5")
    return root
