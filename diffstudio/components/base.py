"""`ComponentArch`: what diffstudio knows about one architecture of weight block.

A family record (``diffstudio/families``) says *which* components a model has and where their keys live;
a ``ComponentArch`` says how to recognise one block of keys, derive its config from shapes, build the
module and convert other layouts to ours. Each architecture's record is one module of this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentArch:
    name: str
    sentinels: tuple[str, ...]  # canonical keys that identify it
    diffusers_sentinels: tuple[str, ...]  # the same in the other layout (`other_layout`)
    derive_config: Callable  # (state_dict, hints) -> config
    config_from_diffusers: Callable  # (config.json dict) -> config
    build: Callable  # (config) -> nn.Module
    from_diffusers: Callable  # (diffusers state dict) -> canonical state dict
    to_diffusers: Callable  # (canonical state dict, config) -> diffusers state dict
    config_to_dict: Callable  # config -> JSON-able dict
    config_from_dict: Callable  # JSON dict -> config
    # True when from_diffusers also normalises canonical input (CLIP: drops position_ids, adds
    # the `text_model.` level transformers 5 leaves out), so it is applied to every layout.
    normalise_always: bool = False
    # Whose module paths kohya-format LoRA keys use for this architecture: "diffusers" (sd-scripts
    # trains SD 1.x / SDXL UNets as diffusers modules) or "original" (our canonical names: DiTs, CLIP).
    kohya_layout: str = "original"
    # What `diffusers_sentinels` / `from_diffusers` read, as `diffstudio info` names it: "diffusers",
    # or "openclip" for CLIP text encoders (their non-canonical layout in single files).
    other_layout: str = "diffusers"

    def to_canonical(self, sd: Mapping) -> dict:
        """A state dict in any layout this architecture knows -> canonical keys."""
        if self.is_canonical(sd) and not self.normalise_always:
            return dict(sd)
        return self.from_diffusers(sd)

    def is_canonical(self, keys: Mapping | set) -> bool:
        return all(k in keys for k in self.sentinels)

    def is_diffusers(self, keys: Mapping | set) -> bool:
        return all(k in keys for k in self.diffusers_sentinels)

    def missing_sentinels(self, keys: Mapping | set) -> list[str]:
        return [k for k in self.sentinels if k not in keys]


def dataclass_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_to_dict(config) -> dict:
    """A transformers config (or any config with ``to_dict``) -> JSON-able dict."""
    return config.to_dict()


def unchanged(sd: Mapping, config) -> dict:
    """`to_diffusers` of an architecture with one layout (the transformers one)."""
    return dict(sd)
