"""Motion module files: conversion to and from diffusers' MotionAdapter layout, detection by structure,
the released layouts at full size on the meta device, and add_motion_module for every file kind."""

from __future__ import annotations

import pytest
import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from tiny_motion import SETUPS, reference
from tiny_sd15 import randomise

from diffstudio.convert.motion import complete_positions, motion_from_diffusers, motion_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.motion import config_from_diffusers, derive_motion_config, motion_variant
from diffstudio.detect.unet import config_from_diffusers as unet_config_from_diffusers
from diffstudio.errors import ConversionError, MotionModuleMismatchError
from diffstudio.families import get_family
from diffstudio.io import save_safetensors
from diffstudio.loader import Models
from diffstudio.models.motion import MotionConfig, MotionModules, sinusoidal_positions
from diffstudio.motion_loading import add_motion_module, motion_state_dict
from diffstudio.release_configs import SD15_UNET, SDXL_UNET

# diffusers MotionAdapter config.json of each release (guoyww/animatediff-motion-adapter-v1-5, -v1-5-2, -v1-5-3,
# -sdxl-beta on the Hub); v1's 24 positions are what diffusers' single-file loader tells v1 from v3 by.
RELEASES = {
    "v1": dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_max_seq_length=24,
               motion_num_attention_heads=8, motion_norm_num_groups=32, use_motion_mid_block=False),
    "v2": dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_max_seq_length=32,
               motion_num_attention_heads=8, motion_norm_num_groups=32, use_motion_mid_block=True),
    "v3": dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_max_seq_length=32,
               motion_num_attention_heads=8, motion_norm_num_groups=32, use_motion_mid_block=False),
    "sdxl_beta": dict(block_out_channels=(320, 640, 1280), motion_layers_per_block=2, motion_max_seq_length=32,
                      motion_num_attention_heads=8, motion_norm_num_groups=32, use_motion_mid_block=False),
}
SDXL_BETA_FILE_BYTES = 948_604_184  # its diffusion_pytorch_model.safetensors (fp32) on the Hub
TINY_HINTS = {"num_heads": 2, "norm_groups": 8}


def tiny_adapter(seed: int = 1, **overrides) -> MotionAdapter:
    adapter = MotionAdapter(**{**SETUPS["sd15_v2"][2], **overrides})
    randomise(adapter, seed)
    return adapter.eval()


def released_layout(adapter: MotionAdapter) -> dict:
    return motion_from_diffusers(adapter.state_dict())


# ------------------------------------------------------------------------------------------ conversion


def test_conversion_agrees_with_diffusers_single_file_converter():
    """diffusers' own released -> MotionAdapter converter (it drops the position tables) is the reference."""
    adapter = tiny_adapter()
    ours = released_layout(adapter)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1." \
           "pos_encoder.pe" in ours
    theirs = convert_animatediff_checkpoint_to_diffusers(ours)
    expected = {k: v for k, v in adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert theirs.keys() == expected.keys()
    assert all(torch.equal(theirs[k], expected[k]) for k in expected)
    # ... and back: our released -> diffusers map gives the adapter's state dict, tables included.
    config = derive_motion_config(ours, TINY_HINTS)
    back = motion_to_diffusers(ours, config)
    assert back.keys() == adapter.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in adapter.state_dict().items())


def test_position_table_is_diffusers_sinusoid_and_is_restored_when_missing():
    reference_table = SinusoidalPositionalEmbedding(64, max_seq_length=24).pe
    assert torch.allclose(sinusoidal_positions(24, 64), reference_table, atol=1e-6)
    adapter = tiny_adapter()
    full = released_layout(adapter)
    stripped = {k: v for k, v in full.items() if not k.endswith("pos_encoder.pe")}
    completed = complete_positions(stripped, derive_motion_config(full, TINY_HINTS))
    assert completed.keys() == full.keys()
    assert all(torch.allclose(completed[k], full[k], atol=1e-6) for k in full)
    # A table-less file converts to a table-less MotionAdapter state dict.
    assert not any("pos_embed" in k for k in motion_to_diffusers(stripped, derive_motion_config(full, TINY_HINTS)))


def test_conversion_errors_are_named():
    full = released_layout(tiny_adapter())
    config = derive_motion_config(full, TINY_HINTS)
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    with pytest.raises(ConversionError, match="position table"):
        motion_to_diffusers({**full, key: full[key] + 1}, config)
    with pytest.raises(ConversionError, match="missing"):
        complete_positions({k: v for k, v in full.items() if "proj_in.bias" not in k}, config)
    with pytest.raises(ConversionError, match="shape"):
        wrong = dict(full)
        wrong["down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(32, 31)
        complete_positions(wrong, config)


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_detect_places_a_lone_motion_module(layout):
    adapter = tiny_adapter(use_motion_mid_block=False)
    sd = released_layout(adapter) if layout == "original" else adapter.state_dict()
    found = detect(sd)
    assert found.family is None and list(found.components) == ["motion"]
    comp = found.components["motion"]
    assert comp.arch == "motion_module" and comp.layout == layout
    assert comp.config.level_channels == [32, 64] and comp.config.modules_per_level == [1, 1]
    assert comp.config.max_frames == 8 and comp.config.mid_block is False


def test_config_from_diffusers_json_and_variants():
    for name, cfg in RELEASES.items():
        config = config_from_diffusers(cfg)
        assert motion_variant(config) == name
    with pytest.raises(MotionModuleMismatchError, match="conv_in"):
        config_from_diffusers({**RELEASES["v3"], "conv_in_channels": 9})


# ------------------------------------------------------------------------------------------ full size


@pytest.mark.parametrize("name", list(RELEASES))
def test_released_layouts_at_full_size(name):
    """Every key of a release's MotionAdapter maps to our released layout with equal shapes, detection
    derives the release's config, and the modules fit that family's UNet and not the other's."""
    with torch.device("meta"):
        adapter = MotionAdapter(**RELEASES[name])
    sd = released_layout(adapter)
    config = derive_motion_config(sd)
    assert config == config_from_diffusers(RELEASES[name])
    assert motion_variant(config) == name
    with torch.device("meta"):
        ours = MotionModules(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert detect(sd).components["motion"].config == config
    # Facts about the released files (diffusers' single-file detection reads these keys).
    pe = sd["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
            "pos_encoder.pe"]
    assert tuple(pe.shape) == (1, 24 if name == "v1" else 32, 320)
    assert ("mid_block.motion_modules.0.temporal_transformer.norm.bias" in sd) == (name == "v2")
    assert sd["up_blocks.2.motion_modules.0.temporal_transformer.norm.weight"].shape[0] == \
        (320 if name == "sdxl_beta" else 640)
    sd15, sdxl = unet_config_from_diffusers(SD15_UNET), unet_config_from_diffusers(SDXL_UNET)
    fits, other = (sdxl, sd15) if name == "sdxl_beta" else (sd15, sdxl)
    assert ours.mismatch(fits) is None
    assert "widths" in ours.mismatch(other)


def test_sdxl_beta_size_matches_the_published_file():
    with torch.device("meta"):
        adapter = MotionAdapter(**RELEASES["sdxl_beta"])
    sd = motion_to_diffusers(released_layout(adapter), config_from_diffusers(RELEASES["sdxl_beta"]))
    data_bytes = sum(v.numel() for v in sd.values()) * 4
    header = SDXL_BETA_FILE_BYTES - data_bytes  # what is left is the JSON header: ~130 bytes a tensor
    assert 0 < header < 200 * len(sd)


# ------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def tiny_models():
    """A Models holding our tiny SD 1.5-like UNet (the sd15_v2 set-up's)."""
    from tiny_motion import ours

    unet, adapter, _ = reference("sd15_v2")
    model, _ = ours("sd15_v2", unet, adapter, norm_across_frames=False)
    return Models(family=get_family("sd15"), components={"unet": model}, configs={"unet": model.config})


def _written(kind: str, adapter: MotionAdapter, tmp_path):
    if kind == "safetensors":
        return save_safetensors(released_layout(adapter), tmp_path / "mm_tiny.safetensors")
    if kind == "ckpt":
        path = tmp_path / "mm_tiny.ckpt"
        torch.save(released_layout(adapter), path)
        return path
    if kind == "diffusers_safetensors":
        return save_safetensors(adapter.state_dict(), tmp_path / "adapter.safetensors")
    adapter.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "diffusers_safetensors", "diffusers_folder"])
def test_add_motion_module_reads_every_file_kind(kind, tmp_path, tiny_models):
    adapter = tiny_adapter(seed=5)
    path = _written(kind, adapter, tmp_path)
    # Heads are not in the weights: a folder's config.json gives them, bare files take hints.
    hints = None if kind == "diffusers_folder" else TINY_HINTS
    modules = add_motion_module(tiny_models, path, hints=hints)
    assert tiny_models.components["motion"] is modules and tiny_models.sources["motion"] == str(path)
    assert modules.config.num_heads == 2 and modules.config.mid_block
    expected = released_layout(adapter)
    got = modules.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_stored_config_wins(tmp_path, tiny_models):
    adapter = tiny_adapter()
    config = derive_motion_config(released_layout(adapter), {**TINY_HINTS, "norm_across_frames": True})
    path = save_safetensors(released_layout(adapter), tmp_path / "mm.safetensors",
                            metadata={"diffstudio": {"configs": {"motion": config.to_dict()}}})
    assert add_motion_module(tiny_models, path).config == config


def test_add_motion_module_refuses_what_does_not_fit(tmp_path, tiny_models):
    wide = MotionAdapter(**{**SETUPS["sd15_v2"][2], "block_out_channels": (64, 128)})
    path = save_safetensors(released_layout(wide), tmp_path / "wide.safetensors")
    with pytest.raises(MotionModuleMismatchError, match="widths"):
        add_motion_module(tiny_models, path, hints=TINY_HINTS)
    not_motion = save_safetensors({"decoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(MotionModuleMismatchError, match="not an AnimateDiff motion module"):
        add_motion_module(tiny_models, not_motion)
    extra = save_safetensors({**released_layout(tiny_adapter()), "other.weight": torch.zeros(1)},
                             tmp_path / "extra.safetensors")
    with pytest.raises(ConversionError, match="other.weight"):
        add_motion_module(tiny_models, extra, hints=TINY_HINTS)
    no_unet = Models(family=get_family("sd15"), components={"unet": torch.nn.Linear(2, 2)}, configs={})
    with pytest.raises(MotionModuleMismatchError, match="LDM UNet"):
        add_motion_module(no_unet, path)


def test_motion_state_dict_needs_no_hints_for_released_widths():
    """At released widths the conventions (8 heads, 32 groups) apply without hints."""
    with torch.device("meta"):
        adapter = MotionAdapter(**RELEASES["v3"])
    _, config = motion_state_dict(adapter.state_dict())
    assert config == MotionConfig(max_frames=32)
