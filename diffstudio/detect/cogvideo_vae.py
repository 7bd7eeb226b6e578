"""Recognise the CogVideoX causal 3D VAE and derive its `CogVideoXVAEConfig` from key names and shapes.

The canonical layout is diffusers' (``AutoencoderKLCogVideoX``), the one in the released ``vae/`` folders, so a
``vae/diffusion_pytorch_model.safetensors`` loads as it is and a combined file under ``vae.`` after stripping
the prefix. Only names and shapes are read (meta tensors work). Shapes cannot reveal the GroupNorm group count
(32 as released) nor how many levels resample time (none of that has weights; 4x as released): both come
from `hints`, else the release's values.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError
from diffstudio.models.cogvideo_vae import CogVideoXVAEConfig

# The latent-conditioned norm (`norm1.conv_y`) and the causal conv wrapper (`.conv.`) set it apart from the
# 2D LDM VAE and from other 3D VAEs (HunyuanVideo's has `conv_in.conv` but no spatial norm).
COGVIDEOX_VAE_SENTINELS = (
    "decoder.conv_in.conv.weight",
    "decoder.mid_block.resnets.0.norm1.conv_y.conv.weight",
    "decoder.up_blocks.0.resnets.0.conv1.conv.weight",
    "decoder.conv_out.conv.weight",
)

RELEASED_NORM_GROUPS = 32
RELEASED_TEMPORAL_COMPRESSION = 4


def _out(sd: Mapping, key: str) -> int:
    return int(sd[key].shape[0])


def derive_cogvideox_vae_config(sd: Mapping, hints: Mapping | None = None) -> CogVideoXVAEConfig:
    """Canonical state dict (names + shapes) -> CogVideoXVAEConfig.

    Widths: `decoder.up_blocks.N.resnets.0.conv1` outputs level N's width, lowest resolution first. Depth: the
    decoder has `layers_per_block + 1` resnets per level. Latent channels: inputs of `decoder.conv_in`.
    """
    hints = dict(hints or {})
    missing = [k for k in COGVIDEOX_VAE_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a CogVideoX VAE state dict: missing {missing}. Strip the 'vae.' prefix "
                                "first; the keys must be in diffusers' AutoencoderKLCogVideoX layout.")
    keys = list(sd)
    levels = count_indices(keys, "decoder.up_blocks")
    widths = [_out(sd, f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight") for i in reversed(range(levels))]
    layers = count_indices(keys, "decoder.up_blocks.0.resnets") - 1
    latent = int(sd["decoder.conv_in.conv.weight"].shape[1])
    in_channels = int(sd["decoder.conv_out.conv.weight"].shape[0])
    if "encoder.conv_in.conv.weight" in sd:
        in_channels = int(sd["encoder.conv_in.conv.weight"].shape[1])
        moments = _out(sd, "encoder.conv_out.conv.weight")
        if moments != 2 * latent:
            raise UnknownModelError(f"encoder.conv_out has {moments} outputs for {latent} latent channels "
                                    f"(expected {2 * latent}: mean and log-variance); the file looks damaged.")
        enc_layers = count_indices(keys, "encoder.down_blocks.0.resnets")
        if enc_layers != layers:
            raise UnknownModelError(f"the encoder has {enc_layers} resnets per level and the decoder {layers + 1}; "
                                    "a CogVideoX VAE has exactly one more in the decoder.")
    groups = int(hints.get("norm_groups", RELEASED_NORM_GROUPS))
    if any(w % groups for w in widths):
        raise UnknownModelError(f"VAE widths {widths} are not divisible by {groups} GroupNorm groups; pass the "
                                f"model's group count as hints={{'norm_groups': N}} (its config.json has it).")
    return CogVideoXVAEConfig(
        in_channels=in_channels,
        out_channels=int(sd["decoder.conv_out.conv.weight"].shape[0]),
        latent_channels=latent,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        norm_groups=groups,
        temporal_compression=int(hints.get("temporal_compression", RELEASED_TEMPORAL_COMPRESSION)),
    )


def config_from_diffusers(config_json: Mapping) -> CogVideoXVAEConfig:
    """A diffusers `AutoencoderKLCogVideoX` config.json dict -> CogVideoXVAEConfig.

    The latent scaling (`scaling_factor`: 1.15258426 for 2B, 0.7 for 5B; `invert_scale_latents` for 1.5) is the
    caller's (the family's latent format), not part of this config.
    """
    cfg = dict(config_json)
    blocks = list(cfg.get("down_block_types", ())) + list(cfg.get("up_block_types", ()))
    unsupported = [t for t in blocks if t not in ("CogVideoXDownBlock3D", "CogVideoXUpBlock3D")]
    if unsupported or cfg.get("act_fn", "silu") != "silu":
        raise UnknownModelError(f"VAE config with block types {unsupported or 'standard'} and act_fn "
                                f"{cfg.get('act_fn', 'silu')!r} is not a CogVideoX VAE layout diffstudio knows.")
    if cfg.get("use_quant_conv") or cfg.get("use_post_quant_conv"):
        raise UnknownModelError("CogVideoX VAE config with quant_conv / post_quant_conv: no released CogVideoX "
                                "VAE has them and diffstudio does not support them.")
    if float(cfg.get("norm_eps", 1e-6)) != 1e-6:
        raise UnknownModelError(f"CogVideoX VAE config with norm_eps {cfg['norm_eps']}: only the released 1e-6 "
                                "is supported.")
    return CogVideoXVAEConfig(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 16)),
        block_out_channels=tuple(int(w) for w in cfg.get("block_out_channels", (128, 256, 256, 512))),
        layers_per_block=int(cfg.get("layers_per_block", 3)),
        norm_groups=int(cfg.get("norm_num_groups", RELEASED_NORM_GROUPS)),
        temporal_compression=int(cfg.get("temporal_compression_ratio", RELEASED_TEMPORAL_COMPRESSION)),
    )
