"""CogVideoX: the expert transformer against diffusers (2B sinusoids, 5B 3D RoPE, I2V learned table, 1.5 temporal
patches), the 3D RoPE at 33 latent frames, detection and full-size layouts on the meta device, the zero-SNR
schedule and samplers, the whole pipeline against diffusers' CogVideoXPipeline, and the ExVideo LoRA layout."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from diffstudio.detect import detect
from diffstudio.detect.cogvideo import config_from_diffusers, derive_cogvideo_config
from diffstudio.errors import FrameCountError, InvalidInputError
from diffstudio.models.cogvideo import CogVideoConfig, CogVideoTransformer, rope_3d
from tests.tiny_sd15 import randomise

TOL = 1e-4

# transformer/config.json of THUDM/CogVideoX-2b and -5b (the fields that differ from diffusers' defaults).
RELEASE = {
    "2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
}
COMMON = dict(in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096, sample_width=90,
              sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
              spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0, attention_bias=True, norm_eps=1e-5)
SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=12, time_embed_dim=8,
             sample_width=8, sample_height=6, sample_frames=9, max_text_seq_length=5, in_channels=4, out_channels=4)
STYLES = {
    "2b": dict(),
    "5b": dict(use_rotary_positional_embeddings=True),
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, ofs_embed_dim=8),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def small_pair(style: str, seed: int = 0):
    ref = CogVideoXTransformer3DModel(**SMALL, **STYLES[style]).eval()
    randomise(ref, seed)
    if ref.config.use_learned_positional_embeddings:  # a table in the file (the 2B's sinusoid buffer is not)
        ref.patch_embed.pos_embedding.normal_(generator=torch.Generator().manual_seed(seed))
    ours = CogVideoTransformer(config_from_diffusers(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def reference_rope(config: CogVideoConfig, frames: int, grid_h: int, grid_w: int):
    """The rotation diffusers' CogVideoXPipeline builds (its _prepare_rotary_positional_embeddings)."""
    p = config.patch_size
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if config.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(config.attention_head_dim, crops, (grid_h, grid_w), frames)
    return get_3d_rotary_pos_embed(config.attention_head_dim, None, (grid_h, grid_w), frames, grid_type="slice",
                                   max_size=(base_h, base_w))


# -- the transformer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("size", [(6, 8), (8, 6)], ids=["training-size", "other-size"])
def test_transformer_matches_diffusers(style, size):
    """At another size the 1.0 RoPE fits the token grid into the training grid (a 4 x 3 grid spans x = 1, 1.5,
    2); 1.5 slices integer positions from a grid that must fit inside the training one (so 3 x 3 there)."""
    if style == "5b-i2v" and size != (6, 8):
        pytest.skip("the learned position table covers the training size only")
    if style == "1.5" and size != (6, 8):
        size = (6, 6)
    ref, ours = small_pair(style)
    g = torch.Generator().manual_seed(1)
    frames = 4 if style == "1.5" else 3
    x = torch.randn(2, frames, 4, *size, generator=g)
    context = torch.randn(2, 5, 12, generator=g)
    t = torch.tensor([999, 412])
    ofs = torch.full((2,), 2.0) if style == "1.5" else None
    rope = None
    if ours.config.use_rotary_positional_embeddings:
        pt = ours.config.patch_size_t or 1
        rope = reference_rope(ours.config, frames // pt, size[0] // 2, size[1] // 2)
    with torch.no_grad():
        expected = ref(x, context, t, ofs=ofs, image_rotary_emb=rope).sample
        got = ours(x, context, t, ofs=ofs)
    assert got.shape == x.shape
    assert rel_err(got, expected) < TOL


def test_3d_rope_matches_diffusers_at_33_latent_frames():
    """129 frames at 720x480 (ExVideo): 33 latent frames of a 30 x 45 token grid, 5B's 64-wide heads."""
    config = CogVideoConfig(**{**COMMON, **RELEASE["5b"]})
    cos, sin = rope_3d(33, 30, 45, config)
    ref_cos, ref_sin = reference_rope(config, 33, 30, 45)
    assert cos.shape == ref_cos.shape == (33 * 30 * 45, 64)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)


def test_tiny_transformer_takes_33_latent_frames():
    ref, ours = small_pair("5b")
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 33, 4, 6, 8, generator=g), torch.randn(1, 5, 12, generator=g)
    with torch.no_grad():
        expected = ref(x, context, torch.tensor([500]), image_rotary_emb=reference_rope(ours.config, 33, 3, 4)).sample
        got = ours(x, context, torch.tensor([500]))
    assert got.shape == (1, 33, 4, 6, 8) and rel_err(got, expected) < TOL


def test_sinusoidal_model_needs_its_text_length():
    _, ours = small_pair("2b")
    with pytest.raises(InvalidInputError, match="exactly 5 text tokens"):
        ours(torch.randn(1, 1, 4, 6, 8), torch.randn(1, 3, 12), torch.tensor([1]))


# -- detection and the release layouts ---------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_config_derived_from_shapes_equals_the_reference_config(style):
    ref, ours = small_pair(style)
    hints = {"use_rotary_positional_embeddings": ours.config.use_rotary_positional_embeddings,
             "sample_width": 8, "sample_height": 6, "sample_frames": 9, "max_text_seq_length": 5}
    assert derive_cogvideo_config(ref.state_dict(), hints) == ours.config


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_full_size_layout_on_meta_is_detected_and_every_key_maps(name):
    from tests.meta_checks import assert_every_key_maps

    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**COMMON, **RELEASE[name])
    sd = ref.state_dict()
    det = detect(sd)
    assert det.family == "cogvideox" and det.variant == name
    config = det.components["transformer"].config
    assert config == config_from_diffusers(ref.config)  # shapes + the release conventions give the full config
    assert_every_key_maps(sd, det)
    from diffstudio.detect import _try_family
    from diffstudio.families import FAMILIES

    assert [f.name for f in FAMILIES if _try_family(f, sd, {})[0] is not None] == ["cogvideox"]


def test_diffsynth_layout_converts_both_ways():
    from diffstudio.convert.cogvideo import cogvideo_from_diffsynth, cogvideo_to_diffsynth

    ref, ours = small_pair("5b")
    theirs = cogvideo_to_diffsynth(ref.state_dict(), ours.config)
    assert "blocks.1.attn1.to_out.weight" in theirs and theirs["patchify.proj.weight"].ndim == 5
    back = cogvideo_from_diffsynth(theirs)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


# -- schedule and samplers -----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [3.0, 1.0], ids=["2b", "5b"])
def test_schedule_and_ddim_step_match_diffusers(shift):
    from diffusers import CogVideoXDDIMScheduler

    from diffstudio.sampling.zero_snr import cogvideo_alphas_cumprod, sample_ddim_v, trailing_timesteps
    from tests.tiny_cogvideo import SCHEDULER

    ref = CogVideoXDDIMScheduler(**SCHEDULER, snr_shift_scale=shift)
    abar = cogvideo_alphas_cumprod(snr_shift_scale=shift)
    assert float(abar[-1]) == 0.0  # zero terminal SNR
    assert torch.allclose(abar.float(), ref.alphas_cumprod.float(), atol=1e-6)
    ref.set_timesteps(7)
    steps = trailing_timesteps(7)
    assert steps == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x, vs = torch.randn(2, 3, 4, generator=g), [torch.randn(2, 3, 4, generator=g) for _ in steps]
    expected = x.clone()
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(vs[i], t, expected).prev_sample
    got = sample_ddim_v(lambda x_t, t, i: vs[i], x.double(), steps, abar, stride=1000 // 7)
    assert rel_err(got, expected) < TOL


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_vp_samplers_equal_the_k_diffusion_samplers_away_from_zero_snr(name):
    """Without the zero-SNR endpoint the VP-form samplers are the VE samplers of samplers.py in other coordinates
    (x_ve = x_vp / alpha, sigma = sqrt((1 - abar) / abar)): the same trajectory from the same v-model."""
    from diffstudio.sampling.samplers import get_sampler
    from diffstudio.sampling.zero_snr import cogvideo_alphas_cumprod, get_sampler_v, trailing_timesteps

    abar = cogvideo_alphas_cumprod(snr_shift_scale=3.0, zero_terminal_snr=False)
    steps = trailing_timesteps(6)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3

    def v_model(x_vp, t, i=None):  # any smooth function of (x, t) stands for the network
        return torch.tanh(x_vp @ w) * (1 + t / 1000)

    def denoiser(x_ve, sigma):
        t = steps[[round(float(s), 4) for s in sigmas[:-1]].index(round(float(sigma[0]), 4))]
        alpha = float(abar[t]) ** 0.5
        x_vp = x_ve * alpha
        return alpha * x_vp - (1 - alpha**2) ** 0.5 * v_model(x_vp, t)

    sigmas = torch.tensor([((1 - float(abar[t])) / float(abar[t])) ** 0.5 for t in steps] + [0.0], dtype=torch.float64)
    x_vp = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = get_sampler_v(name)(v_model, x_vp, steps, abar)
    expected = get_sampler(name)(denoiser, x_vp / float(abar[steps[0]]) ** 0.5, sigmas)
    assert rel_err(got, expected) < 1e-6


def test_frame_counts_are_4k_plus_1():
    from diffstudio.video.cogvideo import latent_frames

    assert latent_frames(49) == 13 and latent_frames(129) == 33 and latent_frames(1) == 1
    for bad in (48, 50, 0, 128):
        with pytest.raises(FrameCountError, match="4k \\+ 1"):
            latent_frames(bad)


# -- the pipeline against diffusers' CogVideoXPipeline -------------------------------------------------------


@pytest.fixture(scope="module", params=["2b", "5b"])
def tiny(request, tmp_path_factory):
    import diffstudio
    from tests.tiny_cogvideo import reference_models, write_diffusers_folder

    dit, t5, vae = reference_models(request.param)
    folder = write_diffusers_folder(tmp_path_factory.mktemp(f"cogvideox-{request.param}"), dit, t5, request.param)
    return request.param, diffstudio.load(folder), (dit, t5, vae)


@pytest.mark.parametrize("dynamic", [False, True], ids=["cfg", "dynamic-cfg"])
def test_pipeline_latents_match_diffusers(tiny, dynamic):
    from diffusers import CogVideoXPipeline

    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.video.cogvideo import CogVideoPipeline
    from tests.tiny_cogvideo import reference_scheduler

    style, models, (dit, t5, vae) = tiny
    assert models.family.name == "cogvideox" and models.detection.variant == style
    noise = torch.randn(1, 3, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    args = dict(num_frames=9, width=64, height=48, use_dynamic_cfg=dynamic)
    got = CogVideoPipeline(models)("a red fox", "blurry", steps=4, cfg_scale=6.0, latents=noise, output_type="latent",
                                   **args)
    ref = CogVideoXPipeline(tokenizer=load_tokenizer("t5"), text_encoder=t5, vae=vae, transformer=dit,
                            scheduler=reference_scheduler(style))
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red fox", "blurry", num_inference_steps=4, guidance_scale=6.0, latents=noise.clone(),
                   output_type="latent", **args).frames
    assert got.shape == expected.shape == (1, 3, 16, 6, 8)
    assert rel_err(got, expected) < TOL


def test_pipeline_seed_decode_and_video_to_video(tiny):
    from diffstudio.video.cogvideo import CogVideoPipeline

    style, models, (_, _, vae) = tiny
    import diffstudio

    with pytest.raises(InvalidInputError, match="CogVideoPipeline"):
        diffstudio.Pipeline(models)  # the image pipeline names the one to use
    pipe = CogVideoPipeline(models)
    args = dict(num_frames=9, width=64, height=48, steps=2, cfg_scale=1.0)
    with pytest.raises(Exception, match="no VAE"):
        pipe("a fox", **args)
    models.components["vae"] = vae  # diffusers' 3D VAE stands in for ours (models/cogvideo_vae.py)
    try:
        frames = pipe("a fox", seed=3, **args)
        assert len(frames) == 9 and frames[0].size == (64, 48)
        again = pipe("a fox", seed=3, output_type="latent", **args)
        assert torch.equal(again, pipe("a fox", seed=3, output_type="latent", **args))
        moved = pipe("a fox", seed=3, init_video=frames, strength=0.5, output_type="latent", **args)
        assert moved.shape == again.shape and not torch.equal(moved, again)
        with pytest.raises(FrameCountError):
            pipe("a fox", **{**args, "num_frames": 10})
    finally:
        del models.components["vae"]


# -- the ExVideo-CogVideoX LoRA: a peft LoRA on the attention projections ------------------------------------


def exvideo_layout(models, names: str, rank: int = 4) -> dict:
    """A file laid out like ExVideo-CogVideoX-LoRA-129f-v1 (DiffSynth-Studio's peft LoRA on CogDiT:
    blocks.N.attn1.to_q / to_k / to_v / to_out, adapter "default", merged with scale 1), or the same layers under
    diffusers' names (transformer_blocks.N.attn1.to_out.0)."""
    g = torch.Generator().manual_seed(5)
    dim = models.configs["transformer"].inner_dim
    sd = {}
    for i in range(models.configs["transformer"].num_layers):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            layer = (f"blocks.{i}.attn1.{proj}" if names == "diffsynth"
                     else f"transformer_blocks.{i}.attn1.{proj}{'.0' if proj == 'to_out' else ''}")
            sd[f"{layer}.lora_A.default.weight"] = torch.randn(rank, dim, generator=g) * 0.1
            sd[f"{layer}.lora_B.default.weight"] = torch.randn(dim, rank, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("names", ["diffsynth", "diffusers"])
def test_exvideo_lora_layout_maps_fully_and_merged_equals_on_the_fly(tiny, names):
    import warnings

    style, models, _ = tiny
    base = models.clone()
    net = models.transformer
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(1, 3, 16, 6, 8, generator=g), torch.tensor([700])
    context = torch.randn(1, 226, 32, generator=g)
    with torch.no_grad():
        plain = net(x, context, t)
    sd = exvideo_layout(models, names)
    outputs = {}
    for mode in ("merged", "on_the_fly"):
        twin = base.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # partial coverage would warn
            handle = twin.apply_lora(sd, mode=mode)
        assert handle.report.coverage == 1.0 and handle.report.base_family == "cogvideox"
        assert handle.report.family_guess == "cogvideox"
        assert handle.report.matched == 4 * models.configs["transformer"].num_layers
        twin.activate()
        with torch.no_grad():
            outputs[mode] = net(x, context, t)
        handle.remove()
        twin.activate()
    base.activate()
    with torch.no_grad():
        restored = net(x, context, t)
    assert rel_err(outputs["merged"], outputs["on_the_fly"]) < TOL
    assert rel_err(outputs["merged"], plain) > 1e-3  # the LoRA does something
    assert torch.equal(restored, plain)  # exact removal
    # The delta is B @ A at scale 1 (no alpha in the file; DiffSynth merges it so).
    name = "transformer_blocks.0.attn1.to_q.weight"
    original = dict(net.named_parameters())[name].detach().clone()
    twin = base.clone()
    twin.apply_lora(sd)
    twin.activate()
    key = "blocks.0.attn1.to_q" if names == "diffsynth" else "transformer_blocks.0.attn1.to_q"
    delta = sd[f"{key}.lora_B.default.weight"] @ sd[f"{key}.lora_A.default.weight"]
    assert torch.allclose(dict(net.named_parameters())[name], original + delta, atol=1e-6)
    base.activate()


def test_single_files_in_both_layouts_are_detected(tmp_path):
    """A lone transformer file with diffusers' names (bare), and one in DiffSynth-Studio's CogDiT names."""
    from safetensors.torch import save_file

    from diffstudio.convert.cogvideo import cogvideo_to_diffsynth
    from diffstudio.loader import read_source
    from tests.tiny_cogvideo import reference_models

    ref = reference_models("5b")[0]  # 16 latent channels, as the family needs
    config = config_from_diffusers(ref.config)
    layouts = {"original": ref.state_dict(), "diffsynth": cogvideo_to_diffsynth(ref.state_dict(), config)}
    for layout, sd in layouts.items():
        path = tmp_path / f"{layout}.safetensors"
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
        det, parts = read_source(path)
        comp = det.components["transformer"]
        assert det.family == "cogvideox" and det.variant == "5b" and comp.layout == layout
        assert parts["transformer"].state_dict.keys() == ref.state_dict().keys()

