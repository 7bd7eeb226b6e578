"""The ExVideo-SVD extension (position tables + 3x3x3 convolutions + fine-tuned temporal blocks for the SVD UNet):
an add-on grafted onto a loaded SVD UNet (``exvideo_loading.graft_exvideo``). Canonical = the released file's
names (DiffSynth-Studio's ``blocks.<i>...``); there is no other layout."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.detect.exvideo import EXVIDEO_SENTINELS, derive_exvideo_config
from diffstudio.models.exvideo_file import ExVideoConfig, ExVideoPatch


def _same_layout(sd, config=None) -> dict:
    return dict(sd)


ARCH = ComponentArch(
    name="exvideo_svd",
    sentinels=EXVIDEO_SENTINELS,
    diffusers_sentinels=EXVIDEO_SENTINELS,
    derive_config=derive_exvideo_config,
    config_from_diffusers=ExVideoConfig.from_dict,
    build=ExVideoPatch,
    from_diffusers=_same_layout,
    to_diffusers=_same_layout,
    config_to_dict=lambda config: config.to_dict(),
    config_from_dict=ExVideoConfig.from_dict,
)
