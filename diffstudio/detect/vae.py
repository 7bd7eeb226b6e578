"""Recognise an LDM AutoencoderKL and derive its `VAEConfig` from key names and tensor shapes.

Only names and shapes are read, so meta tensors and lazily loaded safetensors work. What shapes
cannot reveal (the number of GroupNorm groups) comes from `hints`, else the LDM convention (32).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import UnknownModelError
from diffstudio.models.vae import VAEConfig

# Key prefixes under which released single files bundle the VAE (strip these, nothing else).
VAE_PREFIXES = ("first_stage_model.", "vae.")

# Canonical (LDM) keys that identify the VAE. Decoder keys only, so decoder-only files are found too.
VAE_SENTINELS = (
    "decoder.conv_in.weight",
    "decoder.mid.block_1.conv1.weight",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.conv_out.weight",
)

VAE_DIFFUSERS_SENTINELS = (
    "decoder.conv_in.weight",
    "decoder.mid_block.resnets.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.conv_out.weight",
)


def count_indices(keys, prefix: str) -> int:
    """Number of consecutive integer children `prefix.N.` among `keys` (0, 1, ... without gaps)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def derive_vae_config(sd: Mapping, hints: Mapping | None = None) -> VAEConfig:
    """Canonical state dict (names + shapes) -> VAEConfig.

    Widths: `decoder.up.N.block.0.conv2` has level N's `block_out_channels[N]` outputs (any widths, multiples
    of the first or not). Depth: the decoder has `num_res_blocks + 1` blocks per level. Latent channels:
    inputs of `decoder.conv_in`.
    """
    hints = dict(hints or {})
    missing = [k for k in VAE_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an LDM AutoencoderKL state dict: missing {missing}. Strip the "
                                f"'first_stage_model.' or 'vae.' prefix first; a diffusers-layout VAE "
                                f"goes through diffstudio.convert.vae.vae_from_diffusers.")
    keys = list(sd.keys())
    levels = count_indices(keys, "decoder.up")
    widths = [int(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    dec_blocks = count_indices(keys, "decoder.up.0.block")
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    has_encoder = "encoder.conv_in.weight" in sd
    if has_encoder:
        z_out = int(sd["encoder.conv_out.weight"].shape[0])
        if z_out not in (latent, 2 * latent):
            raise UnknownModelError(f"encoder.conv_out has {z_out} outputs for {latent} latent channels "
                                    f"(expected {latent} or {2 * latent}); the file looks damaged.")
        if int(sd["encoder.conv_in.weight"].shape[0]) != widths[0]:
            raise UnknownModelError(f"encoder.conv_in has {int(sd['encoder.conv_in.weight'].shape[0])} outputs but "
                                    f"the first level is {widths[0]} wide; this is not an LDM AutoencoderKL "
                                    "layout diffstudio knows.")
        enc_blocks = count_indices(keys, "encoder.down.0.block")
        if enc_blocks != dec_blocks - 1:
            raise UnknownModelError(f"encoder has {enc_blocks} blocks per level but the decoder "
                                    f"{dec_blocks}; an LDM VAE has exactly one more in the decoder.")
    groups = int(hints.get("norm_groups", 32))
    if any(w % groups for w in widths):
        raise UnknownModelError(f"VAE widths {widths} are not divisible by {groups} GroupNorm groups; "
                                f"pass the model's group count as hints={{'norm_groups': N}} (a config "
                                f"stored with the weights carries it).")
    return VAEConfig(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]) if has_encoder else
        int(sd["decoder.conv_out.weight"].shape[0]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        latent_channels=latent,
        block_out_channels=tuple(widths),
        num_res_blocks=dec_blocks - 1,
        double_z=(z_out == 2 * latent) if has_encoder else True,
        use_quant_conv="post_quant_conv.weight" in sd or "quant_conv.weight" in sd,
        mid_attention="decoder.mid.attn_1.q.weight" in sd,
        norm_groups=groups,
    )


def config_from_diffusers(config_json: Mapping) -> VAEConfig:
    """A diffusers `AutoencoderKL` config.json dict -> VAEConfig."""
    cfg = dict(config_json)
    widths = [int(c) for c in cfg.get("block_out_channels", (64,))]
    unsupported = [t for t in list(cfg.get("down_block_types", ())) + list(cfg.get("up_block_types", ()))
                   if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
    if unsupported or cfg.get("act_fn", "silu") != "silu":
        raise UnknownModelError(f"diffusers VAE config with block types {unsupported or 'standard'} and "
                                f"act_fn {cfg.get('act_fn', 'silu')!r} is not an LDM AutoencoderKL; only the "
                                "SD/SDXL/SD3/FLUX layout (DownEncoderBlock2D / UpDecoderBlock2D, silu) is supported.")
    use_quant = bool(cfg.get("use_quant_conv", True))
    if use_quant != bool(cfg.get("use_post_quant_conv", True)):
        raise UnknownModelError("diffusers VAE config has only one of quant_conv / post_quant_conv; "
                                "diffstudio supports both or neither (as in every released VAE).")
    return VAEConfig(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=tuple(widths),
        num_res_blocks=int(cfg.get("layers_per_block", 1)),
        double_z=True,
        use_quant_conv=use_quant,
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
    )
