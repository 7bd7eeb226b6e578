"""Recognise the SVD autoencoder (an LDM VAE whose decoder has temporal blocks) and derive its config.

Told apart from the image VAE by the decoder's temporal layers: ``time_stack`` blocks next to every ResNet
block and the 3x1x1 ``conv_out.time_mix_conv``. Widths, depth and latent channels are read as for the image
VAE (``detect.vae.derive_vae_config``); the temporal kernel from ``time_mix_conv``'s shape.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.detect.vae import derive_vae_config
from diffstudio.errors import UnknownModelError
from diffstudio.models.svd_vae import TemporalVAEConfig

TEMPORAL_VAE_SENTINELS = (
    "decoder.conv_in.weight",
    "decoder.mid.block_1.time_stack.in_layers.2.weight",
    "decoder.up.0.block.0.mix_factor",
    "decoder.conv_out.time_mix_conv.weight",
)

TEMPORAL_VAE_DIFFUSERS_SENTINELS = (
    "decoder.conv_in.weight",
    "decoder.mid_block.resnets.0.temporal_res_block.conv1.weight",
    "decoder.up_blocks.0.resnets.0.time_mixer.mix_factor",
    "decoder.time_conv_out.weight",
)


def derive_temporal_vae_config(sd: Mapping, hints: Mapping | None = None) -> TemporalVAEConfig:
    """Canonical state dict (names + shapes) -> TemporalVAEConfig."""
    missing = [k for k in TEMPORAL_VAE_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an SVD temporal VAE state dict: missing {missing}. Strip the "
                                "'first_stage_model.' prefix first; a diffusers AutoencoderKLTemporalDecoder goes "
                                "through diffstudio.convert.svd_vae.temporal_vae_from_diffusers.")
    image = derive_vae_config(sd, hints)
    return TemporalVAEConfig(
        in_channels=image.in_channels, out_channels=image.out_channels, latent_channels=image.latent_channels,
        block_out_channels=image.block_out_channels, num_res_blocks=image.num_res_blocks,
        use_quant_conv="quant_conv.weight" in sd, has_encoder="encoder.conv_in.weight" in sd,
        time_kernel=int(sd["decoder.conv_out.time_mix_conv.weight"].shape[2]), norm_groups=image.norm_groups)


def config_from_diffusers(config_json: Mapping) -> TemporalVAEConfig:
    """A diffusers ``AutoencoderKLTemporalDecoder`` config.json dict -> TemporalVAEConfig (diffusers fixes
    32 groups and a temporal kernel of 3, and always has quant_conv)."""
    cfg = dict(config_json)
    if cfg.get("_class_name", "AutoencoderKLTemporalDecoder") != "AutoencoderKLTemporalDecoder":
        raise UnknownModelError(f"a {cfg['_class_name']} config is not the SVD temporal VAE "
                                "(AutoencoderKLTemporalDecoder)")
    return TemporalVAEConfig(
        in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", (64,))),
        num_res_blocks=int(cfg.get("layers_per_block", 1)), use_quant_conv=True)
