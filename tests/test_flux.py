"""FLUX.1: the transformer against diffusers, the converters, float8 storage, detection at full size
(meta device), the schedule, and the whole pipeline on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from diffstudio.convert.flux import flux_from_diffusers, flux_to_diffusers
from diffstudio.detect.flux import config_from_diffusers
from diffstudio.errors import ConversionError, InvalidInputError
from diffstudio.models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents, unpack_latents

TOL = 1e-4

# FLUX.1 [dev] / [schnell] transformer/config.json (black-forest-labs on the Hugging Face Hub): they
# differ only in guidance_embeds.
FULL = dict(attention_head_dim=128, in_channels=64, joint_attention_dim=4096, num_attention_heads=24, num_layers=19,
            num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
SMALL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def small_reference(guidance: bool):
    from tests.tiny_flux import randomise

    ref = FluxTransformer2DModel(**SMALL, guidance_embeds=guidance).eval()
    randomise(ref, 3)
    return ref


def ours_from(ref) -> FluxTransformer:
    model = FluxTransformer(config_from_diffusers(ref.config))
    model.load_state_dict(flux_from_diffusers(ref.state_dict()))
    return model.eval()


def inputs(batch=2, height=6, width=8, n_txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 16, height, width, generator=g)
    return dict(img=pack_latents(latent), img_ids=image_ids(height, width),
                txt=torch.randn(batch, n_txt, 24, generator=g), txt_ids=torch.zeros(n_txt, 3),
                timesteps=torch.tensor([0.25, 0.9])[:batch],
                y=torch.randn(batch, 20, generator=g))


# -- the transformer and its converter ---------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers(guidance):
    ref = small_reference(guidance)
    ours = ours_from(ref)
    assert (ours.guidance_in is not None) == guidance
    x = inputs()
    g = torch.tensor([3.5, 1.0]) if guidance else None
    with torch.no_grad():
        expected = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                       timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=g).sample
        got = ours(**x, guidance=g)
        # The original signature takes batched ids too (BFL passes (B, L, 3)).
        batched = ours(**{**x, "img_ids": x["img_ids"].expand(2, -1, -1), "txt_ids": x["txt_ids"][None]}, guidance=g)
    assert got.shape == x["img"].shape
    assert rel_err(got, expected) < TOL
    assert torch.allclose(batched, got, atol=1e-6)


def test_dev_needs_guidance():
    ours = ours_from(small_reference(True))
    with pytest.raises(InvalidInputError, match="guidance"):
        ours(**inputs())


def test_converter_round_trip_is_identity():
    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=20, context_in_dim=24, hidden_size=32,
                        num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6), mlp_ratio=3.0)
    g = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(v.shape, generator=g) for k, v in FluxTransformer(config).state_dict().items()}
    diffusers_sd = flux_to_diffusers(bfl, config)
    assert "single_transformer_blocks.2.proj_mlp.weight" in diffusers_sd
    back = flux_from_diffusers(diffusers_sd, config)
    assert back.keys() == bfl.keys()
    assert all(torch.equal(back[k], bfl[k]) for k in bfl)
    # the final adaLN's halves trade places, (shift, scale) <-> (scale, shift)
    w = bfl["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(diffusers_sd["norm_out.linear.weight"][:32], w[32:])


def test_converter_check_names_what_is_wrong():
    sd = small_reference(False).state_dict()
    with pytest.raises(ConversionError, match="matched no rule"):
        flux_from_diffusers({**sd, "transformer_blocks.0.attn.extra.weight": torch.zeros(1)})
    config = config_from_diffusers(small_reference(False).config)
    bfl = flux_from_diffusers(sd)
    with pytest.raises(ConversionError, match="missing"):
        flux_to_diffusers({k: v for k, v in bfl.items() if k != "single_blocks.1.linear2.weight"}, config)


def test_packing_matches_the_reference_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 10, generator=g)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 10), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), ids)


# -- float8 storage -------------------------------------------------------------------------------------


def test_float8_weights_stay_float8_and_upcast_per_layer():
    from diffstudio.loader import Models, Part, build_component
    from diffstudio.models.lowbit import UpcastLinear
    from tests.tiny_flux import to_float8

    ref = small_reference(True)
    config = config_from_diffusers(ref.config)
    bfl = flux_from_diffusers(ref.state_dict())
    stored = to_float8(bfl)
    x = inputs()
    g = torch.tensor([3.5, 1.0])
    # what the file holds, in full precision: the fp32 model with float8-rounded weights
    rounded = FluxTransformer(config).eval()
    rounded.load_state_dict({k: v.float() for k, v in stored.items()})
    with torch.no_grad():
        expected = rounded(**x, guidance=g)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 3e-2)):
        model = build_component("dit", "flux_dit", Part(stored, config, "fp8 file"), dtype, "cpu")
        assert model.img_in.weight.dtype == torch.float8_e4m3fn
        assert model.single_blocks[1].linear1.weight.dtype == torch.float8_e4m3fn
        assert isinstance(model.double_blocks[0].img_attn.qkv, UpcastLinear)
        assert model.img_in.bias.dtype == dtype and model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == dtype
        fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
        assert fp8_bytes > 0.95 * sum(p.numel() for p in model.parameters())
        from diffstudio import families

        models = Models(families.get_family("flux"), {"dit": model}, {"dit": config})
        assert models.dtype == dtype
        with torch.no_grad():
            got = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}, guidance=g)
        assert got.dtype == dtype
        assert rel_err(got, expected) < tol, dtype


def test_models_without_opt_in_upcast_float8_at_load():
    from diffstudio.models.lowbit import cast_keeping_lowbit

    layer = torch.nn.Linear(4, 3)
    state = {"weight": torch.randn(3, 4).to(torch.float8_e4m3fn), "bias": torch.zeros(3)}
    out = cast_keeping_lowbit(layer, state, torch.bfloat16, "cpu")
    assert out["weight"].dtype == torch.bfloat16 and type(layer) is torch.nn.Linear
    assert set(state) == {"weight", "bias"}
    # the loader's own state dicts are consumed tensor by tensor (a source and its copy never coexist whole)
    out = cast_keeping_lowbit(layer, state, torch.float32, "cpu", consume=True)
    assert not state and out["weight"].dtype == torch.float32


# -- full size, on the meta device ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_full_size_keys_shapes_and_detection(variant):
    import diffstudio

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**FULL, guidance_embeds=variant == "dev")
        ours = FluxTransformer(FluxConfig(guidance_embed=variant == "dev"))
    converted = flux_from_diffusers(ref.state_dict())
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in converted.values()) == sum(p.numel() for p in ref.parameters())
    assert config_from_diffusers(ref.config) == ours.config

    for prefix in ("", "model.diffusion_model."):  # BFL's file / a ComfyUI-style bundle
        det = diffstudio.detect({prefix + k: v for k, v in converted.items()})
        assert (det.family, det.variant) == ("flux", variant)
        assert det.components["dit"].config == FluxConfig(guidance_embed=variant == "dev")
        assert det.components["dit"].layout == "original"
    det = diffstudio.detect(ref.state_dict())  # a diffusers transformer file (e.g. transformer/*.safetensors)
    assert (det.family, det.variant, det.components["dit"].layout) == ("flux", variant, "diffusers")
    assert det.components["dit"].config == FluxConfig(guidance_embed=variant == "dev")


def test_other_flux_variants_are_refused_by_name():
    import diffstudio

    with torch.device("meta"):
        fill = FluxTransformer(FluxConfig(in_channels=384, depth=1, depth_single_blocks=1))
    with pytest.raises(diffstudio.UnknownModelError, match="Fill"):
        diffstudio.detect(fill.state_dict())


# -- schedule and record ------------------------------------------------------------------------------------


def test_dev_and_schnell_schedules():
    from diffstudio.families import get_family
    from diffstudio.sampling.schedules import flow_sigmas, flux_mu
    from tests.tiny_flux import SCHEDULER

    flux = get_family("flux")
    dev, schnell = flux.for_variant("dev"), flux.for_variant("schnell")
    assert dev is flux and schnell.name == "flux"
    assert (dev.defaults.steps, schnell.defaults.steps) == (28, 4)
    assert (dev.defaults.guidance, schnell.defaults.guidance) == (3.5, None)
    assert (dev.text_encoders[1].max_length, schnell.text_encoders[1].max_length) == (512, 256)
    assert dev.schedule.shift_for(128, 128) == pytest.approx(torch.e ** 1.15)  # 1024 px: 4096 tokens
    assert schnell.schedule.shift_for(128, 128) == 1.0
    # the same sigmas as diffusers' FluxPipeline: sigmas linspace(1, 1/n, n), mu from the token count
    for variant, family in (("dev", dev), ("schnell", schnell)):
        for latent, steps in ((8, 2), (64, 28), (128, 4)):
            tokens = (latent // 2) ** 2
            sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant])
            sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(), mu=flux_mu(tokens))
            ours = flow_sigmas(steps, family.schedule.shift_for(latent, latent))
            assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6), (variant, latent)


def test_cpu_linear_fast_path_equals_f_linear():
    from diffstudio.models import cpu_linear

    g = torch.Generator().manual_seed(0)
    layer = cpu_linear.Linear(512, 1024)  # 512 x 1024 weight: above MIN_WEIGHT_NUMEL, takes the oneDNN path
    assert layer.weight.numel() >= cpu_linear.MIN_WEIGHT_NUMEL
    x = torch.randn(2, 7, 512, generator=g)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        assert rel_err(layer(x), expected) < 1e-6
        assert rel_err(layer(x[:, ::2]), expected[:, ::2]) < 1e-6  # strided input
        assert rel_err(cpu_linear.linear(x, layer.weight), expected - layer.bias) < 1e-6
    out = layer(x)  # weights require grad: the autograd path
    out.sum().backward()
    assert layer.weight.grad is not None and rel_err(out, expected) < 1e-6


# -- the whole model: files, loading, the pipeline --------------------------------------------------------

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (reference modules, {layout: path})} for dev and schnell."""
    from tests.tiny_flux import reference_models, write_bfl_files, write_bundle, write_diffusers_folder

    out = {}
    for i, variant in enumerate(("dev", "schnell")):
        root = tmp_path_factory.mktemp(f"flux_{variant}")
        ref = reference_models(variant, seed=10 * i)
        paths = {"files": write_bfl_files(root / "bfl", *ref), "bundle": write_bundle(root / "aio.safetensors", *ref),
                 "folder": write_diffusers_folder(root / "diffusers", *ref, variant=variant)}
        if variant == "dev":
            paths["bundle_fp8"] = write_bundle(root / "aio-fp8.safetensors", *ref, fp8=True)
        out[variant] = (ref, paths)
    return out


def _load(paths: dict, layout: str, **kwargs):
    import diffstudio

    if layout == "files":  # BFL's release: transformer, then ae, clip_l, t5xxl
        files = paths["files"]
        return diffstudio.load(files["dit"], files["vae"], files["text_encoder"], files["text_encoder_2"], **kwargs)
    return diffstudio.load(paths[layout], **kwargs)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_files_are_detected_by_structure(tiny, variant):
    import diffstudio
    from diffstudio.io.state_dict import read_state_dict

    files = tiny[variant][1]["files"]
    det = diffstudio.detect(read_state_dict(files["dit"]))
    assert (det.family, det.variant, det.components["dit"].prefix) == ("flux", variant, "")
    assert det.components["dit"].config.axes_dim == (16, 56, 56)  # the FLUX.1 convention for 128-wide heads
    for role, arch in (("vae", "ldm_vae"), ("text_encoder", "clip_text"), ("text_encoder_2", "t5_encoder")):
        lone = diffstudio.detect(read_state_dict(files[role]))
        assert lone.family is None and [c.arch for c in lone.components.values()] == [arch]
    bundle = diffstudio.detect(read_state_dict(tiny[variant][1]["bundle"]))
    assert (bundle.family, bundle.variant) == ("flux", variant)
    assert set(bundle.components) == {"dit", "vae", "text_encoder", "text_encoder_2"} and not bundle.ignored


@pytest.mark.parametrize("layout", ["files", "bundle", "folder"])
def test_every_layout_loads_the_same_model(tiny, layout):
    (dit, vae, clip, t5), paths = tiny["dev"]
    models = _load(paths, layout)
    assert models.family.name == "flux" and models.detection.variant == "dev"
    assert models.family.defaults.steps == 28 and models.family.text_encoders[1].max_length == 512
    x = inputs(height=4, width=4)
    x = {**x, "txt": torch.randn(2, 5, 32), "y": torch.randn(2, 64)}
    g = torch.tensor([3.5, 2.0])
    with torch.no_grad():
        expected = dit(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                       timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=g).sample
        assert rel_err(models.dit(**x, guidance=g), expected) < TOL
        ids = torch.randint(0, 32000, (1, 12))
        hidden = models.text_encoder_2(input_ids=ids).last_hidden_state
        assert rel_err(hidden, t5(input_ids=ids).last_hidden_state) < TOL
        z = torch.randn(1, 16, 8, 8)
        assert rel_err(models.vae.decode(z), vae.decode(z).sample) < TOL


def _diffusers_latents(folder, seed: int, steps: int, guidance: float, negative: str | None = None,
                       true_cfg: float = 1.0) -> torch.Tensor:
    """FluxPipeline's final latents from the noise our pipeline draws for ``seed``, as (1, 16, 8, 8)."""
    from diffstudio.sampling.noise import SeededNoise

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = SeededNoise([seed], (16, 8, 8)).initial()
    with torch.no_grad():
        packed = pipe(PROMPT, negative_prompt=negative, true_cfg_scale=true_cfg, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, latents=pack_latents(noise),
                      output_type="latent",
                      max_sequence_length=512 if pipe.transformer.config.guidance_embeds else 256).images
    return unpack_latents(packed, 8, 8)


def _our_latents(models, **kwargs) -> torch.Tensor:
    import diffstudio

    final = {}

    def keep(i, total, x, denoised):
        final["z"] = denoised

    diffstudio.Pipeline(models)(PROMPT, width=64, height=64, progress=False, callback=keep, **kwargs)
    return final["z"]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_pipeline_matches_diffusers_flux_pipeline(tiny, variant):
    """Same noise, same prompt: our final latents equal FluxPipeline's (packing, ids, shift, guidance, T5 length)."""
    ref, paths = tiny[variant]
    models = _load(paths, "files")
    assert models.family.defaults.steps == (28 if variant == "dev" else 4)
    ours = _our_latents(models, steps=2, seed=5)
    expected = _diffusers_latents(paths["folder"], 5, 2, guidance=3.5)
    assert rel_err(ours, expected) < TOL


def test_true_cfg_matches_diffusers(tiny):
    _, paths = tiny["dev"]
    models = _load(paths, "bundle")
    ours = _our_latents(models, steps=2, seed=3, cfg_scale=2.5, negative_prompt=NEGATIVE, guidance=2.0)
    expected = _diffusers_latents(paths["folder"], 3, 2, guidance=2.0, negative=NEGATIVE, true_cfg=2.5)
    assert rel_err(ours, expected) < TOL
    plain = _our_latents(models, steps=2, seed=3, guidance=2.0)
    assert rel_err(plain, ours) > 1e-3  # the negative branch did something


def test_generate_img2img_and_inpaint(tiny):
    import numpy as np
    from PIL import Image

    import diffstudio

    _, paths = tiny["schnell"]
    pipe = diffstudio.Pipeline(_load(paths, "files"))
    (image,) = pipe(PROMPT, width=64, height=64, steps=2, seed=1, progress=False)
    assert image.size == (64, 64) and image.info["diffstudio_recipe"]["family"] == "flux"
    # a side that is a multiple of 8 but not 16 (odd latent): padded for the 2x2 packing
    (wide,) = pipe(PROMPT, width=72, height=64, steps=1, seed=1, progress=False)
    assert wide.size == (72, 64)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (img2img,) = pipe(PROMPT, init_image=init, strength=0.5, steps=2, seed=1, progress=False)
    assert img2img.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    (inpainted,) = pipe(PROMPT, init_image=init, mask=mask, strength=1.0, steps=2, seed=1, progress=False)
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(inpainted)[outside], np.asarray(init)[outside])


def test_float8_checkpoint_loads_and_generates(tiny):
    import diffstudio

    (dit, *_), paths = tiny["dev"]
    models = diffstudio.load(paths["bundle_fp8"], dtype=torch.bfloat16)
    assert models.dtype == torch.bfloat16
    assert models.detection.components["dit"].dtype == "float8_e4m3fn"
    weights = [p for n, p in models.dit.named_parameters() if n.endswith("weight") and p.ndim == 2]
    assert weights and all(p.dtype == torch.float8_e4m3fn for p in weights)
    assert models.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    (image,) = diffstudio.Pipeline(models)(PROMPT, width=64, height=64, steps=2, seed=1, progress=False)
    assert image.size == (64, 64)
