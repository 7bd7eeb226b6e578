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
from diffstudio.errors import InvalidInputError
from diffstudio.models.cogvideo import CogVideoConfig, CogVideoTransformer, rope_3d
from tests.tiny_sd15 import randomise

TOL = 1e-4

# transformer/config.json of THUDM/CogVideoX-2b and -5b (the fields that differ from diffusers' defaults).
RELEASE = {
    "2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
}
COMMON = dict(in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096, sample_width=90,
              sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226, spatial_interpolation_scale=1.875,
              temporal_interpolation_scale=1.0, attention_bias=True, norm_eps=1e-5)
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
