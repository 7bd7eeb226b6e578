"""LoRA / LyCORIS files -> layers: which layer, which kind of delta, its factors and its scale.

Formats are told apart by key names alone (formulas in ``deltas.py``):

==========================  ===============================================================
kohya / civitai LoRA        ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` /
                            ``.alpha``; text: ``lora_te_`` (SD 1.x), ``lora_te1_`` / ``lora_te2_``
                            (SDXL); ``lora_mid`` for CP conv; ``dora_scale`` for DoRA
LyCORIS LoCon               the same names on conv layers (3x3 down, 1x1 up)
LyCORIS LoHa                ``.hada_w1_a`` ``.hada_w1_b`` ``.hada_w2_a`` ``.hada_w2_b`` (+ ``hada_t1/t2``)
LyCORIS LoKr                ``.lokr_w1`` or ``.lokr_w1_a/_b``; ``.lokr_w2`` or ``.lokr_w2_a/_b`` (+ ``lokr_t2``)
LyCORIS full / norm         ``.diff`` / ``.diff_b``, ``.w_norm`` / ``.b_norm``
(any of them)               also under the ``lycoris_`` prefix
diffusers / peft            ``unet.<diffusers path>.lora_A.weight`` / ``lora_B`` (``.lora_A.default.weight``
                            with an adapter name), ``text_encoder.`` / ``text_encoder_2.`` /
                            ``transformer.`` prefixes, ``lora_magnitude_vector`` for DoRA; the alpha
                            comes from the ``lora_adapter_metadata`` diffusers stores
diffusers (before peft)     ``...attn1.processor.to_q_lora.down.weight``, ``...q_proj.lora_linear_layer.up.weight``
XLabs FLUX                  ``double_blocks.N.processor.qkv_lora1.down.weight`` (1 = image, 2 = text stream)
==========================  ===============================================================

``parse_lora`` only reads names and shapes: which of our parameters a layer means is decided by
``matching.py`` against a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Parts of a layer: file suffix -> part name, for the suffixes that are plain names after a dot.
_PLAIN_PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}
_PEFT = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$")
_PEFT_DORA = re.compile(r"^(?P<layer>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[\w-]+))?(?:\.weight)?$")
_OLD_DIFFUSERS = re.compile(r"^(?P<layer>.+)\.lora(?:_linear_layer)?\.(?P<ud>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>\w+?)_lora(?P<n>\d?)\.(?P<ud>down|up)\.weight$")

# kohya / LyCORIS layer prefixes -> (scope, text encoder index or None).
_KOHYA_PREFIX = re.compile(r"^(?:(?P<unet>lora_unet|lycoris_unet|lora_transformer)|lora_te(?P<te>\d?)|"
                           r"lycoris_te(?P<lte>\d?)|(?P<lyc>lycoris))_(?P<local>.+)$")
# dotted prefixes trainers put in front of a component's layer names.
DOTTED_SCOPES = (("unet.", "denoiser", None), ("transformer.", "denoiser", None),
                 ("diffusion_model.", "denoiser", None), ("model.diffusion_model.", "denoiser", None),
                 ("text_encoder.", "text", 0), ("text_encoder_2.", "text", 1), ("text_encoder_3.", "text", 2),
                 ("base_model.model.", "any", None))

# XLabs FLUX processors (their released files cover the double blocks): processor -> BFL module.
_XLABS = {("double", "qkv", "1"): "img_attn.qkv", ("double", "qkv", "2"): "txt_attn.qkv",
          ("double", "proj", "1"): "img_attn.proj", ("double", "proj", "2"): "txt_attn.proj",
          ("single", "qkv", ""): "linear1", ("single", "proj", ""): "linear2"}


@dataclass
class LoRALayer:
    """One adapted layer of a file."""

    name: str                      # the layer's name in the file (keys minus their part suffix)
    scope: str                     # "denoiser" | "text" | "any" (no prefix said which component)
    text_index: int | None         # 0-based text encoder (lora_te2_ -> 1); None: the first, if text
    local: str                     # the name after the scope prefix
    flattened: bool                # kohya naming: module path with "_" for "."
    naming: str                    # "kohya", "peft", "diffusers-old", "xlabs", "dotted"
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    leading_rows: bool = False     # the delta covers the first rows of the target (XLabs single blocks)
    kind: str = ""                 # "lora" | "loha" | "lokr" | "full" | "norm" (set by finish())
    scale: float = 1.0             # the file's own factor (alpha / rank)
    dora: bool = False
    problem: str | None = None     # why this layer cannot be used (incomplete factors)

    def delta_shape(self) -> tuple[int, ...] | None:
        """The shape of ΔW the factors build (its row count is what a target must have)."""
        p = self.parts
        if self.kind == "lora":
            if "mid" in p:
                return (p["up"].shape[0], p["down"].shape[1], *p["mid"].shape[2:])
            return (p["up"].shape[0], *p["down"].shape[1:])
        if self.kind == "loha":
            if "hada_t1" in p:
                return (p["hada_w1_a"].shape[1], p["hada_w1_b"].shape[1], *p["hada_t1"].shape[2:])
            return (p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1])
        if self.kind == "lokr":
            a, b = (p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1]))
            if "lokr_w2" in p:
                w2 = tuple(p["lokr_w2"].shape)
            elif "lokr_t2" in p:
                w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1], *p["lokr_t2"].shape[2:])
            else:
                w2 = (p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1])
            return (a * w2[0], b * w2[1], *w2[2:])
        if self.kind == "full":
            return tuple(p["diff"].shape) if "diff" in p else None
        if self.kind == "norm":
            return tuple(p["w_norm"].shape) if "w_norm" in p else None
        return None


@dataclass
class ParsedLoRA:
    layers: list[LoRALayer]
    unknown_keys: list[str]
    adapters: list[str]            # peft adapter names seen (the first, or "default", is used)
    metadata: dict

    @property
    def format(self) -> str:
        """A human name for what the file is, e.g. "kohya LoRA + LoCon (conv)"."""
        namings = sorted({layer.naming for layer in self.layers})
        kinds = []
        usable = [layer for layer in self.layers if layer.problem is None]
        if any(layer.kind == "lora" and layer.parts["down"].ndim == 2 for layer in usable):
            kinds.append("LoRA")
        if any(layer.kind == "lora" and layer.parts["down"].ndim > 2 for layer in usable):
            kinds.append("LoCon (conv)")
        labels = {"loha": "LoHa", "lokr": "LoKr", "full": "full diff", "norm": "norm"}
        kinds += [label for kind, label in labels.items() if any(layer.kind == kind for layer in usable)]
        if any(layer.dora for layer in usable):
            kinds.append("DoRA")
        names = {"kohya": "kohya/LyCORIS", "peft": "diffusers/peft", "diffusers-old": "diffusers (pre-peft)",
                 "xlabs": "XLabs", "dotted": "original-layout names"}
        return (" / ".join(names[n] for n in namings) or "no layers") + " " + " + ".join(kinds)


def _split_key(key: str) -> tuple[str, str, str, str | None] | None:
    """key -> (layer name, part, naming, peft adapter) or None for keys no format knows."""
    m = _PEFT.match(key)
    if m:
        return m["layer"], "down" if m["ab"] == "A" else "up", "peft", m["adapter"]
    m = _PEFT_DORA.match(key)
    if m:
        return m["layer"], "dora", "peft", m["adapter"]
    m = _PROCESSOR.match(key)
    if m:
        return f"{m['block']}.processor.{m['proj']}_lora{m['n']}", m["ud"], "processor", None
    m = _OLD_DIFFUSERS.match(key)
    if m:
        return m["layer"], m["ud"], "diffusers-old", None
    for suffix, part in _PLAIN_PARTS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part, "plain", None
    return None


def _processor_layer(name: str) -> tuple[str, str, bool] | None:
    """``<block>.processor.<proj>_lora<n>`` -> (module path, naming, leading rows)."""
    block, _, proc = name.partition(".processor.")
    proj, _, n = proc.rpartition("_lora")
    if proj.startswith("to_"):  # diffusers' attention processors before peft: attn1.to_q / to_out.0
        return f"{block}.{proj}" + (".0" if proj == "to_out" else ""), "diffusers-old", False
    stream = "double" if "double_blocks." in f".{block}" else "single" if "single_blocks." in f".{block}" else None
    target = _XLABS.get((stream, proj, n))
    if target is None:
        return None
    return f"{block}.{target}", "xlabs", stream == "single" and proj == "qkv"


def _scope(name: str, naming: str) -> tuple[str, int | None, str, bool]:
    """(scope, text index, local name, flattened) from a layer name's prefix."""
    if naming == "plain" and "." not in name:
        m = _KOHYA_PREFIX.match(name)
        if m:
            if m["unet"] or m["lyc"]:
                return "denoiser", None, m["local"], True
            digit = m["te"] if m["te"] is not None else m["lte"]
            return "text", (int(digit) - 1 if digit else None), m["local"], True
        return "any", None, name, True
    for prefix, scope, index in DOTTED_SCOPES:
        if name.startswith(prefix):
            return scope, index, name[len(prefix):], False
    return "any", None, name, False


def parse_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> ParsedLoRA:
    """Group a LoRA file's keys into layers (format detection by key names; nothing is matched yet)."""
    metadata = dict(metadata or {})
    groups: dict[tuple[str, str | None], LoRALayer] = {}
    unknown: list[str] = []
    adapters: list[str] = []
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, part, naming, adapter = split
        leading = False
        if naming == "processor":
            found = _processor_layer(name)
            if found is None:
                unknown.append(key)
                continue
            name, naming, leading = found
        if adapter is not None and adapter not in adapters:
            adapters.append(adapter)
        layer = groups.get((name, adapter))
        if layer is None:
            scope, index, local, flattened = _scope(name, "plain" if naming == "plain" else naming)
            if naming == "plain":
                naming = "kohya" if flattened else "dotted"
            layer = groups[(name, adapter)] = LoRALayer(name, scope, index, local, flattened, naming,
                                                        leading_rows=leading)
        layer.parts[part] = tensor
        layer.keys.append(key)
    chosen = "default" if "default" in adapters else (adapters[0] if adapters else None)
    layers = [layer for (name, adapter), layer in groups.items() if adapter in (None, chosen)]
    unknown += [k for (name, adapter), layer in groups.items() if adapter not in (None, chosen) for k in layer.keys]
    peft_config = _peft_metadata(metadata)
    for layer in layers:
        _finish(layer, peft_config)
    return ParsedLoRA(layers, unknown, adapters, metadata)


def _finish(layer: LoRALayer, peft_config: dict) -> None:
    """Decide the kind, check the factors are complete, compute the scale (alpha / rank)."""
    p = layer.parts
    alpha = float(p["alpha"].float().item()) if "alpha" in p else None
    layer.dora = "dora" in p
    if "down" in p or "up" in p:
        layer.kind = "lora"
        if not ("down" in p and "up" in p):
            layer.problem = "has only one of the two LoRA factors (down/up, lora_A/lora_B)"
            return
        rank = p["down"].shape[0]
        if p["up"].reshape(p["up"].shape[0], -1).shape[1] != rank and "mid" not in p:
            layer.problem = f"down has rank {rank} but up is {tuple(p['up'].shape)}"
            return
        rslora = False
        if alpha is None and layer.naming == "peft":
            alpha, rslora = _peft_alpha(layer, peft_config)
        if alpha is None:
            layer.scale = 1.0  # no alpha anywhere: the trainer's convention is alpha = rank
        else:
            layer.scale = alpha / (math.sqrt(rank) if rslora else rank)
    elif any(k.startswith("hada_") for k in p):
        layer.kind = "loha"
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(k in p for k in need) or (("hada_t1" in p) != ("hada_t2" in p)):
            layer.problem = "incomplete LoHa factors (needs hada_w1_a/b, hada_w2_a/b, and both or no hada_t1/t2)"
            return
        rank = p["hada_w1_b"].shape[0]
        layer.scale = 1.0 if alpha is None else alpha / rank
    elif any(k.startswith("lokr_") for k in p):
        layer.kind = "lokr"
        has_w1 = "lokr_w1" in p or ("lokr_w1_a" in p and "lokr_w1_b" in p)
        has_w2 = "lokr_w2" in p or ("lokr_w2_a" in p and "lokr_w2_b" in p)
        if not (has_w1 and has_w2):
            layer.problem = "incomplete LoKr factors (needs lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b)"
            return
        # alpha / rank only scales a low-rank factor; two whole factors are used as they are.
        low_rank = p.get("lokr_w1_b", p.get("lokr_w2_b"))
        layer.scale = alpha / low_rank.shape[0] if (alpha is not None and low_rank is not None) else 1.0
    elif "diff" in p or "diff_b" in p:
        layer.kind = "full"
    elif "w_norm" in p or "b_norm" in p:
        layer.kind = "norm"
    else:
        layer.kind = "unknown"
        layer.problem = f"holds only {', '.join(sorted(p))}: no factors of any known kind"


# -- peft alpha from diffusers' metadata ---------------------------------------------------------

def _peft_metadata(metadata: Mapping[str, str]) -> dict:
    """``lora_adapter_metadata`` (diffusers >= 0.33) -> {component prefix: peft LoraConfig dict}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in data.items():
        component, _, option = key.partition(".")
        if option:
            out.setdefault(component, {})[option] = value
        else:
            out.setdefault("", {})[component] = value
    return out


def _peft_alpha(layer: LoRALayer, config: dict) -> tuple[float | None, bool]:
    """(lora_alpha, use_rslora) for a peft layer: ``alpha_pattern`` first, then ``lora_alpha``."""
    component, _, local = layer.name.partition(".")
    options = config.get(component) or config.get("")
    if not options:
        return None, False
    if options is config.get(""):
        local = layer.name
    alpha = options.get("lora_alpha")
    for pattern, value in (options.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", local):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(options.get("use_rslora", False))
