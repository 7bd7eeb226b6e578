"""``models.apply_lora(path, strength, text_strength, mode)`` -> a handle that changes or removes it.

Layers are matched to the model's parameters (``matching.py``), checked by the doctor (no match at
all raises ``LoRAMismatchError``, partial coverage warns with the numbers), turned into ``Patch``
objects (the delta formulas of ``deltas.py``) and added to the model's own patch lists
(``models.patches[role]``), which each component's ``ModulePatcher`` applies while that ``Models`` is
the one in use. Several LoRAs compose: each adds its own patches to the same per-weight lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.patches import deltas
from diffstudio.patches.formats import LoRALayer, parse_lora
from diffstudio.patches.matching import Match, match_lora
from diffstudio.patches.patcher import MODES, Patch, patcher_for


def read_lora(source) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """A path (any weights file diffstudio reads) or an in-memory state dict -> (tensors, metadata, name)."""
    if isinstance(source, Mapping):
        return dict(source), {}, "<state dict>"
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict

    path = Path(source).expanduser()
    return read_state_dict(path), read_file_metadata(path), str(path)


def _weight_compute(layer: LoRALayer) -> Callable[[torch.Tensor], torch.Tensor]:
    p, s = layer.parts, layer.scale
    if layer.kind == "lora":
        def compute(base):
            return deltas.lora_delta(p["down"], p["up"], p.get("mid"), s)
    elif layer.kind == "loha":
        def compute(base):
            return deltas.loha_delta(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"],
                                     p.get("hada_t1"), p.get("hada_t2"), s)
    elif layer.kind == "lokr":
        def compute(base):
            return deltas.lokr_delta(p.get("lokr_w1"), p.get("lokr_w1_a"), p.get("lokr_w1_b"), p.get("lokr_w2"),
                                     p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2"), s)
    else:  # full / norm: the stored difference itself
        part = "diff" if layer.kind == "full" else "w_norm"

        def compute(base):
            return p[part].float()
    if not layer.dora:
        return compute

    def with_dora(base):
        return deltas.dora_delta(base, compute(base).reshape(base.shape), p["dora"])

    return with_dora


def _patches_for(match: Match, mode: str, device) -> list[tuple[str, Patch]]:
    layer = match.layer
    layer.parts = {k: v.to(device) for k, v in layer.parts.items()}
    out = []
    if "weight" in match.targets:
        factors = None
        p = layer.parts
        if (layer.kind == "lora" and not layer.dora and "mid" not in p and p["down"].ndim == 2
                and p["up"].ndim == 2):
            factors = (p["down"], p["up"], layer.scale)
        kind = "dora" if layer.dora else layer.kind
        target = match.targets["weight"]
        out.append((target.param, Patch(kind, p, _weight_compute(layer), mode=mode, rows=target.rows,
                                        factors=factors, source=layer.name)))
    if "bias" in match.targets:
        part = "diff_b" if layer.kind == "full" else "b_norm"
        target = match.targets["bias"]
        tensor = layer.parts[part]
        out.append((target.param, Patch(layer.kind, {part: tensor}, lambda base, t=tensor: t.float(), mode=mode,
                                        rows=target.rows, source=layer.name)))
    return out


class LoRAHandle:
    """One applied LoRA file: change its strengths, or remove it (the base comes back bit for bit)."""

    def __init__(self, name: str, models, report, strength: float, text_strength: float | None, mode: str):
        self.name = name
        self.report = report
        self.mode = mode
        self._models = models
        self._entries: list[tuple[str, str, Patch, bool]] = []  # (role, param, patch, is_text)
        self.strength = float(strength)
        self.text_strength = None if text_strength is None else float(text_strength)
        self.removed = False

    @property
    def effective_text_strength(self) -> float:
        return self.strength if self.text_strength is None else self.text_strength

    def _refresh(self) -> None:
        touched: dict[str, set[str]] = {}
        for role, param, patch, is_text in self._entries:
            patch.strength = self.effective_text_strength if is_text else self.strength
            touched.setdefault(role, set()).add(param)
        self._models.refresh_patches(touched)

    def set_strength(self, strength: float | None = None, text_strength: float | None = None) -> LoRAHandle:
        """``set_strength(x)``: the denoiser at x, the text encoders too unless given their own strength;
        ``set_strength(text_strength=y)``: the text encoders only. Recomputed from the backups: no drift."""
        if self.removed:
            raise InvalidInputError(f"the LoRA {self.name} was removed; apply it again")
        if strength is None and text_strength is None:
            raise InvalidInputError("set_strength needs a strength, a text_strength or both")
        if strength is not None:
            self.strength = float(strength)
        if text_strength is not None:
            self.text_strength = float(text_strength)
        self._refresh()
        return self

    def remove(self) -> None:
        """Take this LoRA's patches out; other LoRAs stay. Without any, weights are the base's exactly."""
        if self.removed:
            return
        touched: dict[str, set[str]] = {}
        for role, param, patch, _ in self._entries:
            patches = self._models.patches.get(role, {}).get(param, [])
            if patch in patches:
                patches.remove(patch)
                touched.setdefault(role, set()).add(param)
        self._models.refresh_patches(touched)
        self._entries.clear()
        self.removed = True
        if self in self._models.loras:
            self._models.loras.remove(self)

    def copy_to(self, models) -> LoRAHandle:
        """This handle for a clone of its model: the same layers, patches of its own (own strengths)."""
        twin = LoRAHandle(self.name, models, self.report, self.strength, self.text_strength, self.mode)
        twin.removed = self.removed
        for role, param, patch, is_text in self._entries:
            copy = models.patches[role][param][self._models.patches[role][param].index(patch)]
            twin._entries.append((role, param, copy, is_text))
        return twin

    def describe(self) -> dict:
        """What a recipe records: the file, its strengths and mode."""
        out = {"name": self.name, "strength": self.strength, "mode": self.mode}
        if self.text_strength is not None:
            out["text_strength"] = self.text_strength
        return out

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._entries)} patches"
        return f"LoRAHandle({self.name!r}, strength={self.strength}, text={self.effective_text_strength}, {state})"


def apply_lora(models, source, strength: float = 1.0, text_strength: float | None = None,
               mode: str = "merged") -> LoRAHandle:
    """Patch ``models`` (its denoiser and text encoders, in place) with a LoRA / LyCORIS file.

    ``source``: a file path or an in-memory state dict. ``text_strength=None`` follows ``strength``.
    ``mode``: ``"merged"`` (weights updated in place, reversibly) or ``"on_the_fly"`` (forward hooks,
    weights untouched). Raises ``LoRAMismatchError`` when nothing in the file fits the model and warns
    (with the numbers) when only part of it does.
    """
    from diffstudio.patches.doctor import check_coverage, make_report

    if mode not in MODES:
        raise InvalidInputError(f"unknown LoRA mode {mode!r}; use one of {', '.join(MODES)}")
    sd, metadata, name = read_lora(source)
    if name != "<state dict>" and any(Path(h.name).resolve() == Path(name).resolve() for h in models.loras):
        raise InvalidInputError(f"the LoRA {name} is already applied to this model; change its strength with "
                                "handle.set_strength(...) instead of applying it twice")
    parsed = parse_lora(sd, metadata)
    matches = match_lora(parsed, models)
    report = make_report(parsed, matches, models, name)
    check_coverage(report)
    handle = LoRAHandle(name, models, report, strength, text_strength, mode)
    models.activate()
    for match in matches:
        if match.problem is not None:
            continue
        module = match.component.module
        device = next(module.parameters()).device
        patcher = patcher_for(module)
        role = match.component.role
        patcher.use(models.patches.setdefault(role, {}))
        for param, patch in _patches_for(match, mode, device):
            patcher.add(param, patch)
            handle._entries.append((role, param, patch, match.component.is_text))
    handle._refresh()
    models.loras.append(handle)
    return handle


def active_loras(models) -> list[LoRAHandle]:
    """The LoRAs applied to ``models`` and not removed, in the order they were applied."""
    return list(models.loras)


def lora_recipe(models) -> dict:
    """``{"loras": [{name, strength, mode[, text_strength]}, ...]}`` for a recipe; ``{}`` without LoRAs."""
    loras = []
    for handle in active_loras(models):
        entry = handle.describe()
        entry["name"] = Path(entry["name"]).name
        loras.append(entry)
    return {"loras": loras} if loras else {}
