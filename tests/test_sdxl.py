"""SDXL base and refiner: parity with diffusers/transformers at tiny random configs, detection by
structure (tiny files and the released configs on the meta device), and the pipeline on the
layouts users have (original single file, diffusers folder, separate VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffstudio
from diffstudio.families import FAMILIES
from diffstudio.families.sdxl import BIGG_HINTS, UNET_HINTS, vector_condition
from tests import tiny_sdxl as tiny
from tests.meta_checks import assert_every_key_maps

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.fixture(scope="module")
def base():
    return tiny.reference_models()


@pytest.fixture(scope="module")
def refiner():
    return tiny.refiner_reference_models()


@pytest.fixture(scope="module")
def files(base, refiner, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"single": tiny.write_single_file(root / "sdxl.safetensors", base),
            "folder": tiny.write_diffusers_folder(root / "sdxl", base),
            "refiner_single": tiny.write_single_file(root / "refiner.safetensors", refiner),
            "refiner_folder": tiny.write_diffusers_folder(root / "refiner", refiner)}


@pytest.fixture(scope="module")
def models(files):
    return diffstudio.load(files["single"])


@pytest.fixture(scope="module")
def pipe(models):
    return diffstudio.Pipeline(models)


def our_unet(reference_unet):
    """diffusers UNet -> our converter -> our UNetModel, checking both config paths agree."""
    from diffstudio.convert.unet import unet_from_diffusers
    from diffstudio.detect.unet import config_from_diffusers, derive_unet_config
    from diffstudio.models.unet import UNetModel

    sd = unet_from_diffusers(reference_unet.state_dict())
    config = derive_unet_config(sd, UNET_HINTS)
    assert config == config_from_diffusers(dict(reference_unet.config))
    net = UNetModel(config)
    net.load_state_dict(sd, strict=True)
    return net.eval()


# --- parity with the reference libraries -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_unet_with_our_y_matches_diffusers_text_time_embedding(base, refiner, which):
    """Our converter + UNet + `y` against diffusers' added_cond_kwargs {text_embeds, time_ids}."""
    ref = (base if which == "base" else refiner).unet
    net = our_unet(ref)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, ref.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, tiny.POOLED, generator=g)
    if which == "base":  # original (h, w), crop (top, left), target (h, w): distinct per row
        time_ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 1024.0, 1024.0], [512.0, 640.0, 0.0, 0.0, 448.0, 576.0]])
    else:  # original (h, w), crop (top, left), aesthetic score
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 6.0], [512.0, 640.0, 8.0, 4.0, 2.5]])
    y = vector_condition(pooled, time_ids, net.config.adm_in_channels)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert rel_err(net(x, t, context, y=y), expected) < TOL
        # The vector matters: a different size gives a different output.
        other = vector_condition(pooled, time_ids + 64, net.config.adm_in_channels)
        assert rel_err(net(x, t, context, y=other), expected) > 1e-3


def test_size_embedding_is_diffusers_get_timestep_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    pooled = torch.randn(3, 5)
    values = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [832.0, 1216.0, 64.0, 0.0, 896.0, 1152.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y = vector_condition(pooled, values, 5 + 6 * 256)  # the released width: 256 per value
    expected = get_timestep_embedding(values.reshape(-1), 256, flip_sin_to_cos=True,
                                      downscale_freq_shift=0).reshape(3, -1)
    assert y.shape == (3, 5 + 6 * 256)
    assert torch.equal(y[:, :5], pooled)
    assert torch.allclose(y[:, 5:], expected, atol=1e-6)
    # One row of values broadcasts over the batch.
    broadcast = vector_condition(pooled, values[0], 5 + 6 * 256)
    assert torch.equal(broadcast[:, :5], pooled) and torch.equal(broadcast[:, 5:], y[:1, 5:].expand(3, -1))


def test_mismatched_pooled_width_is_a_named_error():
    with pytest.raises(diffstudio.UnknownModelError, match="text_encoder_2"):
        vector_condition(torch.zeros(1, 30), [1.0] * 6, 80)


@pytest.mark.parametrize("layout", ["hf", "openclip"])
def test_clip_g_with_projection_matches_transformers(base, layout):
    from transformers import CLIPTextModelWithProjection

    from diffstudio.components import ARCHS
    from diffstudio.conditioning.clip_encode import encode_clip
    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.convert.clip import to_installed_transformers_layout

    ref = base.text_encoder_2
    sd = ref.state_dict() if layout == "hf" else tiny.openclip_state_dict(ref)
    arch = ARCHS["clip_text"]
    canonical = arch.to_canonical(sd)
    config = arch.derive_config(canonical, BIGG_HINTS)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.projection_dim,
            config.hidden_act) == (3, 128, 2, tiny.POOLED, "gelu")
    ours = arch.build(config)
    assert isinstance(ours, CLIPTextModelWithProjection)  # chosen from the weights' text_projection
    ours.load_state_dict(to_installed_transformers_layout(canonical, ours), strict=True)
    ours.eval()
    tokenizer = load_tokenizer("clip_g")
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        hidden, pooled = encode_clip(ours, tokenizer, ["a photo of a cat"], clip_skip=2, pooled=True,
                                     layer_norm_on_skip=False)
    assert rel_err(hidden, expected.hidden_states[-2]) < TOL
    assert rel_err(pooled, expected.text_embeds) < TOL


def test_clip_to_openclip_inverts_the_reader_and_matches_an_independent_writer(base):
    from diffstudio.convert.clip import canonical_clip_keys, clip_from_openclip, clip_to_openclip
    from tests.test_clip import to_openclip_by_hand

    canonical = canonical_clip_keys(base.text_encoder_2.state_dict())
    written = clip_to_openclip(canonical)
    by_hand = to_openclip_by_hand(base.text_encoder_2, "")
    by_hand.pop("logit_scale")
    assert set(written) == set(by_hand)
    assert all(torch.equal(written[k], by_hand[k]) for k in written)
    back = clip_from_openclip(written)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in back)


def _diffusers_pipeline(folder, refiner: bool = False):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_matches_diffusers_encode_prompt_and_time_ids(files, pipe):
    from diffusers.models.embeddings import get_timestep_embedding

    ref = _diffusers_pipeline(files["folder"])
    with torch.no_grad():
        context, neg_context, pooled, neg_pooled = ref.encode_prompt(
            "a red circle", negative_prompt="blue", do_classifier_free_guidance=True)
    time_ids = ref._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                     text_encoder_projection_dim=tiny.POOLED)  # (h, w): not square on purpose
    cond, uncond = pipe.encode_prompts(["a red circle"], ["blue"], clip_skip=2, width=96, height=64)
    assert cond["context"].shape == context.shape == (1, 77, 192)
    assert rel_err(cond["context"], context) < TOL and rel_err(uncond["context"], neg_context) < TOL
    assert rel_err(cond["y"][:, :tiny.POOLED], pooled) < TOL
    assert rel_err(uncond["y"][:, :tiny.POOLED], neg_pooled) < TOL
    sizes = get_timestep_embedding(time_ids.reshape(-1), tiny.TIME_DIM, flip_sin_to_cos=True,
                                   downscale_freq_shift=0).reshape(1, -1)
    assert cond["y"].shape == (1, tiny.POOLED + 6 * tiny.TIME_DIM)
    assert torch.allclose(cond["y"][:, tiny.POOLED:], sizes, atol=1e-6)
    assert torch.allclose(uncond["y"][:, tiny.POOLED:], sizes, atol=1e-6)


def test_txt2img_matches_diffusers_sdxl_pipeline(files, pipe):
    from diffusers import EulerDiscreteScheduler

    from diffstudio.sampling.noise import SeededNoise

    ref = _diffusers_pipeline(files["folder"])
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="linspace")
    steps, cfg = 4, 5.0
    ref.scheduler.set_timesteps(steps)
    sigmas = ref.scheduler.sigmas.tolist()
    noise = SeededNoise([3], (4, 8, 12), dtype=torch.float32, device="cpu").initial()
    start = noise * sigmas[0] / float(ref.scheduler.init_noise_sigma)
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=steps, guidance_scale=cfg,
                   height=64, width=96, latents=start, output_type="np").images[0]
    ours = pipe("a red circle", "blue", width=96, height=64, cfg_scale=cfg, seed=3, sigmas=sigmas, progress=False)[0]
    assert np.abs(arr(ours) / 255.0 - expected).max() < 1e-3 + 1 / 255


def test_refiner_conditioning_matches_diffusers_img2img_pipeline(files, refiner):
    ref = _diffusers_pipeline(files["refiner_folder"], refiner=True)
    models = diffstudio.load(files["refiner_single"])
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt("a red circle", do_classifier_free_guidance=False)
        time_ids, _ = ref._get_add_time_ids((64, 96), (0, 0), (64, 96), 6.0, 2.5, (64, 96), (0, 0), (64, 96),
                                            dtype=torch.float32, text_encoder_projection_dim=tiny.POOLED)
        cond = models.family.make_conditioning(models, ["a red circle"], clip_skip=2, width=96, height=64)
        assert rel_err(cond["context"], context) < TOL
        x, t = torch.randn(1, 4, 8, 12), torch.tensor([500.0])
        expected = refiner.unet(x, t, encoder_hidden_states=context,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert rel_err(models.unet(x, t, **cond), expected) < TOL


# --- detection ----------------------------------------------------------------------------------------------


def test_single_files_are_detected_by_structure(base, refiner):
    det = diffstudio.detect(tiny.original_layout_state_dict(base))
    assert det.family == "sdxl" and det.variant is None
    assert set(det.components) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert det.components["text_encoder_2"].prefix == tiny.BIGG_PREFIX
    g = det.components["text_encoder_2"].config
    assert g.hidden_act == "gelu" and g.projection_dim == tiny.POOLED
    assert det.components["text_encoder"].config.hidden_act == "quick_gelu"
    assert det.components["unet"].config.adm_in_channels == tiny.POOLED + 6 * tiny.TIME_DIM
    det = diffstudio.detect(tiny.original_layout_state_dict(refiner))
    assert det.family == "sdxl_refiner" and set(det.components) == {"unet", "vae", "text_encoder_2"}
    assert det.components["text_encoder_2"].prefix == tiny.REFINER_BIGG_PREFIX


def test_each_record_accepts_only_its_own_unet(base, refiner):
    from diffstudio.detect import _try_family
    from tests.tiny_sd15 import original_layout_state_dict as sd15_layout
    from tests.tiny_sd15 import reference_models as sd15_models

    fixtures = {"sdxl": tiny.original_layout_state_dict(base),
                "sdxl_refiner": tiny.original_layout_state_dict(refiner),
                "sd15": sd15_layout(*sd15_models())}
    for expected, sd in fixtures.items():
        accepted = [f.name for f in FAMILIES if _try_family(f, sd, {})[0] is not None]
        assert accepted == [expected]
        bare = {k[len(tiny.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(tiny.UNET_PREFIX)}
        det = diffstudio.detect(bare)  # a UNet alone: the structure still decides
        assert det.family == expected and set(det.components) == {"unet"}


def test_nine_channel_sdxl_unet_is_the_inpainting_variant_and_inpaints(tmp_path):
    path = tiny.write_single_file(tmp_path / "inpaint.safetensors", tiny.reference_models(in_channels=9))
    det = diffstudio.detect(diffstudio.io.state_dict.read_state_dict(path))
    assert det.family == "sdxl" and det.variant == "inpaint"
    pipe = diffstudio.Pipeline(diffstudio.load(path))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = pipe("x", init_image=init, mask=mask, steps=2, seed=0, progress=False)[0]
    assert np.array_equal(arr(out)[:, 32:], arr(init)[:, 32:])


def test_kolors_like_and_unclip_like_unets_are_not_sdxl(base):
    """encoder_hid_proj (Kolors) and attention at full resolution (SD 2.x unCLIP) are other families."""
    from diffusers import UNet2DConditionModel

    from diffstudio.convert.unet import unet_from_diffusers

    sd = {tiny.UNET_PREFIX + k: v for k, v in unet_from_diffusers(base.unet.state_dict()).items()}
    sd[tiny.UNET_PREFIX + "encoder_hid_proj.weight"] = torch.zeros(192, 40)
    sd[tiny.UNET_PREFIX + "encoder_hid_proj.bias"] = torch.zeros(192)
    with pytest.raises(diffstudio.UnknownModelError, match="Kolors"):
        diffstudio.detect(sd)
    with torch.device("meta"):
        unclip = UNet2DConditionModel(**{**tiny.UNET_BASE, "down_block_types": ("CrossAttnDownBlock2D",) * 3,
                                         "up_block_types": ("CrossAttnUpBlock2D",) * 3})
    with pytest.raises(diffstudio.UnknownModelError, match="full latent resolution"):
        diffstudio.detect(unet_from_diffusers(unclip.state_dict()))


# --- full size on the meta device ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_released_sdxl_layouts_on_meta_map_every_key(which):
    from diffstudio.detect.unet import config_from_diffusers

    reference = tiny.meta_reference_models(refiner=which == "refiner")
    sd = tiny.original_layout_state_dict(reference)
    bigg = tiny.BIGG_PREFIX if which == "base" else tiny.REFINER_BIGG_PREFIX
    assert sd[bigg + "text_projection"].shape == (1280, 1280)
    assert sd[bigg + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    det = diffstudio.detect(sd)
    assert det.family == ("sdxl" if which == "base" else "sdxl_refiner")
    unet = det.components["unet"].config
    if which == "base":
        assert (unet.model_channels, unet.channel_mult, unet.transformer_depth, unet.transformer_depth_middle,
                unet.context_dim, unet.adm_in_channels) == (320, [1, 2, 4], [0, 2, 10], 10, 2048, 2816)
        clip_l = det.components["text_encoder"].config
        assert (clip_l.num_hidden_layers, clip_l.hidden_size, clip_l.num_attention_heads) == (12, 768, 12)
    else:
        assert (unet.model_channels, unet.channel_mult, unet.transformer_depth, unet.transformer_depth_middle,
                unet.context_dim, unet.adm_in_channels) == (384, [1, 2, 4, 4], [0, 4, 4, 0], 4, 1280, 2560)
    assert unet == config_from_diffusers(dict(reference.unet.config))
    g = det.components["text_encoder_2"].config
    assert (g.num_hidden_layers, g.hidden_size, g.num_attention_heads, g.intermediate_size, g.projection_dim,
            g.hidden_act, g.vocab_size) == (32, 1280, 20, 5120, 1280, "gelu", 49408)
    assert_every_key_maps(sd, det)


def test_released_bigg_is_reported_in_the_openclip_layout():
    det = diffstudio.detect(tiny.original_layout_state_dict(tiny.meta_reference_models()))
    assert det.components["text_encoder_2"].layout == "openclip"
    assert det.components["text_encoder"].layout == "original"
    assert "openclip layout" in det.summary()


def test_released_bigg_in_the_hf_layout_maps_every_key():
    """A single file whose bigG is stored in transformers' names (e.g. re-saved by other tools)."""
    from diffstudio.convert.clip import canonical_clip_keys

    reference = tiny.meta_reference_models()
    sd = {k: v for k, v in tiny.original_layout_state_dict(reference).items() if not k.startswith(tiny.BIGG_PREFIX)}
    sd.update({tiny.BIGG_PREFIX + k: v for k, v in canonical_clip_keys(reference.text_encoder_2.state_dict()).items()})
    det = diffstudio.detect(sd)
    assert det.family == "sdxl" and det.components["text_encoder_2"].layout == "original"
    assert det.components["text_encoder_2"].config.projection_dim == 1280
    assert_every_key_maps(sd, det)


# --- loading and the pipeline -------------------------------------------------------------------------------


def test_loaded_components_match_the_reference(base, models):
    assert models.family.name == "sdxl"
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert rel_err(models.vae.encode(images), base.vae.encode(images).latent_dist.mean) < TOL
        ids = models.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert rel_err(models.text_encoder_2(ids).text_embeds, base.text_encoder_2(ids).text_embeds) < TOL
        assert rel_err(models.text_encoder(ids).last_hidden_state, base.text_encoder(ids).last_hidden_state) < TOL
    assert models.tokenizer_2.pad_token == "!" and models.tokenizer.pad_token == "<|endoftext|>"


def test_defaults_follow_the_family(models):
    d = models.family.defaults
    assert (d.width, d.height) == (1024, 1024) and models.family.latent.scale == 0.13025
    assert models.family.text_encoders[0].default_clip_skip == 2


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_txt2img_img2img_and_inpainting_run(files, pipe, layout):
    pipe = pipe if layout == "single" else diffstudio.Pipeline(diffstudio.load(files["folder"]))
    image = pipe("a prompt", width=64, height=64, steps=2, progress=False)[0]
    assert image.size == (64, 64) and image.info["diffstudio_recipe"]["family"] == "sdxl"
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    low = pipe("a square", init_image=init, strength=0.1, steps=10, seed=1, progress=False)[0]
    high = pipe("a square", init_image=init, strength=0.9, steps=10, seed=1, progress=False)[0]
    recon = pipe.decode_latents(pipe.encode_images(diffstudio.io.images.images_to_tensor([init]), None), None)
    recon = arr(diffstudio.io.images.tensor_to_images(recon)[0])
    assert np.abs(arr(low) - recon).mean() < np.abs(arr(high) - recon).mean()
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    out = pipe("a star", init_image=init, mask=Image.fromarray(mask), strength=1.0, steps=3, seed=2, progress=False)[0]
    assert np.array_equal(arr(out)[mask == 0], arr(init)[mask == 0])
    assert np.abs(arr(out)[mask > 0] - arr(init)[mask > 0]).mean() > 5


def test_turbo_settings_cfg_one_and_custom_sigmas(pipe, models):
    """SDXL-Turbo / Lightning: cfg 1 runs the UNet once per step (no negative), on the user's sigmas."""
    batches = []
    hook = models.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        image = pipe("a cat", width=64, height=64, cfg_scale=1.0, sigmas=[14.6146, 2.0, 0.0], seed=0,
                     progress=False)[0]
        one_step = pipe("a cat", width=64, height=64, cfg_scale=1.0, sigmas=[14.6146, 0.0], seed=0,
                        progress=False)[0]
    finally:
        hook.remove()
    assert batches == [1, 1, 1]
    assert image.info["diffstudio_recipe"]["sigmas"] == pytest.approx([14.6146, 2.0, 0.0])
    assert not np.array_equal(arr(image), arr(one_step))
    # The schedule ComfyUI recommends for distilled SDXL, one step.
    assert pipe("a cat", width=64, height=64, cfg_scale=1.0, steps=1, scheduler="sgm_uniform",
                progress=False)[0].size == (64, 64)


def test_long_prompts_are_chunked_in_both_encoders(pipe):
    cond, uncond = pipe.encode_prompts(["word " * 100 + "red"], [""], clip_skip=2, width=64, height=64)
    assert cond["context"].shape == uncond["context"].shape == (1, 154, 192)


def test_folder_and_single_file_give_the_same_image(files, pipe):
    folder = diffstudio.Pipeline(diffstudio.load(files["folder"]))
    assert folder.models.family.name == "sdxl"
    a = pipe("a red circle", "blue", width=64, height=64, steps=3, seed=5, progress=False)[0]
    b = folder("a red circle", "blue", width=64, height=64, steps=3, seed=5, progress=False)[0]
    assert np.abs(arr(a) - arr(b)).max() <= 1


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_separate_vae_file_replaces_the_bundled_one(files, tmp_path, layout):
    """The fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) is an SDXL VAE with other weights."""
    other = tiny.reference_models(seed=40).vae
    path = tiny.write_vae_file(tmp_path / "sdxl_vae_fp16_fix.safetensors", other, layout)
    loaded = diffstudio.load(files["single"], path)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(loaded.vae.decode(z), other.decode(z).sample) < TOL
    assert loaded.sources["vae"] == str(path) and loaded.family.name == "sdxl"


def test_saved_single_file_reloads_with_the_projection(models, tmp_path):
    from transformers import CLIPTextModelWithProjection

    from diffstudio.save import save_single_file

    path = save_single_file(models, tmp_path / "resaved.safetensors")
    from diffstudio.io.state_dict import read_state_dict_meta

    keys = set(read_state_dict_meta(path)[0])  # bigG in OpenCLIP's names, as released files store it
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    again = diffstudio.load(path)
    assert again.family.name == "sdxl" and isinstance(again.text_encoder_2, CLIPTextModelWithProjection)
    for name, p in models.text_encoder_2.state_dict().items():
        assert torch.equal(p, again.text_encoder_2.state_dict()[name]), name


@pytest.mark.parametrize("layout", ["refiner_single", "refiner_folder"])
def test_refiner_is_detected_and_refines_an_image(files, layout):
    models = diffstudio.load(files[layout])
    assert models.family.name == "sdxl_refiner" and "text_encoder" not in models.components
    refine = diffstudio.Pipeline(models)
    init = Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8))
    out = refine("a red circle", "blue", init_image=init, strength=0.3, steps=4, seed=1, progress=False)[0]
    assert out.size == (64, 64) and out.info["diffstudio_recipe"]["strength"] == 0.3
    # The aesthetic score enters `y`: it changes the conditioning.
    c6 = models.family.make_conditioning(models, ["x"], clip_skip=2, width=64, height=64)
    c2 = models.family.make_conditioning(models, ["x"], clip_skip=2, width=64, height=64, aesthetic_score=2.5)
    assert c6["y"].shape == (1, tiny.POOLED + 5 * tiny.TIME_DIM) and not torch.equal(c6["y"], c2["y"])
    # In the pipeline's one batch of prompts + negatives, the negative rows get the reference's 2.5.
    both = models.family.make_conditioning(models, ["x", "x"], clip_skip=2, width=64, height=64, n_positive=1)
    torch.testing.assert_close(both["y"][:1], c6["y"])
    torch.testing.assert_close(both["y"][1:], c2["y"])


def test_refiner_folder_and_single_file_agree(files):
    init = Image.fromarray((np.random.default_rng(4).random((64, 64, 3)) * 255).astype(np.uint8))
    out = [diffstudio.Pipeline(diffstudio.load(files[k]))("x", init_image=init, strength=0.5, steps=3, seed=2,
                                                            progress=False)[0]
           for k in ("refiner_single", "refiner_folder")]
    assert np.abs(arr(out[0]) - arr(out[1])).max() <= 1
