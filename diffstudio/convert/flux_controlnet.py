"""FLUX ControlNet state dicts: diffusers ``FluxControlNetModel`` (InstantX's release layout) <-> ours, and
XLabs' ControlNets: diffusers ``FluxControlNetModel`` with a pixel-space hint encoder <-> x-flux's names.

Ours keeps BFL's names for everything the ControlNet shares with the transformer (``img_in``,
``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` ...), converted by the transformer's rules
(``convert.flux.trunk_rules``: fused qkv, the QK-norm ``scale``), and the release's own names for the parts
only a ControlNet has: ``controlnet_x_embedder``, ``controlnet_blocks.N``, ``controlnet_single_blocks.N``,
``controlnet_mode_embedder`` (union). Both directions end in ``check_conversion`` against our model built
on the meta device.

XLabs' canonical names are x-flux's: the trunk in BFL's names as above, ``controlnet_blocks.N``,
``pos_embed_input`` (diffusers: ``controlnet_x_embedder``) and cldm's ``input_hint_block.{0, 2, ..., 14}``
(diffusers: ``input_hint_block.conv_in``, ``.blocks.0 .. 5``, ``.conv_out``, the UNet ControlNet's map).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.controlnet import hint_block_pairs
from diffstudio.convert.flux import trunk_layout, trunk_rules
from diffstudio.convert.rules import Rule, from_canonical, rule, same, to_canonical
from diffstudio.errors import UnknownModelError
from diffstudio.models.flux_controlnet import FluxControlNet, FluxControlNetConfig, XLabsFluxControlNet

# A pixel-space hint encoder (diffusers' conditioning_embedding_channels option), which the InstantX releases
# do not have: their control image enters as its VAE latent.
PIXEL_HINT_PREFIX = "input_hint_block."


def rules(config: FluxControlNetConfig) -> list[Rule]:
    own = ["controlnet_x_embedder", *(f"controlnet_blocks.{i}" for i in range(config.depth)),
           *(f"controlnet_single_blocks.{i}" for i in range(config.depth_single_blocks))]
    if config.num_modes:
        own.append("controlnet_mode_embedder")
    return trunk_rules(config) + same(*own)


def refuse_pixel_hints(sd: Mapping) -> None:
    if any(k.startswith(PIXEL_HINT_PREFIX) for k in sd):
        raise UnknownModelError("this FLUX ControlNet encodes its control image in pixel space (input_hint_block, "
                                "diffusers' conditioning_embedding_channels); diffstudio's FLUX ControlNets read the "
                                "control image's VAE latent, as InstantX's do")


def layout_config(sd: Mapping) -> FluxControlNetConfig:
    """The structure a diffusers-layout FluxControlNetModel state dict implies (names and shapes; the RoPE
    split is a placeholder, as in ``convert.flux.layout_config``): enough to generate the rules."""
    refuse_pixel_hints(sd)
    from diffstudio.detect.flux_controlnet import extra_condition_channels

    modes = sd.get("controlnet_mode_embedder.weight")
    trunk = trunk_layout(sd, "FluxControlNetModel")
    return FluxControlNetConfig(**trunk, num_modes=None if modes is None else int(modes.shape[0]),
                                extra_condition_channels=extra_condition_channels(sd, trunk["in_channels"]))


def _meta_state_dict(config: FluxControlNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return FluxControlNet(config).state_dict()


def flux_controlnet_from_diffusers(sd: Mapping, config: FluxControlNetConfig | None = None) -> dict[str, torch.Tensor]:
    """diffusers FluxControlNetModel state dict -> our layout (checked)."""
    config = config or layout_config(sd)
    return to_canonical("FLUX ControlNet diffusers -> ours", sd, rules(config), _meta_state_dict(config))


def flux_controlnet_to_diffusers(sd: Mapping, config: FluxControlNetConfig) -> dict[str, torch.Tensor]:
    """Our layout -> diffusers FluxControlNetModel (checked)."""
    return from_canonical("FLUX ControlNet ours -> diffusers", sd, rules(config), _meta_state_dict(config))



# -- XLabs ----------------------------------------------------------------------------------------------------

XLABS_HINT_STAGES = 4  # x-flux's input_hint_block: 16 channels, three stride-2 stages


def xlabs_rules(config: FluxControlNetConfig) -> list[Rule]:
    hint = [rule(ours, theirs) for ours, theirs in hint_block_pairs(PIXEL_HINT_PREFIX[:-1], XLABS_HINT_STAGES)]
    return (trunk_rules(config) + same(*(f"controlnet_blocks.{i}" for i in range(config.depth)))
            + [rule("pos_embed_input", "controlnet_x_embedder"), *hint])


def xlabs_layout_config(sd: Mapping) -> FluxControlNetConfig:
    """The structure a diffusers-layout XLabs ControlNet implies (see ``layout_config``)."""
    if f"{PIXEL_HINT_PREFIX}conv_in.weight" not in sd:
        raise UnknownModelError("not an XLabs FLUX ControlNet in diffusers' layout: no input_hint_block.conv_in")
    return FluxControlNetConfig(**trunk_layout(sd, "FluxControlNetModel"),
                                hint_channels=int(sd[f"{PIXEL_HINT_PREFIX}conv_in.weight"].shape[1]))


def _xlabs_meta_state_dict(config: FluxControlNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return XLabsFluxControlNet(config).state_dict()


def xlabs_controlnet_from_diffusers(sd: Mapping, config: FluxControlNetConfig | None = None) -> dict[str, torch.Tensor]:
    """diffusers FluxControlNetModel with a pixel-space hint encoder -> x-flux's names (checked)."""
    config = config or xlabs_layout_config(sd)
    return to_canonical("XLabs FLUX ControlNet diffusers -> x-flux", sd, xlabs_rules(config),
                        _xlabs_meta_state_dict(config))


def xlabs_controlnet_to_diffusers(sd: Mapping, config: FluxControlNetConfig) -> dict[str, torch.Tensor]:
    return from_canonical("XLabs FLUX ControlNet x-flux -> diffusers", sd, xlabs_rules(config),
                          _xlabs_meta_state_dict(config))
