"""The LoRA doctor: what a file is, which family it was made for, and how much of it fits a model.

``inspect_lora(path, models=None)`` -> ``LoRAReport``: the detected format, the family the file's
training metadata names (``ss_base_model_version``: diffstudio's trainer stores the family there;
``modelspec.architecture``), else one guessed from the key patterns (and, with a base model, the
share of layers that match it), per block group (unet down/mid/up, dit double/single, text encoder
1/2...) the matched layers out of the file's, and the unmatched layers grouped into families
(digits -> N) with the reason. ``check_coverage`` turns a report into the interface: 0 % raises
``LoRAMismatchError``, anything short of 100 % warns.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

from diffstudio.errors import LoRAMismatchError
from diffstudio.patches.formats import ParsedLoRA, parse_lora
from diffstudio.patches.matching import Match, block_group, match_lora


@dataclass
class LoRAReport:
    name: str
    format: str
    layers: int
    keys: int
    family_guess: str | None
    guess_reason: str
    base_family: str | None = None
    groups: dict[str, list[int]] = field(default_factory=dict)       # group -> [matched, total] layers
    unmatched: dict[str, int] = field(default_factory=dict)          # "pattern (reason)" -> count
    unknown_keys: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(m for m, _ in self.groups.values())

    @property
    def coverage(self) -> float | None:
        """Share of the file's layers that found their weight (None without a base model)."""
        if self.base_family is None:
            return None
        return self.matched / self.layers if self.layers else 0.0

    def text(self) -> str:
        lines = [f"{self.name}", f"  format: {self.format} ({self.layers} layers, {self.keys} keys)"]
        guess = self.family_guess or "unknown"
        lines.append(f"  made for: {guess} ({self.guess_reason})")
        if self.adapters:
            lines.append(f"  peft adapters in the file: {', '.join(self.adapters)} (using the first / 'default')")
        if self.base_family is not None:
            lines.append(f"  base model: {self.base_family}, {self.matched}/{self.layers} layers matched "
                         f"({100 * self.coverage:.1f} %)")
        for group, (matched, total) in sorted(self.groups.items()):
            if self.base_family is None:
                lines.append(f"    {group:<18} {total:5d} layers")
            else:
                lines.append(f"    {group:<18} {matched:5d}/{total:<5d} {100 * matched / total:6.1f} %")
        if self.unmatched:
            lines.append("  unmatched layer families:")
            for pattern, count in sorted(self.unmatched.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {count:4d} x {pattern}")
        if self.unknown_keys:
            shown = ", ".join(self.unknown_keys[:5]) + (" ..." if len(self.unknown_keys) > 5 else "")
            lines.append(f"  {len(self.unknown_keys)} keys of no known format (ignored): {shown}")
        return "\n".join(lines)


# sd-scripts' ss_base_model_version values (prefixes) -> family; files diffstudio trains store the family's name.
_KOHYA_BASE_VERSIONS = (("sd_v1", "sd15"), ("sd_v2", "sd2"), ("sdxl", "sdxl"), ("flux", "flux"), ("sd3", "sd3"))
# The modelspec.architecture values sd-scripts and others write (prefixes) -> family.
_MODELSPEC_ARCHITECTURES = (("stable-diffusion-v1", "sd15"), ("stable-diffusion-v2", "sd2"),
                            ("stable-diffusion-xl-v1-refiner", "sdxl_refiner"), ("stable-diffusion-xl", "sdxl"),
                            ("stable-diffusion-3", "sd3"), ("flux-1", "flux"))


def family_from_metadata(metadata: dict) -> tuple[str | None, str]:
    """The family a file's training metadata names (our trainer's and sd-scripts' keys), if any."""
    from diffstudio.families import FAMILIES

    version = str(metadata.get("ss_base_model_version") or "")
    if version in {family.name for family in FAMILIES}:
        return version, f"the file's metadata: ss_base_model_version {version}"
    for prefix, family in _KOHYA_BASE_VERSIONS:
        if version.startswith(prefix):
            return family, f"the file's metadata: ss_base_model_version {version}"
    architecture = str(metadata.get("modelspec.architecture") or "")
    for prefix, family in _MODELSPEC_ARCHITECTURES:
        if architecture.startswith(prefix):
            return family, f"the file's metadata: modelspec.architecture {architecture}"
    return None, ""


def guess_family(parsed: ParsedLoRA) -> tuple[str | None, str]:
    """The family a file was trained for: from its metadata when it names one, else from its layer
    names (and a cross-attention width)."""
    family, reason = family_from_metadata(parsed.metadata)
    if family is not None:
        return family, reason
    names = [layer.local for layer in parsed.layers]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, n) for n in names)

    if has(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)([._]|$)"):
        return "flux", "double/single stream blocks"
    if has(r"(^|[._])joint_blocks([._]|$)") or has(r"(^|[._])context_block([._]|$)"):
        return "sd3", "MMDiT joint blocks"
    if has(r"(^|[._])transformer_blocks[._]\d+[._]attn[._]add_q_proj"):
        return "sd3", "MMDiT attention with context projections (diffusers)"
    if has(r"(^|[._])blocks[._]\d+[._]attn1[._]Wqkv"):
        return "hunyuan", "Hunyuan-DiT blocks"
    if has(r"^(transformer_blocks|blocks)[._]\d+[._]attn1[._]to_(q|k|v|out)"):
        return "cogvideox", "top-level blocks with a single attn1 (CogVideoX: diffusers' or DiffSynth's names)"
    if any(layer.scope == "text" and (layer.text_index or 0) >= 1 for layer in parsed.layers):
        return "sdxl", "a second text encoder (te2 / text_encoder_2)"
    width = _cross_attention_width(parsed)
    if width is not None:
        known = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
        if width in known:
            return known[width], f"cross-attention keys are {width} wide"
        return None, f"cross-attention keys are {width} wide (no family known with that width)"
    if has(r"(input_blocks|down_blocks|output_blocks|up_blocks)"):
        return None, "a UNet LoRA without cross-attention layers: SD 1.x or SDXL"
    return None, "no family-specific layer names"


def _cross_attention_width(parsed: ParsedLoRA) -> int | None:
    for layer in parsed.layers:
        if layer.problem is None and re.search(r"attn2[._]to_[kv]$", layer.local):
            shape = layer.delta_shape()
            if shape is not None and len(shape) >= 2:
                return int(shape[1])
    return None


def make_report(parsed: ParsedLoRA, matches: list[Match] | None, models, name: str) -> LoRAReport:
    family, reason = guess_family(parsed)
    report = LoRAReport(name, parsed.format, len(parsed.layers), sum(len(layer.keys) for layer in parsed.layers),
                        family, reason, unknown_keys=list(parsed.unknown_keys), adapters=list(parsed.adapters))
    if models is not None:
        report.base_family = models.family.name
    unmatched: Counter = Counter()
    for i, layer in enumerate(parsed.layers):
        match = matches[i] if matches is not None else None
        group = block_group(layer, match.component if match is not None else None)
        counts = report.groups.setdefault(group, [0, 0])
        counts[1] += 1
        if match is not None and match.problem is None:
            counts[0] += 1
        elif match is not None:
            unmatched[f"{re.sub(r'[0-9]+', 'N', layer.name)} ({match.problem})"] += 1
    report.unmatched = dict(unmatched)
    return report


def inspect_lora(source, models=None) -> LoRAReport:
    """The doctor's report for a file (or state dict); with ``models``, how much of it fits them."""
    from diffstudio.patches.apply import read_lora

    sd, metadata, name = read_lora(source)
    parsed = parse_lora(sd, metadata)
    matches = match_lora(parsed, models) if models is not None else None
    return make_report(parsed, matches, models, name)


def lora_report_if_lora(path) -> LoRAReport | None:
    """The doctor's report when ``path`` is a LoRA / LyCORIS file (most of its keys form LoRA layers), else None.

    For ``diffstudio info`` on a file no model family matches: a LoRA is not a model, and saying so
    beats listing the families it is not. Safetensors are memory-mapped, so a large non-LoRA file
    is not read.
    """
    report = inspect_lora(path)
    lora_keys = report.keys
    return report if report.layers and lora_keys >= len(report.unknown_keys) else None


def check_coverage(report: LoRAReport) -> None:
    """0 % of the layers matched: ``LoRAMismatchError``; some but not all: a warning with the numbers."""
    if report.layers == 0:
        raise LoRAMismatchError(f"{report.name} holds no LoRA / LyCORIS layers "
                                f"({len(report.unknown_keys)} keys of no known format, e.g. "
                                f"{report.unknown_keys[:3]}); is it a LoRA file?")
    coverage = report.coverage
    if coverage is None or coverage == 1.0:
        return
    worst = ", ".join(f"{p} x{c}" for p, c in sorted(report.unmatched.items(), key=lambda kv: -kv[1])[:3])
    numbers = f"{report.matched}/{report.layers} layers matched ({100 * coverage:.1f} %)"
    if report.matched == 0:
        guess = f"; it looks made for {report.family_guess} ({report.guess_reason})" if report.family_guess else ""
        raise LoRAMismatchError(f"{report.name}: none of its {report.layers} layers fits this {report.base_family} "
                                f"model{guess}. Unmatched: {worst}. Run `diffstudio lora inspect FILE --model BASE` "
                                "for the full report.")
    per_group = ", ".join(f"{g} {m}/{t}" for g, (m, t) in sorted(report.groups.items()) if m < t)
    warnings.warn(f"LoRA {report.name}: only {numbers} on this {report.base_family} model; "
                  f"incomplete groups: {per_group}. Unmatched: {worst}", stacklevel=3)
