"""Hunyuan-DiT: parity with diffusers / transformers, tokenizers, detection, loading, generation."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_hunyuan as th
import torch

from diffstudio.errors import ConversionError, InvalidInputError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tokenizers():
    """The packaged tokenizers the family record names (bert_zh, mt5)."""
    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.families import get_family

    return tuple(load_tokenizer(spec.tokenizer_data) for spec in get_family("hunyuan_dit").text_encoders)


def _inputs(batch: int = 2, h: int = 8, w: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bert_mask = torch.zeros(batch, 77, dtype=torch.long)
    t5_mask = torch.zeros(batch, 256, dtype=torch.long)
    for i in range(batch):
        bert_mask[i, : 5 + 20 * i] = 1
        t5_mask[i, : 3 + 40 * i] = 1
    return dict(x=torch.randn(batch, 4, h, w, generator=g), t=torch.tensor([10.0, 700.0][:batch]),
                bert=torch.randn(batch, 77, th.BERT_WIDTH, generator=g), bert_mask=bert_mask,
                t5=torch.randn(batch, 256, th.T5_WIDTH, generator=g), t5_mask=t5_mask,
                size=torch.tensor([[1024.0, 1024.0, 96.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long))


# -- the transformer -------------------------------------------------------------------------------

@pytest.mark.parametrize("style", [False, True], ids=["v1.2", "v1.1"])
def test_dit_matches_diffusers(style):
    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers, hunyuan_dit_to_diffusers
    from diffstudio.detect.hunyuan_dit import config_from_diffusers, derive_hunyuan_dit_config
    from diffstudio.models.hunyuan_dit import HunyuanDiT, rope_2d

    ref = th.reference_dit(style)
    sd = hunyuan_dit_from_diffusers(ref.state_dict())
    config = derive_hunyuan_dit_config(sd)
    assert config == config_from_diffusers(dict(ref.config))
    assert config.size_style_cond is style and config.learn_sigma and config.depth == 4
    ours = HunyuanDiT(config).eval()
    ours.load_state_dict(sd, strict=True)
    back = hunyuan_dit_to_diffusers(sd, config)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    a = _inputs()
    rope = rope_2d(config.head_dim, 4, 6)  # 8 x 12 latent, 2x2 patches
    extra = (a["size"], a["style"]) if style else (None, None)
    with torch.no_grad():
        expected = ref(a["x"], a["t"], encoder_hidden_states=a["bert"], text_embedding_mask=a["bert_mask"],
                       encoder_hidden_states_t5=a["t5"], text_embedding_mask_t5=a["t5_mask"],
                       image_meta_size=a["size"], style=a["style"], image_rotary_emb=rope, return_dict=False)[0]
        got = ours(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], *extra, *rope)
        # The RoPE tables are optional: the model computes the same for the input's size.
        assert torch.equal(ours(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], *extra), got)
    assert got.shape == (2, 8, 8, 12)
    assert _rel(got, expected) < 1e-4
    # The masks matter (padded text positions are replaced by learned vectors).
    with torch.no_grad():
        other = ours(a["x"], a["t"], a["bert"], torch.ones_like(a["bert_mask"]), a["t5"], a["t5_mask"], *extra)
    assert _rel(other, got) > 1e-3


def test_dit_refuses_the_wrong_size_conditioning():
    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
    from diffstudio.detect.hunyuan_dit import derive_hunyuan_dit_config
    from diffstudio.models.hunyuan_dit import HunyuanDiT

    sd = hunyuan_dit_from_diffusers(th.reference_dit(style=False).state_dict())
    model = HunyuanDiT(derive_hunyuan_dit_config(sd))
    a = _inputs()
    with pytest.raises(InvalidInputError, match="v1.2"):
        model(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], a["size"], a["style"])


def test_converter_check_names_missing_and_unknown_keys():
    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers, hunyuan_dit_to_diffusers
    from diffstudio.detect.hunyuan_dit import derive_hunyuan_dit_config

    sd = dict(th.reference_dit().state_dict())
    with pytest.raises(ConversionError, match="matched no rule"):
        hunyuan_dit_from_diffusers({**sd, "blocks.0.attn1.extra.weight": torch.zeros(1)})
    del sd["blocks.1.attn2.to_k.weight"]
    with pytest.raises(ConversionError, match="blocks.1.attn2.to_k.weight"):
        hunyuan_dit_from_diffusers(sd)
    ours = hunyuan_dit_from_diffusers(th.reference_dit().state_dict())
    config = derive_hunyuan_dit_config(ours)
    ours["blocks.3.skip_linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match="shape"):
        hunyuan_dit_to_diffusers(ours, config)


def _original_rope(head_dim, grid_h, grid_w, base=32):
    """The release's construction (hydit/modules/posemb_layers.py), written out with NumPy."""
    from diffstudio.models.hunyuan_dit import rope_crop_region

    (top, left), (bottom, right) = rope_crop_region(grid_h, grid_w, base)
    rows = np.linspace(top, bottom, grid_h, endpoint=False, dtype=np.float32)
    cols = np.linspace(left, right, grid_w, endpoint=False, dtype=np.float32)
    grid = np.stack(np.meshgrid(cols, rows), axis=0)  # grid[0]: column positions
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half)
    angles = [np.outer(grid[i].reshape(-1), freqs).repeat(2, axis=1) for i in (0, 1)]
    angles = torch.from_numpy(np.concatenate(angles, axis=1))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("grid", [(4, 4), (64, 64), (64, 48), (48, 64), (5, 7)])
def test_rope_follows_the_release(grid):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    from diffstudio.models.hunyuan_dit import rope_2d, rope_crop_region

    cos, sin = rope_2d(88, *grid)
    ref_cos, ref_sin = _original_rope(88, *grid)
    assert cos.shape == (grid[0] * grid[1], 88)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)
    if grid[0] == grid[1]:  # diffusers agrees on square grids (its linspace end differs when a crop offset exists)
        d_cos, d_sin = get_2d_rotary_pos_embed(88, rope_crop_region(*grid, 32), grid)
        assert torch.allclose(cos, d_cos, atol=1e-5) and torch.allclose(sin, d_sin, atol=1e-5)


# -- text encoders -------------------------------------------------------------------------------------

def test_bert_arch_matches_transformers():
    from transformers import BertConfig, BertModel

    from diffstudio.components import ARCHS

    ref = BertModel(BertConfig(**th.BERT)).eval()
    th.randomise(ref, 3)
    # A masked-LM style file: a "bert." level, the pooler, old LayerNorm gamma/beta names, position_ids.
    released = {}
    for k, v in ref.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        released["bert." + k] = v
    released["bert.embeddings.position_ids"] = torch.arange(80)[None]
    arch = ARCHS["bert"]
    assert arch.is_diffusers(released) and not arch.is_canonical(released)
    canonical = arch.to_canonical(released)
    assert not any(k.startswith("pooler.") or k.endswith("position_ids") for k in canonical)
    config = arch.derive_config(canonical, {})
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 1, 2)
    model = arch.build(config)
    model.load_state_dict(canonical, strict=True)
    model.eval()
    ids = torch.randint(0, 47020, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("prompt", ["A red cube on a blue floor!", "一只可爱的小猫，坐在窗台上，水彩画", ""])
def test_tokenizers_wiring(prompt):
    """The packaged files through our wiring = the independent implementations on the same files: the
    pure-Python WordPiece tokenizer (transformers' legacy BertTokenizer) and the sentencepiece library."""
    import sentencepiece
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from diffstudio.conditioning.bert_encode import tokenize_bert
    from diffstudio.conditioning.t5_encode import tokenize_t5
    from diffstudio.conditioning.tokenizers import PACKAGED

    bert_tok, t5_tok = _tokenizers()
    ids, mask = tokenize_bert(bert_tok, [prompt], 77)
    ref = BertTokenizerLegacy(vocab_file=str(PACKAGED / "bert_zh" / "vocab.txt"))(prompt)["input_ids"]
    n = len(ref)
    assert ids.shape == mask.shape == (1, 77)
    assert ids[0, :n].tolist() == ref and ref[0] == 101 and ref[-1] == 102  # [CLS] ... [SEP]
    assert mask[0].tolist() == [1] * n + [0] * (77 - n) and (ids[0, n:] == 0).all()  # [PAD] = 0
    assert 100 not in ref  # no [UNK]: the Chinese characters and English words are in the vocabulary

    ids, mask = tokenize_t5(t5_tok, [prompt], 256)
    ref = sentencepiece.SentencePieceProcessor(model_file=str(PACKAGED / "mt5" / "spiece.model")).encode(prompt) + [1]
    n = len(ref)
    assert ids.shape == mask.shape == (1, 256)
    assert ids[0, :n].tolist() == ref and ref[-1] == 1  # </s>
    assert mask[0].tolist() == [1] * n + [0] * (256 - n) and (ids[0, n:] == 0).all()  # <pad> = 0
    assert 2 not in ref  # no <unk>
    if prompt.startswith("一"):
        assert 10 < len(ref) < 30  # SentencePiece pieces, not bytes


def test_long_prompts_are_truncated():
    from diffstudio.conditioning.bert_encode import tokenize_bert

    bert_tok, _ = _tokenizers()
    ids, mask = tokenize_bert(bert_tok, ["猫" * 200], 77)
    assert ids.shape == (1, 77) and mask.all() and ids[0, -1] == 102


# -- folders, detection, generation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    refs = th.reference_models(style=False)
    th.write_diffusers_folder(root / "diffusers", *refs)
    th.write_released_folder(root / "released", *refs)
    return root, refs


@pytest.mark.parametrize("layout", ["diffusers", "released", "released/t2i"])
def test_load_both_layouts(folders, layout):
    import diffstudio

    root, _ = folders
    models = diffstudio.load(root / layout)
    assert models.family.name == "hunyuan_dit" and models.detection.variant == "v1.2"
    assert models.family.schedule.beta_end == 0.018 and models.family.prediction == "v"
    assert set(models.components) >= {"dit", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    config = models.configs["dit"]
    assert (config.depth, config.num_heads, config.text_len, config.text_len_t5) == (4, 2, 77, 256)
    assert type(models.text_encoder).__name__ == "BertModel"
    assert type(models.text_encoder_2).__name__ == "T5EncoderModel"
    assert type(models.tokenizer).__name__.startswith("BertTokenizer")


def test_bare_release_checkpoint(folders):
    """t2i/model/pytorch_model_ema.pt alone (unpickled weights-only): the DiT, in the release's names."""
    import diffstudio
    from diffstudio.detect import detect
    from diffstudio.errors import ModelNotFoundError
    from diffstudio.io.state_dict import read_state_dict

    root, _ = folders
    path = root / "released" / "t2i" / "model" / "pytorch_model_ema.pt"
    found = detect(read_state_dict(path))
    assert found.family == "hunyuan_dit" and set(found.components) == {"dit"}
    assert found.components["dit"].layout == "original" and found.variant == "v1.2"
    with pytest.raises(ModelNotFoundError, match="text_encoder"):
        diffstudio.load(path)


def test_generate_same_image_from_both_layouts(folders):
    import diffstudio

    root, _ = folders
    images = {}
    for layout in ("diffusers", "released"):
        pipe = diffstudio.Pipeline(diffstudio.load(root / layout))
        images[layout] = pipe(["a red cube", "一只红色的立方体"], width=64, height=64, steps=2, seed=3,
                              progress=False)
    for a, b in zip(images["diffusers"], images["released"]):
        assert a.size == (64, 64)
        # Same weights, same conditioning; CPU kernels round differently with the buffers' alignment (mmap'd
        # safetensors vs unpickled tensors: ~4e-7 in the DiT's output), so allow a stray 1-level pixel.
        diff = np.abs(np.asarray(a).astype(int) - np.asarray(b))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # The two prompts condition differently.
    assert not np.array_equal(np.asarray(images["diffusers"][0]), np.asarray(images["diffusers"][1]))
    assert images["diffusers"][0].info["diffstudio_recipe"]["family"] == "hunyuan_dit"


def test_img2img_and_inpaint(folders):
    from PIL import Image

    import diffstudio

    root, _ = folders
    pipe = diffstudio.Pipeline(diffstudio.load(root / "released"))
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    (out,) = pipe("a red square", init_image=init, strength=0.5, steps=2, seed=0, progress=False)
    assert out.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    (painted,) = pipe("一个蓝色的圆", init_image=init, mask=mask, strength=1.0, steps=2, seed=0, progress=False)
    arr = np.asarray(painted).astype(int)
    assert (np.abs(arr[:8, :8] - np.asarray(init)[:8, :8]) <= 1).all()  # outside the mask: the input


def test_save_single_file_round_trip(folders, tmp_path):
    import diffstudio
    from diffstudio.save import save_single_file

    root, _ = folders
    models = diffstudio.load(root / "released")
    path = save_single_file(models, tmp_path / "hunyuan.safetensors")
    again = diffstudio.load(path)
    assert again.detection.variant == "v1.2" and again.configs["dit"] == models.configs["dit"]
    assert again.detection.components["text_encoder"].prefix == "text_encoders.hydit_clip.transformer."
    a, b = (diffstudio.Pipeline(m)("一只猫", width=64, height=64, steps=2, progress=False)[0] for m in (models, again))
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 1


def test_sizes_that_are_not_multiples_of_16(folders):
    import diffstudio

    root, _ = folders
    (image,) = diffstudio.Pipeline(diffstudio.load(root / "diffusers"))("a cat", width=72, height=40, steps=1,
                                                                          progress=False)
    assert image.size == (72, 40)  # latent 9 x 5: padded to 10 x 6 for the 2x2 patches, cropped back


def test_v11_variant_uses_size_style_and_its_schedule(tmp_path):
    import diffstudio

    th.write_diffusers_folder(tmp_path / "v11", *th.reference_models(style=True))
    models = diffstudio.load(tmp_path / "v11")
    assert models.detection.variant == "v1.0/v1.1" and models.family.schedule.beta_end == 0.03
    cond = models.family.make_conditioning(models, ["x", "y"], clip_skip=1, width=96, height=64)
    assert cond["image_meta_size"].tolist()[0] == [1024, 1024, 96, 64, 0, 0]  # the release's (w, h) order
    assert cond["style"].tolist() == [0, 0]
    (image,) = diffstudio.Pipeline(models)("a cat", width=64, height=64, steps=2, progress=False)
    assert image.size == (64, 64)


def test_matches_diffusers_pipeline(folders):
    """Two DDIM steps (eta 0, the final alpha 1) of diffusers' HunyuanDiTPipeline = two Euler steps of ours
    over the same timesteps, from the same start (diffusers' x_T is our x / sqrt(1 + sigma^2))."""
    from diffusers import DDIMScheduler, HunyuanDiTPipeline

    import diffstudio
    from diffstudio.pipeline.denoiser import make_denoiser
    from diffstudio.pipeline.guidance import CFGDenoiser
    from diffstudio.sampling import sample_euler

    root, (dit, vae, bert, t5) = folders
    bert_tok, t5_tok = _tokenizers()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", set_alpha_to_one=True, steps_offset=1,
                              clip_sample=False)
    ref_pipe = HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=bert_tok, transformer=dit, scheduler=scheduler,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                  text_encoder_2=t5, tokenizer_2=t5_tok)
    ref_pipe.set_progress_bar_config(disable=True)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = "一只猫 a cat"
    expected = ref_pipe(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=6.0, latents=start.clone(),
                        output_type="latent", use_resolution_binning=False).images

    models = diffstudio.load(root / "diffusers")
    pipe = diffstudio.Pipeline(models)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompts([prompt], [""], 1, width=64, height=64)
        denoiser = make_denoiser(models, (8, 8))
        scheduler.set_timesteps(2)
        sigmas = torch.cat([denoiser.t_to_sigma(scheduler.timesteps.double()), torch.zeros(1, dtype=torch.float64)])
        x = start * (1 + sigmas[0] ** 2).sqrt().float()
        got = sample_euler(CFGDenoiser(denoiser, cond, uncond, 6.0), x, sigmas.float())
    assert scheduler.timesteps.tolist() == [501, 1]
    assert _rel(got, expected) < 1e-4


# -- full size, on the meta device ----------------------------------------------------------------------

V12_TRANSFORMER = {"activation_fn": "gelu-approximate", "attention_head_dim": 88, "cross_attention_dim": 1024,
                   "cross_attention_dim_t5": 2048, "hidden_size": 1408, "in_channels": 4, "learn_sigma": True,
                   "mlp_ratio": 4.3637, "norm_type": "layer_norm", "num_attention_heads": 16, "num_layers": 40,
                   "patch_size": 2, "pooled_projection_dim": 1024, "sample_size": 128, "text_len": 77,
                   "text_len_t5": 256, "use_style_cond_and_image_meta_size": False}


@pytest.mark.parametrize("style", [False, True], ids=["v1.2", "v1.1"])
def test_full_size_release_layout_on_meta(style):
    from diffusers import HunyuanDiT2DModel

    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
    from diffstudio.detect import detect
    from diffstudio.detect.hunyuan_dit import config_from_diffusers
    from diffstudio.models.hunyuan_dit import HunyuanDiT

    config_json = {**V12_TRANSFORMER, "use_style_cond_and_image_meta_size": style}
    with torch.device("meta"):
        ref = HunyuanDiT2DModel(**config_json)
        released = hunyuan_dit_from_diffusers(ref.state_dict())
        ours = HunyuanDiT(config_from_diffusers(config_json))
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in released.items()} == expected
    assert expected["blocks.0.attn1.Wqkv.weight"] == (3 * 1408, 1408)
    assert expected["blocks.0.mlp.fc1.weight"] == (6144, 1408)
    assert expected["text_embedding_padding"] == (333, 1024)
    assert "blocks.20.skip_linear.weight" not in expected and "blocks.21.skip_linear.weight" in expected
    assert ("style_embedder.weight" in expected) is style
    assert 1.4e9 < sum(v.numel() for v in ours.parameters()) < 1.6e9  # "1.5B parameters"

    found = detect(released)
    assert found.family == "hunyuan_dit" and found.variant == ("v1.0/v1.1" if style else "v1.2")
    config = found.components["dit"].config
    assert (config.hidden_size, config.depth, config.num_heads, config.mlp_hidden) == (1408, 40, 16, 6144)
    assert (config.text_dim, config.text_dim_t5, config.text_len, config.text_len_t5) == (1024, 2048, 77, 256)
    assert config == config_from_diffusers(config_json)


def test_full_size_bert_on_meta():
    from transformers import BertConfig, BertModel

    from diffstudio.components import ARCHS

    real = dict(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):
        sd = BertModel(BertConfig(**real)).state_dict()
    config = ARCHS["bert"].derive_config(ARCHS["bert"].to_canonical(sd), {})
    assert {k: getattr(config, k) for k in real} == real


def test_single_file_with_component_prefixes(folders):
    """An all-in-one file (ComfyUI's prefixes): every component is found under its prefix."""
    from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
    from diffstudio.convert.vae import vae_from_diffusers
    from diffstudio.detect import detect

    _, (dit, vae, bert, t5) = folders
    sd = {"model.diffusion_model." + k: v for k, v in hunyuan_dit_from_diffusers(dit.state_dict()).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_from_diffusers(vae.state_dict()).items()})
    sd.update({"text_encoders.hydit_clip.transformer.bert." + k: v for k, v in bert.state_dict().items()})
    sd.update({"text_encoders.mt5xl.transformer." + k: v for k, v in t5.state_dict().items()})
    found = detect(sd)
    assert found.family == "hunyuan_dit"
    assert set(found.components) == {"dit", "vae", "text_encoder", "text_encoder_2"}
    assert found.components["text_encoder"].config.hidden_size == th.BERT_WIDTH
