"""Full-size checks on the meta device: every tensor of a real checkpoint's key set finds its place."""

from __future__ import annotations

import torch


def assert_every_key_maps(sd: dict, det) -> None:
    """Each detected component's canonical keys are exactly our module's, with the same shapes."""
    from diffstudio.components import ARCHS
    from diffstudio.convert.clip import to_installed_transformers_layout
    from diffstudio.loader import canonical_state_dict

    for role, comp in det.components.items():
        with torch.device("meta"):
            ours = ARCHS[comp.arch].build(comp.config)
        theirs = canonical_state_dict(sd, comp)
        if comp.arch == "clip_text":
            theirs = to_installed_transformers_layout(theirs, ours)
        ours_sd = {k: v for k, v in ours.state_dict().items() if not k.endswith("position_ids")}
        theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
        assert set(ours_sd) == set(theirs), role
        assert all(ours_sd[k].shape == theirs[k].shape for k in ours_sd), role
