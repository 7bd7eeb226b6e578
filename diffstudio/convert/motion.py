"""AnimateDiff motion modules: released layout <-> diffusers ``MotionAdapter`` layout.

The two layouts differ only inside each motion module, so the map is a rename of each key's tail
(no structure to count):

    released (canonical)                                   diffusers MotionAdapter
    <site>.temporal_transformer.norm / proj_in / proj_out  <site>.norm / proj_in / proj_out
    ...transformer_blocks.K.attention_blocks.0.to_q ...    ...transformer_blocks.K.attn1.to_q ...
    ...transformer_blocks.K.attention_blocks.1.*           ...transformer_blocks.K.attn2.*
    ...transformer_blocks.K.norms.0 / norms.1 / ff_norm    ...transformer_blocks.K.norm1 / norm2 / norm3
    ...transformer_blocks.K.ff.net.0.proj / ff.net.2       (same)
    ...attention_blocks.0.pos_encoder.pe and               ...transformer_blocks.K.pos_embed.pe
    ...attention_blocks.1.pos_encoder.pe (equal tables)    (one table, added before both attentions)

where <site> is ``down_blocks.L.motion_modules.J``, ``mid_block.motion_modules.0`` or
``up_blocks.U.motion_modules.J``. The position tables are fixed sinusoids, not learned; files
without them (diffusers' single-file converter drops them) get them back from `complete_positions`.
Both directions end with `check_conversion` against a model built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.errors import ConversionError
from diffstudio.models.motion import MotionConfig, MotionModules, sinusoidal_positions

_SITE = r"(?:(?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+)"
_ORIGINAL = re.compile(rf"^({_SITE})\.temporal_transformer\.(.+)$")
_DIFFUSERS = re.compile(rf"^({_SITE})\.(.+)$")
_BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.(.+)$")

# Inside a transformer block: released name -> diffusers name (prefix rewrites, in this order).
_BLOCK_RENAMES = (("attention_blocks.0.pos_encoder.pe", "pos_embed.pe"), ("attention_blocks.0.", "attn1."),
                  ("attention_blocks.1.", "attn2."), ("norms.0.", "norm1."), ("norms.1.", "norm2."),
                  ("ff_norm.", "norm3."))
_SECOND_TABLE = "attention_blocks.1.pos_encoder.pe"  # released only: a copy of the first block's table


def _rename_tail(tail: str, renames) -> str:
    m = _BLOCK.match(tail)
    if not m:
        return tail  # norm, proj_in, proj_out
    block, rest = m.groups()
    for old, new in renames:
        if rest == old or (old.endswith(".") and rest.startswith(old)):
            return f"{block}.{new}{rest[len(old):]}"
    return tail


def _meta_shapes(config: MotionConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MotionModules(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def motion_to_diffusers(sd: Mapping, config: MotionConfig) -> dict:
    """Released-layout motion modules -> diffusers ``MotionAdapter`` state dict."""
    out, consumed = {}, []
    for key, value in sd.items():
        m = _ORIGINAL.match(key)
        if not m:
            continue
        site, tail = m.groups()
        consumed.append(key)
        block = _BLOCK.match(tail)
        if block and block.group(2) == _SECOND_TABLE:
            first = sd.get(f"{site}.temporal_transformer.{block.group(1)}.attention_blocks.0.pos_encoder.pe")
            if first is not None and value.device.type != "meta" and not torch.equal(first, value):
                raise ConversionError(f"{key} differs from the first attention's position table; diffusers' "
                                      "MotionAdapter holds one table per block and cannot represent this file.")
            continue
        out[f"{site}.{_rename_tail(tail, _BLOCK_RENAMES)}"] = value
    expected = _to_diffusers_names(_meta_shapes(config))
    if not any(k.endswith("pos_encoder.pe") for k in sd):  # a file without position tables stays without
        expected = {k: v for k, v in expected.items() if not k.endswith("pos_embed.pe")}
    check_conversion("AnimateDiff motion modules -> diffusers", sd.keys(), consumed, out, expected)
    return out


def _to_diffusers_names(shapes: Mapping) -> dict:
    """The released layout's keys (-> shapes) under diffusers' names."""
    out = {}
    for key, shape in shapes.items():
        site, tail = _ORIGINAL.match(key).groups()
        block = _BLOCK.match(tail)
        if block and block.group(2) == _SECOND_TABLE:
            continue
        out[f"{site}.{_rename_tail(tail, _BLOCK_RENAMES)}"] = shape
    return out


def motion_from_diffusers(sd: Mapping) -> dict:
    """diffusers ``MotionAdapter`` state dict -> released layout (position tables copied to both
    attentions; missing tables stay missing: see `complete_positions`)."""
    inverse = tuple((new, old) for old, new in _BLOCK_RENAMES)
    out, consumed = {}, []
    for key, value in sd.items():
        m = _DIFFUSERS.match(key)
        if not m:
            continue
        site, tail = m.groups()
        consumed.append(key)
        canonical = f"{site}.temporal_transformer.{_rename_tail(tail, inverse)}"
        out[canonical] = value
        if canonical.endswith("attention_blocks.0.pos_encoder.pe"):
            out[canonical.replace("attention_blocks.0.", "attention_blocks.1.")] = value
    check_conversion("diffusers MotionAdapter -> AnimateDiff layout", sd.keys(), consumed, out)
    return out


def complete_positions(sd: Mapping, config: MotionConfig) -> dict:
    """Add the sinusoidal position tables a file left out (they are fixed, not learned), then check
    the whole state dict against the released layout of `config`."""
    out = dict(sd)
    expected = _meta_shapes(config)
    for key, shape in expected.items():
        if key.endswith("pos_encoder.pe") and key not in out:
            out[key] = sinusoidal_positions(shape[1], shape[2])
    check_conversion("AnimateDiff motion modules", sd.keys(), list(sd.keys()), out, expected)
    return out
