"""Stable Diffusion 3 / 3.5: the MMDiT against diffusers' SD3Transformer2DModel (plain, QK-norm, MMDiT-X),
the converter, full-size layouts on the meta device, detection of single files, conditioning and the
whole pipeline against diffusers' StableDiffusion3Pipeline on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from PIL import Image

import diffstudio
from diffstudio.convert.mmdit import mmdit_from_diffusers, mmdit_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.mmdit import config_from_diffusers, derive_mmdit_config
from diffstudio.errors import ConversionError, InvalidSizeError, ModelNotFoundError, UnknownModelError
from diffstudio.families.sd3 import SD3, variant_of
from diffstudio.models.mmdit import MMDiT, MMDiTConfig
from tests.tiny_sd3 import (
    TRANSFORMER,
    VARIANTS,
    original_layout_state_dict,
    randomise,
    reference_models,
    write_diffusers_folder,
    write_single_file,
)

# An odd little config (4 heads of 8, depth 3, a text width unlike the image width) so that a mix-up of
# heads, widths or the pre-only last block cannot cancel out.
ODD = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
           num_attention_heads=4, joint_attention_dim=40, caption_projection_dim=32, pooled_projection_dim=24,
           pos_embed_max_size=12)
STRUCTURES = {"plain": {}, "qk_norm": {"qk_norm": "rms_norm"},
              "dual": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 2)}}
# The released transformers' config.json (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-large, stable-diffusion-3.5-medium).
REAL = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}
REAL_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def odd_reference(structure: str) -> SD3Transformer2DModel:
    ref = SD3Transformer2DModel(**ODD, **STRUCTURES[structure]).eval()
    randomise(ref, 1)
    return ref


# -- the MMDiT and its converter ----------------------------------------------------------------------


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_mmdit_matches_diffusers(structure):
    ref = odd_reference(structure)
    sd = mmdit_from_diffusers(ref.state_dict())
    config = derive_mmdit_config(sd, {"num_heads": 4} if structure == "plain" else {})
    assert config == config_from_diffusers(dict(ref.config))
    model = MMDiT(config).eval()
    model.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 10, generator=g)  # non-square: rows and columns of the patch grid must not swap
    t, y, ctx = torch.tensor([913.0, 37.5]), torch.randn(2, 24, generator=g), torch.randn(2, 7, 40, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        got = model(x, t, y, ctx)
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_converter_round_trips_are_identities(structure):
    ref_sd = odd_reference(structure).state_dict()
    original = mmdit_from_diffusers(ref_sd)
    config = derive_mmdit_config(original, {"num_heads": 4})
    diffusers_sd = mmdit_to_diffusers(original, config)
    assert diffusers_sd.keys() == ref_sd.keys() and all(torch.equal(diffusers_sd[k], ref_sd[k]) for k in ref_sd)
    again = mmdit_from_diffusers(diffusers_sd)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_adaln_halves_are_swapped_where_diffusers_orders_scale_first():
    ref_sd = odd_reference("plain").state_dict()
    original = mmdit_from_diffusers(ref_sd)
    c = 32
    # Original (shift, scale) = diffusers (scale, shift) reversed: final layer and the last pre-only text stream.
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"][:c], ref_sd["norm_out.linear.weight"][c:])
    last = "joint_blocks.2.context_block.adaLN_modulation.1.bias"
    assert torch.equal(original[last][c:], ref_sd["transformer_blocks.2.norm1_context.linear.bias"][:c])
    # Six-vector adaLN-Zero keeps its order.
    assert torch.equal(original["joint_blocks.0.x_block.adaLN_modulation.1.weight"],
                       ref_sd["transformer_blocks.0.norm1.linear.weight"])


def test_conversion_checks_raise():
    ref_sd = odd_reference("qk_norm").state_dict()
    with pytest.raises(ConversionError, match="matched no rule"):
        mmdit_from_diffusers({**ref_sd, "transformer_blocks.0.attn.extra.weight": torch.zeros(2)})
    original = mmdit_from_diffusers(ref_sd)
    config = derive_mmdit_config(original)
    with pytest.raises(ConversionError, match="missing"):
        mmdit_to_diffusers({k: v for k, v in original.items() if k != "joint_blocks.1.x_block.mlp.fc2.bias"}, config)
    with pytest.raises(ConversionError, match="shape"):
        mmdit_to_diffusers({**original, "context_embedder.bias": torch.zeros(5)}, config)


def test_derive_rejects_truncated_and_unknown_layouts():
    original = mmdit_from_diffusers(odd_reference("plain").state_dict())
    with pytest.raises(UnknownModelError, match="head width"):
        derive_mmdit_config(original)  # width 32: heads cannot be derived without a hint
    truncated = {k: v for k, v in original.items() if not k.startswith("joint_blocks.2.")}
    with pytest.raises(UnknownModelError, match="only the last block"):
        derive_mmdit_config(truncated, {"num_heads": 4})
    with pytest.raises(UnknownModelError, match="not an SD3 MMDiT"):
        derive_mmdit_config({k: v for k, v in original.items() if k != "pos_embed"})


def test_gradient_checkpointing_gives_the_same_gradients():
    sd = mmdit_from_diffusers(odd_reference("dual").state_dict())
    model = MMDiT(derive_mmdit_config(sd))
    model.load_state_dict(sd)
    x, t, y, ctx = torch.randn(1, 16, 4, 4), torch.tensor([500.0]), torch.randn(1, 24), torch.randn(1, 5, 40)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, y, ctx).square().mean().backward()
        grads.append(model.joint_blocks[0].x_block.attn2.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sizes_the_mmdit_cannot_take():
    model = MMDiT(MMDiTConfig(depth=1, hidden_size=64, num_heads=1, pos_embed_max_size=4, context_in_dim=8,
                              adm_in_channels=8, mlp_hidden_size=64))
    y, ctx = torch.zeros(1, 8), torch.zeros(1, 3, 8)
    with pytest.raises(InvalidSizeError, match="divisible by the patch size"):
        model(torch.zeros(1, 16, 5, 4), torch.tensor([1.0]), y, ctx)
    with pytest.raises(InvalidSizeError, match="at most 64x64 pixels"):
        model(torch.zeros(1, 16, 10, 4), torch.tensor([1.0]), y, ctx)


# -- full size, on the meta device --------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(REAL))
def test_full_size_layouts_map_and_detect(variant):
    fields = {**REAL_COMMON, **REAL[variant]}
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**fields)
    original = mmdit_from_diffusers(ref.state_dict())
    expected = config_from_diffusers(fields)
    with torch.device("meta"):
        ours = MMDiT(expected).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in original.items()}
    detection = detect({"model.diffusion_model." + k: v for k, v in original.items()})
    assert detection.family == "sd3" and detection.variant == variant
    config = detection.components["dit"].config
    assert config == expected  # heads included: 64-wide heads (or ln_q's width), no hint needed
    assert config.hidden_size == 64 * config.depth and config.num_heads == config.depth
    # The diffusers layout of the same weights (a bare transformer file) is found and converted too.
    bare = detect(ref.state_dict())
    assert bare.family == "sd3" and bare.components["dit"].layout == "diffusers" and bare.variant == variant


def test_variants_get_their_own_defaults():
    for variant, cfg in (("sd3-medium", 7.0), ("sd3.5-large", 3.5), ("sd3.5-medium", 4.5)):
        config = config_from_diffusers({**REAL_COMMON, **REAL[variant]})
        assert variant_of(config) == variant
        assert SD3.for_variant(variant).defaults.cfg_scale == cfg


# -- tiny whole model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refs():
    return reference_models("sd3-medium")


class _Files(dict):
    """The tiny model's files, each written when a test first asks for it."""

    def __init__(self, refs, root):
        super().__init__()
        self.makers = {
            "full": lambda: write_single_file(root / "sd3_incl_clips_t5.safetensors", refs),
            "no_t5": lambda: write_single_file(root / "sd3_incl_clips.safetensors", refs, t5=False),
            "bare": lambda: write_single_file(root / "sd3.safetensors", refs, text_encoders=False),
            "folder": lambda: write_diffusers_folder(root / "sd3-diffusers", refs),
        }

    def __missing__(self, key):
        self[key] = self.makers[key]()
        return self[key]


@pytest.fixture(scope="module")
def files(refs, tmp_path_factory):
    return _Files(refs, tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def pipe(files):
    return diffstudio.Pipeline(diffstudio.load(files["full"]))


@pytest.fixture(scope="module")
def reference_pipeline(refs):
    """diffusers' StableDiffusion3Pipeline over the same modules (and the same tokenizers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer, load_tokenizer

    ref = StableDiffusion3Pipeline(**refs, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   tokenizer=load_clip_tokenizer(), tokenizer_2=load_clip_tokenizer(pad_token="!"),
                                   tokenizer_3=load_tokenizer("t5"))
    ref.set_progress_bar_config(disable=True)
    return ref


def test_vae_has_16_channels_no_quant_conv_and_matches_diffusers(refs, pipe):
    vae = pipe.models.vae
    assert vae.config.latent_channels == 16 and not vae.config.use_quant_conv
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected_latent = refs["vae"].encode(images).latent_dist.mean
        latent = vae.encode(images)
        assert rel_err(latent, expected_latent) < 1e-4
        assert rel_err(vae.decode(latent), refs["vae"].decode(expected_latent).sample) < 1e-4
    # The family's latent format is diffusers' SD3 scaling: (latent - shift_factor) * scaling_factor.
    cfg = refs["vae"].config
    z = pipe.family.latent.to_model(latent)
    assert torch.allclose(z, (latent - cfg.shift_factor) * cfg.scaling_factor)


def test_single_files_are_detected(files):
    from diffstudio.detect import _try_family
    from diffstudio.families import FAMILIES
    from diffstudio.io.state_dict import read_state_dict

    sd = read_state_dict(files["full"])
    full = detect(sd)
    assert full.family == "sd3" and full.variant == "sd3-medium"
    accepting = [f.name for f in FAMILIES if _try_family(f, sd, {})[0] is not None]
    assert accepting == ["sd3"]  # every other record refuses the file
    assert set(full.components) == {"dit", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert full.components["text_encoder_3"].config.num_heads == 3 and not full.ignored
    assert set(detect(read_state_dict(files["no_t5"])).components) == {"dit", "vae", "text_encoder",
                                                                       "text_encoder_2"}
    assert set(detect(read_state_dict(files["bare"])).components) == {"dit", "vae"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_variants_are_told_apart(variant):
    dit = mmdit_from_diffusers(SD3Transformer2DModel(**TRANSFORMER, **VARIANTS[variant]).state_dict())
    assert detect({"model.diffusion_model." + k: v for k, v in dit.items()}).variant == variant


def test_a_file_without_clip_encoders_asks_for_them(files):
    with pytest.raises(ModelNotFoundError, match="text_encoder"):
        diffstudio.load(files["bare"])


def test_conditioning_matches_diffusers_encode_prompt(files, pipe, reference_pipeline):
    from diffusers import StableDiffusion3Pipeline

    ref = reference_pipeline
    no_t5 = StableDiffusion3Pipeline(**{**ref.components, "text_encoder_3": None, "tokenizer_3": None})
    prompts = ["a red circle on a blue square", ""]
    no_t5_models = diffstudio.load(files["no_t5"])
    for reference, models, t5_tokens in ((ref, pipe.models, 256), (no_t5, no_t5_models, 77)):
        with torch.no_grad():
            context, _, pooled, _ = reference.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            cond = SD3.make_conditioning(models, prompts, clip_skip=2)
        assert cond["context"].shape == (2, 77 + t5_tokens, 192) and cond["y"].shape == (2, 128)
        # Without T5, diffusers 0.42 pads 256 zero tokens, the reference code and ComfyUI 77 (the T5 length
        # SD3 was trained with, T5 dropped): we keep 77, so compare the part both have.
        n = cond["context"].shape[1]
        assert rel_err(cond["context"], context[:, :n]) < 1e-5 and rel_err(cond["y"], pooled) < 1e-5
    # The CLIP features (64 + 64) are zero-padded on the feature axis to the T5 width 192.
    assert (cond["context"][:, :77, 128:] == 0).all() and (cond["context"][:, 77:] == 0).all()


def test_txt2img_matches_diffusers_pipeline(pipe, reference_pipeline):
    from diffstudio.sampling.noise import SeededNoise

    ref = reference_pipeline
    steps, cfg = 3, 4.0
    ref.scheduler.set_timesteps(steps)
    sigmas = ref.scheduler.sigmas.tolist()
    noise = SeededNoise([3], (16, 8, 8), dtype=torch.float32, device="cpu").initial()
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=steps, guidance_scale=cfg,
                   height=64, width=64, latents=noise, output_type="latent").images
    final = {}
    pipe("a red circle", "blue", width=64, height=64, cfg_scale=cfg, seed=3, sigmas=sigmas, progress=False,
         callback=lambda i, total, x, denoised: final.update(z=denoised))  # the last step lands on denoised
    assert rel_err(final["z"], expected) < 1e-4


def test_generate_64px_in_2_steps_and_the_folder_gives_the_same_image(files, pipe):
    image = pipe("a red circle", width=64, height=64, steps=2, seed=5, progress=False)[0]
    assert image.size == (64, 64) and arr(image).std() > 1
    recipe = image.info["diffstudio_recipe"]
    assert recipe["family"] == "sd3" and recipe["scheduler"] == "flow" and recipe["cfg_scale"] == 7.0
    folder = diffstudio.Pipeline(diffstudio.load(files["folder"]))
    assert np.array_equal(arr(folder("a red circle", width=64, height=64, steps=2, seed=5, progress=False)[0]),
                          arr(image))
    other = pipe("a red circle", width=64, height=64, steps=2, seed=6, progress=False)[0]
    assert not np.array_equal(arr(other), arr(image))


def test_without_t5_it_still_generates(files):
    models = diffstudio.load(files["no_t5"])
    assert "text_encoder_3" not in models.components
    image = diffstudio.Pipeline(models)("a red circle", width=64, height=64, steps=2, seed=0, progress=False)[0]
    assert image.size == (64, 64)


def test_img2img_and_inpaint(pipe):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    txt = pipe("a red circle", width=64, height=64, steps=2, seed=1, progress=False)[0]
    low = pipe("a red circle", init_image=init, strength=0.3, steps=4, seed=1, progress=False)[0]
    high = pipe("a red circle", init_image=init, strength=1.0, steps=4, seed=1, progress=False)[0]
    assert low.size == (64, 64) and not np.array_equal(arr(low), arr(txt))
    assert np.abs(arr(low) - arr(init)).mean() < np.abs(arr(high) - arr(init)).mean()  # low strength stays nearer
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = pipe("a red circle", init_image=init, mask=mask, strength=1.0, steps=2, seed=1, progress=False)[0]
    outside = np.asarray(mask) < 128
    assert np.array_equal(arr(painted)[outside], arr(init)[outside])
    assert not np.array_equal(arr(painted)[~outside], arr(init)[~outside])


def test_image_sides_that_are_not_multiples_of_16_are_padded(pipe):
    image = pipe("a red circle", width=72, height=56, steps=2, seed=0, progress=False)[0]  # 9 x 7 latents
    assert image.size == (72, 56)


def test_saved_file_loads_back_to_the_same_image(pipe, tmp_path):
    from diffstudio.save import save_single_file

    path = save_single_file(pipe.models, tmp_path / "saved.safetensors")
    again = diffstudio.Pipeline(diffstudio.load(path))
    a = pipe("a red circle", width=64, height=64, steps=2, seed=2, progress=False)[0]
    b = again("a red circle", width=64, height=64, steps=2, seed=2, progress=False)[0]
    assert np.array_equal(arr(a), arr(b))


def test_float8_mmdit_weights_stay_float8_and_generate(refs, tmp_path):
    from safetensors.torch import save_file

    sd = original_layout_state_dict(refs)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim == 2 else v
           for k, v in sd.items()}  # Linear weights in float8, as in sd3.5_large_fp8 files
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(tmp_path / "fp8.safetensors"))
    models = diffstudio.load(tmp_path / "fp8.safetensors")
    assert models.dit.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert models.dtype == torch.float32
    image = diffstudio.Pipeline(models)("a red circle", width=64, height=64, steps=2, seed=0, progress=False)[0]
    assert arr(image).std() > 1


def test_separate_encoder_files_fill_their_roles(refs, files, tmp_path):
    """How SD3.5 is usually downloaded: the model file, then clip_l / clip_g / t5xxl files beside it."""
    from safetensors.torch import save_file

    from diffstudio.convert.clip import canonical_clip_keys
    from diffstudio.convert.t5 import canonical_t5_keys
    from diffstudio.detect import Component
    from diffstudio.errors import UnknownModelError
    from diffstudio.families import get_family
    from diffstudio.loader import _to_family_roles

    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in canonical_t5_keys(refs["text_encoder_3"].state_dict()).items()}, str(t5))
    clip_l = tmp_path / "clip_l.safetensors"
    save_file({k: v.contiguous() for k, v in canonical_clip_keys(refs["text_encoder"].state_dict()).items()},
              str(clip_l))
    full, split = diffstudio.load(files["full"]), diffstudio.load(files["no_t5"], t5)
    assert "text_encoder_3" in split.components
    for k, v in full.text_encoder_3.state_dict().items():
        assert torch.equal(v, split.text_encoder_3.state_dict()[k]), k
    # The tiny CLIP-L and CLIP-G share one width, so a lone CLIP file is ambiguous here, and says so ...
    with pytest.raises(UnknownModelError, match="cannot tell which sd3 component"):
        diffstudio.load(files["bare"], clip_l)
    # ... while the released widths (768 / 1280) pick the role whatever the order of the files.
    sd3 = get_family("sd3")
    for width, role in ((1280, "text_encoder_2"), (768, "text_encoder")):
        config = type("Config", (), {"hidden_size": width})()
        comps = {"text_encoder": Component("text_encoder", "clip_text", "", "original", config, 0, "float16")}
        moved, parts = _to_family_roles(sd3, comps, {"text_encoder": "part"}, set())
        assert list(moved) == [role] and moved[role].role == role and parts == {role: "part"}
