"""AutoencoderKL state dicts: diffusers layout <-> the original LDM layout (our canonical names).

The map is generated from the structure (number of levels and blocks per level, counted from the
keys or taken from the config), level by level; only the per-layer vocabulary below differs.
Two reshapes: diffusers' attention projections are Linear layers (2-D weights, (C, C)), LDM's are
1x1 convs (4-D, (C, C, 1, 1)). Older diffusers files name them query/key/value/proj_attn.
Every conversion ends in a check (every key consumed, none missing, every shape equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch

from diffstudio.detect.vae import count_indices, derive_vae_config
from diffstudio.errors import ConversionError
from diffstudio.models.vae import AutoencoderKL, VAEConfig

# Per-layer vocabulary: canonical leaf -> diffusers leaf (alternatives: older diffusers names).
RESNET_LEAVES = {"norm1": ("norm1",), "conv1": ("conv1",), "norm2": ("norm2",), "conv2": ("conv2",),
                 "nin_shortcut": ("conv_shortcut",)}
ATTN_LEAVES = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
               "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn")}
ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")  # 1x1 conv in LDM, Linear in diffusers


def _module_pairs(levels: int, num_res_blocks: int) -> Iterator[tuple[str, str, dict]]:
    """(canonical module, diffusers module, leaf vocabulary) for every module of the autoencoder."""
    plain = {"": ("",)}
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_in", f"{side}.conv_in", plain
        yield f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", RESNET_LEAVES
        yield f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", ATTN_LEAVES
        yield f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", RESNET_LEAVES
        yield f"{side}.norm_out", f"{side}.conv_norm_out", plain
        yield f"{side}.conv_out", f"{side}.conv_out", plain
        for level in range(levels):
            if side == "encoder":
                ours, theirs, blocks = f"encoder.down.{level}", f"encoder.down_blocks.{level}", num_res_blocks
                resample = ("downsample", "downsamplers.0")
            else:
                # diffusers orders decoder levels from low to high resolution; LDM the other way.
                ours, theirs = f"decoder.up.{level}", f"decoder.up_blocks.{levels - 1 - level}"
                blocks, resample = num_res_blocks + 1, ("upsample", "upsamplers.0")
            for j in range(blocks):
                yield f"{ours}.block.{j}", f"{theirs}.resnets.{j}", RESNET_LEAVES
            yield f"{ours}.{resample[0]}.conv", f"{theirs}.{resample[1]}.conv", plain
    yield "quant_conv", "quant_conv", plain
    yield "post_quant_conv", "post_quant_conv", plain


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _param_pairs(levels: int, num_res_blocks: int) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(canonical key, diffusers key alternatives, is an attention projection weight)."""
    for ours, theirs, leaves in _module_pairs(levels, num_res_blocks):
        for leaf, alternatives in leaves.items():
            for param in ("weight", "bias"):
                projection = leaves is ATTN_LEAVES and leaf in ATTN_PROJECTIONS and param == "weight"
                yield (_join(ours, leaf, param), tuple(_join(theirs, alt, param) for alt in alternatives),
                       projection)


def _check(source: Mapping, consumed: set, result: Mapping, expected: Mapping, what: str) -> None:
    """Every source key consumed, every expected key produced, no extra keys, every shape equal."""
    unconsumed = sorted(set(source) - consumed)
    missing = sorted(set(expected) - set(result))
    extra = sorted(set(result) - set(expected))
    bad_shapes = [f"{k}: {tuple(result[k].shape)} != {tuple(expected[k].shape)}"
                  for k in result if k in expected and tuple(result[k].shape) != tuple(expected[k].shape)]
    if unconsumed or missing or extra or bad_shapes:
        def head(items):
            return f"{items[:5]}{' ...' if len(items) > 5 else ''}"
        raise ConversionError(
            f"{what}: {len(unconsumed)} keys not consumed {head(unconsumed)}, {len(missing)} missing "
            f"{head(missing)}, {len(extra)} unexpected {head(extra)}, {len(bad_shapes)} shape mismatches "
            f"{head(bad_shapes)}. Check that the file is a complete AutoencoderKL (strip any "
            f"'first_stage_model.' / 'vae.' prefix) and report the layout if it is a released one.")


def _meta_state_dict(config: VAEConfig, with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Names and shapes our model expects; without the encoder half for decoder-only files."""
    config = dataclasses.replace(config, norm_groups=1)  # groups change no name or shape
    with torch.device("meta"):
        sd = AutoencoderKL(config).state_dict()
    if not with_encoder:
        sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    return sd


def vae_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> canonical (LDM) state dict."""
    keys = list(sd.keys())
    levels = count_indices(keys, "decoder.up_blocks")
    num_res_blocks = count_indices(keys, "decoder.up_blocks.0.resnets") - 1
    if levels == 0 or num_res_blocks < 1:
        raise ConversionError("no diffusers decoder.up_blocks.N.resnets.M keys found: this is not a "
                              "diffusers AutoencoderKL state dict (is it already in the LDM layout?).")
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for ours, alternatives, projection in _param_pairs(levels, num_res_blocks):
        theirs = next((k for k in alternatives if k in sd), None)
        if theirs is None:
            continue
        tensor = sd[theirs]
        if projection and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[ours] = tensor
        consumed.add(theirs)
    derived = derive_vae_config(out, {"norm_groups": 1})  # groups change no name or shape
    expected = _meta_state_dict(derived, with_encoder="encoder.conv_in.weight" in out)
    _check(sd, consumed, out, expected, "diffusers -> LDM VAE conversion")
    return out


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Canonical (LDM) state dict -> diffusers AutoencoderKL state dict (current names, Linear attention)."""
    levels, num_res_blocks = len(config.channel_mult), config.num_res_blocks
    pairs = list(_param_pairs(levels, num_res_blocks))

    def rename(source: Mapping[str, torch.Tensor]) -> tuple[dict, set]:
        out, consumed = {}, set()
        for ours, alternatives, projection in pairs:
            if ours in source:
                tensor = source[ours]
                if projection and tensor.ndim == 4:
                    tensor = tensor[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
                out[alternatives[0]] = tensor
                consumed.add(ours)
        return out, consumed

    out, consumed = rename(sd)
    expected, _ = rename(_meta_state_dict(config, with_encoder="encoder.conv_in.weight" in sd))
    _check(sd, consumed, out, expected, "LDM -> diffusers VAE conversion")
    return out
