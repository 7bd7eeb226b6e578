"""Layers of a LoRA file -> parameters of a loaded model (any family, from its record alone).

The patchable components are the family's denoiser, its text encoders and, once loaded, the AnimateDiff motion
module (motion LoRAs: the v2 camera LoRAs' ``...attention_blocks.0.processor.to_q_lora.down.weight`` names, or
diffusers' for a MotionAdapter). A layer's prefix says
which one it is for (``lora_unet_``, ``lora_te2_``, ``text_encoder.``...); the name after it is
looked up in that component's ``NameTable`` (every layout its converters know, dotted or
kohya-flattened). Layers without a prefix are tried on each component, the denoiser first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from diffstudio.patches.formats import LoRALayer, ParsedLoRA
from diffstudio.patches.names import NameTable, Target, table_for


@dataclass
class Component:
    role: str
    label: str                     # "unet", "dit", "text encoder 1", ...
    is_text: bool
    module: object
    table: NameTable
    params: dict = field(default_factory=dict)   # name -> parameter (buffers are not patchable)

    def __post_init__(self):
        self.params = dict(self.module.named_parameters())


@dataclass
class Match:
    layer: LoRALayer
    component: Component | None = None
    targets: dict[str, Target] = field(default_factory=dict)   # "weight" / "bias" -> Target
    problem: str | None = None     # None when matched


def components_of(models) -> list[Component]:
    """The denoiser, the text encoders and a loaded motion module of a model, with their name tables."""
    family = models.family
    out = []
    den = family.denoiser_role
    arch = family.role(den).arch
    label = "unet" if "unet" in arch else "dit"
    module = models.components[den]
    out.append(Component(den, label, False, module, table_for(module, arch, models.configs.get(den))))
    for i, spec in enumerate(family.text_encoders):
        role = spec.encoder_role
        if role in models.components:
            arch = family.role(role).arch
            module = models.components[role]
            out.append(Component(role, f"text encoder {i + 1}", True, module,
                                 table_for(module, arch, models.configs.get(role))))
    motion = models.components.get("motion")
    if motion is not None:  # an add-on, not a family role (motion_loading.py)
        out.append(Component("motion", "motion module", False, motion,
                             table_for(motion, "motion_module", models.configs.get("motion"))))
    return out


def _role_prefixes(models, component: Component) -> list[str]:
    """Dotted prefixes that name this component in a file: its role name, diffusers folder, file prefixes."""
    if component.role == "motion":
        return ["motion.", "motion_modules."]
    role = models.family.role(component.role)
    return [role.name + ".", role.subfolder + ".", *role.prefixes]


def _candidates(layer: LoRALayer, components: list[Component], models) -> list[tuple[Component, str]]:
    """(component, local name) pairs to try, most likely first."""
    den = [c for c in components if not c.is_text]
    text = [c for c in components if c.is_text]
    if layer.scope == "denoiser":
        return [(c, layer.local) for c in den]
    if layer.scope == "text":
        index = layer.text_index or 0
        ordered = text[index:index + 1] + [c for i, c in enumerate(text) if i != index]
        return [(c, layer.local) for c in ordered]
    pairs = []
    for c in den + text:
        for prefix in _role_prefixes(models, c):
            if layer.local.startswith(prefix):
                pairs.append((c, layer.local[len(prefix):]))
    return pairs + [(c, layer.local) for c in den + text]


def _expected_rows(layer: LoRALayer, target_shape, rows_count: int) -> str | None:
    shape = layer.delta_shape()
    if shape is None:
        return None
    numel = 1
    for n in shape:
        numel *= n
    target_numel = rows_count
    for n in target_shape[1:]:
        target_numel *= n
    if shape[0] != rows_count or numel != target_numel:
        return f"shape mismatch: the file's delta is {tuple(shape)}, the weight is {tuple(target_shape)}"
    return None


def match_layer(layer: LoRALayer, components: list[Component], models) -> Match:
    if layer.problem:
        return Match(layer, problem=layer.problem)
    problem = "no layer of this name in the model"
    for component, local in _candidates(layer, components, models):
        table = component.table
        weight = table.lookup(local, "weight", layer.flattened)
        bias = table.lookup(local, "bias", layer.flattened)
        if weight is None and bias is None:
            continue
        targets = {}
        if layer.kind in ("full", "norm"):
            w_part, b_part = ("diff", "diff_b") if layer.kind == "full" else ("w_norm", "b_norm")
            if w_part in layer.parts and weight is not None:
                targets["weight"] = weight
            if b_part in layer.parts and bias is not None:
                targets["bias"] = bias
            if not targets:
                problem = "the model layer has no weight/bias for this patch"
                continue
        else:
            if weight is None:
                continue
            targets["weight"] = weight
        params = component.params
        weight_target = targets.get("weight")
        if weight_target is not None:
            param = params.get(weight_target.param)
            if param is None:
                problem = f"{weight_target.param} is a buffer, not a weight"
                continue
            rows = param.shape[0] if weight_target.rows is None else _count(weight_target.rows, param.shape[0])
            if layer.leading_rows and weight_target.rows is None:
                shape = layer.delta_shape()
                if shape is not None and shape[0] < param.shape[0]:
                    targets["weight"] = Target(weight_target.param, slice(0, shape[0]))
                    rows = shape[0]
            mismatch = _expected_rows(layer, tuple(param.shape), rows) if layer.kind != "norm" else None
            if mismatch:
                problem = mismatch
                continue
        return Match(layer, component, targets)
    return Match(layer, problem=problem)


def _count(rows, n: int) -> int:
    if isinstance(rows, slice):
        return len(range(*rows.indices(n)))
    return int(rows.numel())


def match_lora(parsed: ParsedLoRA, models) -> list[Match]:
    components = components_of(models)
    return [match_layer(layer, components, models) for layer in parsed.layers]


# -- block groups for the report -----------------------------------------------------------------

_GROUPS = (("down", r"(down_blocks|input_blocks)"), ("mid", r"(mid_block|middle_block)"),
           ("up", r"(up_blocks|output_blocks)"), ("single", r"(single_blocks|single_transformer_blocks)"),
           ("double", r"(double_blocks|transformer_blocks)"), ("joint", r"joint_blocks"))


def block_group(layer: LoRALayer, component: Component | None = None) -> str:
    """"unet down", "dit single", "text encoder 2", ... for a layer (from its own name)."""
    if component is not None and component.is_text:
        return component.label
    if layer.scope == "text":
        return f"text encoder {(layer.text_index or 0) + 1}"
    for group, pattern in _GROUPS:
        if re.search(rf"(^|[._]){pattern}([._]|$)", layer.local):
            kind = "dit" if group in ("single", "double", "joint") else "unet"
            if component is not None:
                kind = component.label
            return f"{kind} {group}"
    if component is not None:
        return f"{component.label} other"
    return "denoiser other" if layer.scope == "denoiser" else "other"
