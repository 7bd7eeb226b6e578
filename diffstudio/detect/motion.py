"""Recognise an AnimateDiff motion module file and derive its `MotionConfig` from names and shapes.

What shapes reveal: the levels and modules per level (``down_blocks.L.motion_modules.J`` counted;
the up side must mirror it with one more per level), each level's width (``temporal_transformer.norm``),
the middle module (v2), the depth (``transformer_blocks.K`` counted) and the frame positions
(``pos_encoder.pe``: (1, positions, width); 24 in v1, 32 later).

What they cannot reveal: the attention heads and GroupNorm groups (8 and 32 in every release) and
the GroupNorm convention (``norm_across_frames``); those come from ``hints`` or a stored config.
A file without position tables (they are fixed sinusoids) gets ``max_frames`` from the hints, else 32.

Release classes by structure (`motion_variant`): SDXL level widths (320, 640, 1280) -> "sdxl_beta"
(mm_sdxl_v10_beta); a middle module -> "v2" (mm_sd_v15_v2); 24 positions -> "v1" (mm_sd_v14 / v15);
otherwise "v3" (v3_sd15_mm). This names the layout, not the file: fine-tunes share their parent's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from diffstudio.errors import MotionModuleMismatchError, UnknownModelError
from diffstudio.models.motion import MotionConfig

MOTION_SENTINELS = (
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
    "down_blocks.0.motion_modules.0.temporal_transformer.proj_out.weight",
    "up_blocks.0.motion_modules.0.temporal_transformer.proj_out.weight",
)

MOTION_DIFFUSERS_SENTINELS = (
    "down_blocks.0.motion_modules.0.norm.weight",
    "down_blocks.0.motion_modules.0.proj_out.weight",
    "up_blocks.0.motion_modules.0.proj_out.weight",
)

_MODULE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.")
_DEPTH = re.compile(r"\.temporal_transformer\.transformer_blocks\.(\d+)\.")
_TT = "temporal_transformer"


def is_motion_layout(keys) -> str | None:
    """"original", "diffusers" or None: which motion-module layout a key set is in."""
    if all(k in keys for k in MOTION_SENTINELS):
        return "original"
    if all(k in keys for k in MOTION_DIFFUSERS_SENTINELS):
        return "diffusers"
    return None


def _counts(keys) -> dict[str, dict[int, int]]:
    """{"down_blocks"/"up_blocks": {level: modules}}, checking the indices have no gaps."""
    found: dict[str, dict[int, set[int]]] = {"down_blocks": {}, "up_blocks": {}}
    for k in keys:
        m = _MODULE.match(k)
        if m:
            found[m.group(1)].setdefault(int(m.group(2)), set()).add(int(m.group(3)))
    counts: dict[str, dict[int, int]] = {}
    for part, levels in found.items():
        if sorted(levels) != list(range(len(levels))) or any(v != set(range(len(v))) for v in levels.values()):
            shown = {level: sorted(v) for level, v in sorted(levels.items())}
            raise UnknownModelError(f"motion module {part} indices are not consecutive ({shown}); the file is "
                                    "truncated or not an AnimateDiff motion module")
        counts[part] = {level: len(v) for level, v in levels.items()}
    return counts


def derive_motion_config(sd: Mapping, hints: Mapping | None = None) -> MotionConfig:
    """Released-layout motion modules (names + shapes) -> MotionConfig. See the module docstring."""
    hints = dict(hints or {})
    missing = [k for k in MOTION_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an AnimateDiff motion module in the released layout: missing {missing}; "
                                "a diffusers MotionAdapter goes through convert.motion.motion_from_diffusers")
    keys = list(sd.keys())
    counts = _counts(keys)
    levels = len(counts["down_blocks"])
    per_level = [counts["down_blocks"][i] for i in range(levels)]
    mirrored = {u: per_level[levels - 1 - u] + 1 for u in range(levels)}
    if counts["up_blocks"] != mirrored:
        raise UnknownModelError(f"motion module up_blocks hold {counts['up_blocks']} modules per level; the down "
                                f"side ({per_level}) implies {mirrored}. Not an AnimateDiff motion module.")
    widths = [int(sd[f"down_blocks.{i}.motion_modules.0.{_TT}.norm.weight"].shape[0]) for i in range(levels)]
    depths = {int(m.group(1)) + 1 for k in keys if (m := _DEPTH.search(k))}
    depth = max(depths) if depths else 0
    for prefix in {k.split(f".{_TT}.")[0] for k in keys if f".{_TT}." in k}:
        own = {int(m.group(1)) for k in keys if k.startswith(prefix + ".") and (m := _DEPTH.search(k))}
        if own != set(range(depth)):
            raise UnknownModelError(f"{prefix} has transformer blocks {sorted(own)}, others have {depth}; "
                                    "motion modules of unequal depth are not supported")
    pe = next((sd[k] for k in keys if k.endswith("pos_encoder.pe")), None)
    max_frames = int(pe.shape[1]) if pe is not None else int(hints.get("max_frames", 32))
    return MotionConfig(level_channels=widths, modules_per_level=per_level,
                        mid_block=f"mid_block.motion_modules.0.{_TT}.norm.weight" in sd,
                        max_frames=max_frames, num_heads=int(hints.get("num_heads", 8)), transformer_depth=depth,
                        norm_groups=int(hints.get("norm_groups", 32)),
                        norm_across_frames=bool(hints.get("norm_across_frames", False)))


def motion_variant(config: MotionConfig) -> str:
    """The release class whose layout `config` has (module docstring)."""
    if config.level_channels == [320, 640, 1280]:
        return "sdxl_beta"
    if config.mid_block:
        return "v2"
    return "v1" if config.max_frames == 24 else "v3"


def config_from_diffusers(config_json: Mapping) -> MotionConfig:
    """A diffusers ``MotionAdapter`` config.json -> MotionConfig."""
    cfg = dict(config_json)
    if cfg.get("conv_in_channels"):
        raise MotionModuleMismatchError(f"this MotionAdapter has an input convolution (conv_in_channels="
                                        f"{cfg['conv_in_channels']}: PIA / SparseCtrl-style); diffstudio loads plain "
                                        "AnimateDiff motion modules only")
    widths = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    per_level = cfg.get("motion_layers_per_block", 2)
    heads = cfg.get("motion_num_attention_heads", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise MotionModuleMismatchError(f"MotionAdapter heads vary per level ({heads}); not supported")
        heads = heads[0]
    depth = cfg.get("motion_transformer_layers_per_block", 1)
    mid_depth = cfg.get("motion_transformer_layers_per_mid_block", 1)
    flat = {d for d in (depth if isinstance(depth, (list, tuple)) else [depth])} | \
        {d for d in (mid_depth if isinstance(mid_depth, (list, tuple)) else [mid_depth])}
    if len(flat) != 1 or int(cfg.get("motion_mid_block_layers_per_block", 1)) != 1:
        raise MotionModuleMismatchError(f"MotionAdapter with unequal transformer depths {sorted(flat)} or several "
                                        "middle modules is not supported")
    return MotionConfig(level_channels=widths,
                        modules_per_level=list(per_level) if isinstance(per_level, (list, tuple)) else per_level,
                        mid_block=bool(cfg.get("use_motion_mid_block", True)),
                        max_frames=int(cfg.get("motion_max_seq_length", 32)), num_heads=int(heads),
                        transformer_depth=int(flat.pop()), norm_groups=int(cfg.get("motion_norm_num_groups", 32)))


def stored_motion_config(metadata: Mapping | None) -> MotionConfig | None:
    """A config stored with the weights: diffstudio's own metadata, else a MotionAdapter config.json."""
    if not metadata:
        return None
    if "diffstudio" in metadata:
        data = metadata["diffstudio"]
        data = json.loads(data) if isinstance(data, str) else data
        stored = data.get("configs", {}).get("motion")
        if stored is not None:
            return MotionConfig.from_dict(stored)
    if "config" in metadata:
        data = metadata["config"]
        data = json.loads(data) if isinstance(data, str) else data
        if data.get("_class_name") == "MotionAdapter":
            return config_from_diffusers(data)
    return None
