"""Detection by structure: state dict -> family, components and their configs.

Only key names and tensor shapes are read, so meta tensors work. The family records
are tried in order (``diffstudio.families.FAMILIES``); the first whose denoiser test
passes wins. A state dict that holds a single component (a VAE, a text encoder) is
reported with ``family=None``. Anything else raises ``UnknownModelError`` naming the
nearest families and what each was missing. Nothing is guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffstudio.errors import UnknownModelError
from diffstudio.families import FAMILIES
from diffstudio.families.base import Family, Role

if TYPE_CHECKING:
    from diffstudio.components import ComponentArch


def _archs() -> dict:
    """The architecture records, imported on use: their modules import this package's leaf modules
    (``detect.unet``, ...), so importing them here at the top would be a cycle."""
    from diffstudio.components import ARCHS

    return ARCHS

# Roles a lone component file is given, and the prefixes such files use.
# Architectures a lone component file may hold (a VAE, a text encoder, e.g. t5xxl_fp16.safetensors),
# most specific test first; the prefixes tried are every prefix a family record gives that
# architecture, then these.
STANDALONE_ARCHS = ("ldm_vae", "clip_text", "t5_encoder", "chatglm", "bert", "cogvideox_vae")
STANDALONE_PREFIXES = ("vae.", "text_encoder.", "")
# Add-ons a lone file may hold that no family record names as a role: (role, arch, prefixes).
ADDON_KINDS = (("motion", "motion_module", ("",)), ("ip_adapter", "ip_adapter", ("",)),
               ("ip_adapter", "flux_ip_adapter", ("",)), ("exvideo", "exvideo_svd", ("",)))


def standalone_kinds() -> list[tuple[str, str, tuple[str, ...]]]:
    """(role name, arch, prefixes) for lone files. The role is the first one a family gives that
    architecture; the loader moves it to the right role of the model it is added to."""
    kinds = []
    for arch in STANDALONE_ARCHS:
        roles = [r for f in FAMILIES for r in f.roles if r.arch == arch]
        if not roles:
            continue
        prefixes = tuple(dict.fromkeys(p for r in roles for p in r.prefixes))
        kinds.append((roles[0].name, arch, prefixes + tuple(p for p in STANDALONE_PREFIXES if p not in prefixes)))
    return kinds


# Keys released files carry that are not weights of any component.
NON_WEIGHT_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                   "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                   "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                   "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                   "posterior_mean_coef2", "logvar", "model_ema.decay", "model_ema.num_updates")


@dataclass
class Component:
    role: str
    arch: str
    prefix: str  # where its keys live in the input ("" = bare)
    layout: str  # "original", "diffusers", or "openclip" (a CLIP text encoder in OpenCLIP names)
    config: Any
    num_params: int
    dtype: str


@dataclass
class Detection:
    family: str | None
    components: dict[str, Component]
    variant: str | None = None
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"family: {self.family or '(a single component, no family)'}"
                 + (f" ({self.variant})" if self.variant else "")]
        for c in self.components.values():
            where = f"keys under '{c.prefix}'" if c.prefix else "bare keys"
            lines.append(f"  {c.role:<16} {c.arch:<10} {c.num_params / 1e6:9.2f} M params  {c.dtype:<9}"
                         f" {c.layout} layout, {where}")
        if self.ignored:
            shown = ", ".join(self.ignored[:8]) + (" ..." if len(self.ignored) > 8 else "")
            lines.append(f"  ignored {len(self.ignored)} non-weight keys: {shown}")
        return "\n".join(lines)


def _sub(sd: Mapping, prefix: str) -> dict:
    if not prefix:
        return dict(sd)
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def parameter_count(sd: Mapping) -> int:
    return sum(int(v.numel()) for v in sd.values())


def storage_dtype(sd: Mapping) -> str:
    counts: dict[str, int] = {}
    for v in sd.values():
        name = str(v.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + int(v.numel())
    return max(counts, key=counts.get) if counts else "-"


def find_component(sd: Mapping, arch: ComponentArch, prefixes) -> tuple[str, str, dict] | None:
    """The first prefix under which `arch`'s keys are found -> (prefix, layout, canonical keys)."""
    for prefix in prefixes:
        sub = _sub(sd, prefix)
        if not sub:
            continue
        if arch.is_canonical(sub):
            return prefix, "original", sub
        if arch.is_diffusers(sub):
            return prefix, arch.other_layout, arch.from_diffusers(sub)
    return None


def stored_configs(metadata: Mapping | None) -> dict:
    """Configs diffstudio stored in a file's safetensors metadata: {role: config dict}."""
    if not metadata or "diffstudio" not in metadata:
        return {}
    data = metadata["diffstudio"]
    data = json.loads(data) if isinstance(data, str) else data
    return data.get("configs", {})


def _component(sd, role: Role | tuple, prefixes, stored: dict) -> Component | None:
    name, arch_name = (role.name, role.arch) if isinstance(role, Role) else role[:2]
    hints = role.hints if isinstance(role, Role) else {}
    arch = _archs()[arch_name]
    found = find_component(sd, arch, prefixes)
    if found is None:
        return None
    prefix, layout, sub = found
    config = (arch.config_from_dict(stored[name]) if name in stored else arch.derive_config(sub, hints))
    return Component(name, arch_name, prefix, layout, config, parameter_count(sub), storage_dtype(sub))


def _consumed(key: str, components: dict[str, Component]) -> bool:
    return any(c.prefix and key.startswith(c.prefix) for c in components.values())


def _try_family(family: Family, sd: Mapping, stored: dict) -> tuple[Detection | None, str]:
    den_role = family.role(family.denoiser_role)
    den = _component(sd, den_role, den_role.prefixes + ("",), stored)
    if den is None:
        missing = _archs()[den_role.arch].missing_sentinels(_sub(sd, den_role.prefixes[0])) or []
        return None, f"no {den_role.arch} keys (e.g. missing {', '.join(missing[:2])})"
    reason = family.check_denoiser(den.config)
    if reason:
        return None, reason
    components = {den.role: den}
    if den.prefix:  # a bare denoiser file holds nothing else
        for role in family.roles:
            if role.name != den.role:
                comp = _component(sd, role, role.prefixes, stored)
                if comp is not None:
                    components[role.name] = comp
    if den.prefix:
        ignored = sorted(k for k in sd if not _consumed(k, components))
    else:
        ignored = sorted(k for k in sd if k in NON_WEIGHT_KEYS)
    return Detection(family.name, components, family.variant_from(den.config), ignored), ""


def detect(state_dict: Mapping, metadata: Mapping | None = None) -> Detection:
    """Place a state dict (any mapping key -> tensor; meta tensors work).

    ``metadata`` is a safetensors metadata dict; configs diffstudio stored there win over
    configs derived from shapes.
    """
    if not state_dict:
        raise UnknownModelError("the state dict is empty: there is nothing to detect")
    stored = stored_configs(metadata)
    reasons = []
    from diffstudio.detect.controlnet import attach_bundled_controlnet, detect_controlnet

    for family in FAMILIES:
        detection, reason = _try_family(family, state_dict, stored)
        if detection is not None:
            return attach_bundled_controlnet(detection, state_dict, stored)
        reasons.append((family.name, reason))
    controlnet = detect_controlnet(state_dict, stored)  # an add-on for a family, not a model of its own
    if controlnet is not None:
        return controlnet
    for role, arch_name, prefixes in [*standalone_kinds(), *ADDON_KINDS]:
        comp = _component(state_dict, (role, arch_name), prefixes, stored)
        if comp is not None:
            others = sorted(k for k in state_dict if comp.prefix and not k.startswith(comp.prefix))
            if all(k in NON_WEIGHT_KEYS for k in others):  # a lone component, not a model we failed to place
                return Detection(None, {role: comp}, None, others)
    raise UnknownModelError(_explain(state_dict, reasons))


def _explain(sd: Mapping, reasons: list[tuple[str, str]]) -> str:
    heads: dict[str, int] = {}
    for k in sd:
        head = k.split(".")[0]
        heads[head] = heads.get(head, 0) + 1
    top = ", ".join(f"{h}.* ({n})" for h, n in sorted(heads.items(), key=lambda kv: -kv[1])[:6])
    # Families whose denoiser was found but rejected are nearer than those with no denoiser at all.
    ranked = sorted(reasons, key=lambda r: r[1].startswith("no "))
    why = "; ".join(f"{name}: {reason}" for name, reason in ranked)
    return (f"not a model diffstudio knows. Nearest families: {why}. The file's top-level keys are: {top}. "
            "If this is a LoRA, ControlNet or other add-on, load it onto a base model instead; if it is "
            "a model family diffstudio does not support yet, please open an issue with `diffstudio info` output.")
