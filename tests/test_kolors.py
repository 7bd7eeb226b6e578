"""Kolors: the UNet (SDXL + encoder_hid_proj) against diffusers, detection by structure (tiny and
full size on the meta device), loading every layout, and the whole pipeline against diffusers'
KolorsPipeline on the same tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.convert.unet import unet_from_diffusers, unet_to_diffusers
from diffstudio.detect import _try_family
from diffstudio.detect.unet import config_from_diffusers, derive_unet_config
from diffstudio.families import FAMILIES, get_family
from diffstudio.families.kolors import KOLORS, size_embedding_width, size_embeddings
from diffstudio.models.unet import UNetModel
from diffstudio.release_configs import CHATGLM3_6B, KOLORS_UNET, SDXL_VAE
from tests.tiny_kolors import (
    SCHEDULER,
    UNET,
    reference_models,
    reference_tokenizer,
    write_diffusers_folder,
    write_released_text_encoder,
)

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def reference():
    return reference_models()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("kolors") / "tiny-kolors", *reference)


@pytest.fixture(scope="module")
def models(folder):
    return diffstudio.load(folder)


def test_unet_matches_diffusers(reference):
    unet_ref = reference[0]
    config = config_from_diffusers(unet_ref.config)
    ours = UNetModel(config).eval()
    converted = unet_from_diffusers(unet_ref.state_dict())
    ours.load_state_dict(converted)
    assert config.encoder_hid_dim == 64 and config.adm_in_channels == 112 and config.context_dim == 32
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 1000.0])
    text = torch.randn(2, 7, 64, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    time_ids = torch.tensor([[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]] * 2)
    y = torch.cat([pooled, size_embeddings(64, 48, 2, size_embedding_width(config))], dim=-1)
    with torch.no_grad():
        expected = unet_ref(x, t, encoder_hidden_states=text,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert rel_err(ours(x, t, text, y), expected) < TOL
    # Shapes alone (Kolors' 64-channel-head convention) give the same network.
    derived = derive_unet_config(converted, KOLORS.role("unet").hints)
    assert derived.heads_for(128) == config.heads_for(128) and derived.transformer_depth == config.transformer_depth
    assert unet_to_diffusers(converted, config).keys() == unet_ref.state_dict().keys()


def test_detection_is_structural_and_exclusive(reference):
    bare = reference[0].state_dict()  # a diffusers-layout UNet file, as Kolors' repo ships it
    det = diffstudio.detect(bare)
    assert det.family == "kolors" and set(det.components) == {"unet"}
    assert det.components["unet"].layout == "diffusers"
    assert [f.name for f in FAMILIES if _try_family(f, bare, {})[0] is not None] == ["kolors"]
    assert "encoder_hid_proj" in (get_family("sdxl").check_denoiser(det.components["unet"].config) or "")
    # Without the text projection it is not Kolors (and the reason says why).
    no_proj = {k: v for k, v in bare.items() if not k.startswith("encoder_hid_proj")}
    _, reason = _try_family(KOLORS, no_proj, {})
    assert "encoder_hid_proj" in reason


def test_folder_loads_with_every_component(models):
    assert models.family.name == "kolors"
    assert set(models.components) == {"unet", "vae", "text_encoder", "tokenizer"}
    assert type(models.text_encoder).__name__ == "ChatGLMEncoder"
    assert type(models.tokenizer).__name__ == "ChatGLMTokenizer"
    assert models.configs["text_encoder"].kv_groups == 2


def test_a_folder_whose_index_names_the_sdxl_pipeline_is_placed_by_its_unet(folder, tmp_path):
    """The original Kwai-Kolors/Kolors release names StableDiffusionXLPipeline in model_index.json."""
    import json
    import shutil

    renamed = tmp_path / "kolors-as-released"
    shutil.copytree(folder, renamed)
    index = json.loads((renamed / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    assert diffstudio.load(renamed).family.name == "kolors"


def test_conditioning_matches_kolors_encode_prompt(reference, models):
    from diffusers import KolorsPipeline

    unet, vae, text = reference
    pipe = KolorsPipeline(vae=vae, text_encoder=text, tokenizer=reference_tokenizer(), unet=unet, scheduler=None)
    prompts = ["一只可爱的小猫 a cute cat", ""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        cond = KOLORS.make_conditioning(models, prompts, clip_skip=2, width=96, height=64)
    assert cond["context"].shape == (2, 256, 64) and cond["y"].shape == (2, 112)
    assert rel_err(cond["context"], embeds) < TOL
    assert rel_err(cond["y"][:, :64], pooled) < TOL
    time_ids = torch.tensor([64.0, 96.0, 0.0, 0.0, 64.0, 96.0])
    assert rel_err(cond["y"][:, 64:], unet.add_time_proj(time_ids).reshape(1, -1).expand(2, -1)) < TOL


def test_pipeline_matches_diffusers_kolors_pipeline(reference, models):
    """Same model, noise and sigmas: diffusers' KolorsPipeline and ours give the same latents and image."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    from diffstudio.sampling.noise import SeededNoise

    unet, vae, text = reference
    # Trailing spacing: integer timesteps and an initial noise scale equal to the first sigma, so the
    # reference's schedule is exactly expressible as our sigma list.
    scheduler = EulerDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"})
    ref = KolorsPipeline(vae=vae, text_encoder=text, tokenizer=reference_tokenizer(), unet=unet, scheduler=scheduler,
                         force_zeros_for_empty_prompt=False)
    ref.set_progress_bar_config(disable=True)
    scheduler.set_timesteps(2)
    sigmas = scheduler.sigmas.tolist()
    noise = SeededNoise([7], (4, 8, 8), dtype=torch.float32, device="cpu").initial()
    kwargs = dict(prompt="一只猫 a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                  height=64, width=64)
    with torch.no_grad():
        ref_latents = ref(**kwargs, latents=noise.clone(), output_type="latent").images
        ref_image = ref(**kwargs, latents=noise.clone(), output_type="np").images[0]
    finals = []
    images = diffstudio.Pipeline(models)("一只猫 a cat", "blurry", width=64, height=64, seed=7, sigmas=sigmas,
                                         cfg_scale=5.0, progress=False, callback=lambda i, n, x, d: finals.append(d))
    assert rel_err(finals[-1], ref_latents) < 1e-4
    diff = np.abs(np.asarray(images[0]).astype(np.float64) - np.round(ref_image * 255))
    assert images[0].size == (64, 64) and diff.max() <= 1


def test_defaults_and_schedule(models):
    from diffusers import EulerDiscreteScheduler

    from diffstudio.pipeline.denoiser import make_denoiser

    d = KOLORS.defaults
    assert (d.width, d.height, d.cfg_scale) == (1024, 1024, 5.0)
    acp = EulerDiscreteScheduler(**SCHEDULER).alphas_cumprod.double()
    expected = ((1 - acp) / acp).sqrt()
    assert rel_err(make_denoiser(models).sigmas, expected) < 1e-6 and len(expected) == 1100
    images = diffstudio.Pipeline(models)(["a", "b"], width=64, height=48, steps=2, progress=False)
    assert [im.size for im in images] == [(64, 48)] * 2


def test_released_text_encoder_layout_loads(reference, folder, tmp_path, models):
    """Kwai-Kolors/Kolors' own text_encoder/: `transformer.` keys with head and rotary buffer, .bin shards."""
    import shutil

    copy = tmp_path / "kolors-released"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("text_encoder"))
    write_released_text_encoder(copy / "text_encoder", reference[2])
    loaded = diffstudio.load(copy)
    assert loaded.components["text_encoder"].state_dict().keys() == models.text_encoder.state_dict().keys()
    ids = loaded.tokenizer(["猫"])
    with torch.no_grad():
        a = loaded.text_encoder(**ids).hidden_states[-2]
        b = models.text_encoder(**ids).hidden_states[-2]
    assert torch.equal(a, b)


def test_single_file_round_trip(models, tmp_path):
    """diffstudio's own Kolors file (original-layout UNet/VAE, configs in the metadata) loads back as Kolors."""
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict
    from diffstudio.save import save_single_file

    path = save_single_file(models, tmp_path / "kolors.safetensors")
    sd = read_state_dict(path)
    assert any(k.startswith("text_encoders.chatglm.transformer.encoder.layers.1.") for k in sd)
    assert "model.diffusion_model.encoder_hid_proj.weight" in sd
    det = diffstudio.detect(sd, read_file_metadata(path))
    assert det.family == "kolors" and set(det.components) == {"unet", "vae", "text_encoder"}
    again = diffstudio.load(path)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = KOLORS.make_conditioning(models, ["a cat"], clip_skip=2, width=64, height=64)
    with torch.no_grad():
        # Equal weights; memory alignment (mmap) may change the kernels' summation order.
        assert rel_err(again.unet(x, t, **cond), models.unet(x, t, **cond)) < 1e-6


def test_full_size_kolors_on_meta():
    """The released Kolors UNet (diffusers layout), SDXL VAE and ChatGLM3-6B on the meta device: detection
    names Kolors and derives the released configs from shapes alone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    from diffstudio.convert.chatglm import canonical_chatglm_keys
    from diffstudio.convert.vae import vae_from_diffusers
    from diffstudio.models.chatglm import ChatGLMConfig as OurChatGLMConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**KOLORS_UNET).state_dict()
        vae = AutoencoderKL(**SDXL_VAE).state_dict()
        text = ChatGLMModel(ChatGLMConfig(**CHATGLM3_6B), empty_init=False).state_dict()
    single = {"model.diffusion_model." + k: v for k, v in unet_from_diffusers(unet).items()}
    single.update({"first_stage_model." + k: v for k, v in vae_from_diffusers(vae).items()})
    single.update({"text_encoders.chatglm." + k: v for k, v in canonical_chatglm_keys(text).items()})
    det = diffstudio.detect(single)
    assert det.family == "kolors" and set(det.components) == {"unet", "vae", "text_encoder"}
    config = det.components["unet"].config
    assert (config.adm_in_channels, config.encoder_hid_dim, config.context_dim) == (5632, 4096, 2048)
    assert config.transformer_depth == [0, 2, 10] and config.heads_for(1280) == (20, 64)
    assert size_embedding_width(config) == 256
    reference_config = config_from_diffusers(KOLORS_UNET)
    assert [reference_config.heads_for(c) for c in (640, 1280)] == [config.heads_for(c) for c in (640, 1280)]
    assert det.components["text_encoder"].config == OurChatGLMConfig()
    assert det.ignored == []
    assert [f.name for f in FAMILIES if _try_family(f, single, {})[0] is not None] == ["kolors"]


def test_unet_widths_that_are_not_kolors_are_refused():
    config = config_from_diffusers({**UNET, "projection_class_embeddings_input_dim": 64 + 7})
    assert "six" in KOLORS.check_denoiser(config)
    assert KOLORS.check_denoiser(config_from_diffusers({**UNET, "in_channels": 9})) is None  # Kolors-Inpainting
    assert KOLORS.concat_channels(config_from_diffusers({**UNET, "in_channels": 9})) == 5
