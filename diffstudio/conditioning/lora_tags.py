"""``<lora:name:weight>`` tags in prompts: find the file, and hand it to the model's LoRA support.

The parser (``prompt_syntax``) cuts the tags out of the text; this module

* resolves a tag's name to a file in the LoRA folders (:func:`resolve_lora`), and
* keeps the LoRAs a pipeline's prompts ask for applied (:class:`PromptLoRAs`), through one hook on
  the loaded model: ``models.apply_lora(path, strength) -> handle`` (``text_strength=`` added only
  for A1111's ``<lora:name:te:unet>`` form). ``handle.remove()``, when the handle has it, undoes
  that LoRA. A model without ``apply_lora`` raises :class:`LoRAUnavailableError` naming the tag.

Like A1111, the LoRAs stay applied between calls while the prompts ask for the same ones (no
re-patching for every image); a call whose prompts ask for others (or none) removes the old ones
first. The tags of every prompt of a batch, negatives included, apply to the whole batch (weights
are patched once per call); one name asked for with two weights is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from diffstudio.conditioning.prompt_syntax import NetworkTag, extract_network_tags
from diffstudio.errors import InvalidInputError, LoRANotFoundError, LoRAUnavailableError

log = logging.getLogger("diffstudio.conditioning")

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")  # in order of preference


def resolve_lora(name: str, lora_dirs: Sequence[str | Path]) -> Path:
    """A tag's name -> its file: ``name`` itself when it is an existing file, else ``<dir>/<name><ext>``.

    Extensions are tried in :data:`LORA_EXTENSIONS` order (``.safetensors`` first), each in every
    folder in order, first directly (``name`` may hold a subfolder: ``styles/ink``) and then anywhere
    below the folder. Two files with the same name below one folder are refused as ambiguous.
    """
    direct = Path(name).expanduser()
    if direct.suffix.lower() in LORA_EXTENSIONS and direct.is_file():
        return direct
    folders = [Path(d).expanduser() for d in lora_dirs]
    for ext in LORA_EXTENSIONS:
        for folder in folders:
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
        for folder in folders:
            found = sorted(p for p in folder.rglob(f"{Path(name).name}{ext}") if p.is_file()) if folder.is_dir() else []
            if len(found) > 1:
                raise InvalidInputError(f"<lora:{name}>: several files match in {folder}: "
                                        f"{', '.join(str(p.relative_to(folder)) for p in found)}; write the "
                                        "subfolder in the tag, e.g. <lora:subfolder/name:0.8>")
            if found:
                return found[0]
    searched = ", ".join(str(f) for f in folders) or "no folders (set the pipeline's lora_dirs)"
    raise LoRANotFoundError(f"<lora:{name}>: no {name}{{{', '.join(LORA_EXTENSIONS)}}} in {searched}")


def split_lora_tags(prompts: Sequence[str]) -> tuple[list[str], list[NetworkTag]]:
    """``(prompts without their <kind:...> tags, every tag in order)``."""
    texts, tags = [], []
    for prompt in prompts:
        text, found = extract_network_tags(prompt)
        texts.append(text)
        tags += found
    return texts, tags


def requested_loras(tags: Sequence[NetworkTag]) -> tuple[tuple[str, float, float], ...]:
    """The unique ``(name, text-encoder strength, UNet strength)`` LoRA requests of a batch's tags.

    A1111's forms: ``<lora:name:w>`` (both w), ``<lora:name:te:unet>``, ``te=`` / ``unet=`` fields.
    Other kinds (``<hypernet:...>``) and other fields (``dyn=``) are refused by name.
    """
    requests: dict[str, tuple[float, float]] = {}
    for tag in tags:
        if tag.kind != "lora":
            raise InvalidInputError(f"{tag.text}: <{tag.kind}:...> networks are not supported; remove the tag")
        strengths = _strengths(tag)
        if requests.setdefault(tag.name, strengths) != strengths:
            raise InvalidInputError(f"<lora:{tag.name}> is asked for with two different weights in one batch; LoRAs "
                                    "apply to the whole batch, use one weight")
    return tuple((name, te, unet) for name, (te, unet) in requests.items())


def _strengths(tag: NetworkTag) -> tuple[float, float]:
    positional = [a for a in tag.args if "=" not in a]
    named = dict(a.split("=", 1) for a in tag.args if "=" in a)
    unknown = sorted(set(named) - {"te", "unet"})
    if len(positional) > 1 or unknown:
        extra = ", ".join(positional[1:] + [f"{k}=" for k in unknown])
        raise InvalidInputError(f"{tag.text}: {extra} not supported; write <lora:{tag.name}:{tag.weight:g}> or "
                                f"<lora:{tag.name}:TE:UNET>")
    try:
        te = float(named.get("te", tag.weight))
        unet = float(named.get("unet", positional[0] if positional else te))
    except ValueError:
        raise InvalidInputError(f"{tag.text}: a strength is not a number") from None
    return te, unet


class PromptLoRAs:
    """A prompt's ``<lora:name:w>`` tags apply to a clone of the pipeline's model, for that call only: the
    model itself never changes. The clone is kept while the tags (and the base's own patches) stay the
    same, so repeating a prompt does not re-apply its LoRAs."""

    def __init__(self):
        self._key: tuple | None = None
        self._clone = None

    def models_for(self, models, tags: Sequence[NetworkTag], lora_dirs: Sequence[str | Path]):
        """``models`` itself without tags; else a clone of it with the tags' LoRAs applied."""
        wanted = requested_loras(tags)
        if not wanted:
            return models
        key = (id(models), wanted, tuple(str(d) for d in lora_dirs),
               tuple((h.name, h.strength, h.effective_text_strength) for h in getattr(models, "loras", ())),
               tuple(getattr(models, "embeddings", ())))
        if key == self._key:
            return self._clone
        if not hasattr(models, "clone"):
            raise LoRAUnavailableError(f"<lora:{wanted[0][0]}>: LoRA support is not available for this model (it "
                                       "cannot be cloned); remove the tag from the prompt")
        clone = models.clone()
        for name, te, unet in wanted:
            path = resolve_lora(name, lora_dirs)
            present = [h for h in clone.loras if Path(h.name).resolve() == path.resolve()]
            if present:  # the base already has it: the tag sets its strength for this call (as A1111 does)
                present[0].set_strength(unet, text_strength=None if te == unet else te)
            else:
                clone.apply_lora(path, unet) if te == unet else clone.apply_lora(path, unet, text_strength=te)
        self._key, self._clone = key, clone
        return clone
