"""Region prompts: a different prompt for each area of one image, for every family.

    pipe("two shapes, white background", regions=[
        Region("a red circle", box=(0, 0, 0.5, 1)),
        Region("a blue square", box=(0.5, 0, 1, 1), feather=0.05),
    ], region_mode="latent")   # or "attention"

Two modes (docs/regions.md):

* ``"latent"`` — one denoiser pass per prompt (the global one and each region's, each with its
  own negative and CFG), x0 predictions blended per pixel (``region_latent``). N regions cost
  N + 1 passes; it only calls the denoiser, so it runs on every model.
* ``"attention"`` — one pass: every prompt's text tokens in one context, and an attention bias
  that lets each image token attend only to the prompts holding it (``region_attention``); it
  needs the model's hook (the LDM UNet has it).

Both use the same per-pixel weights (``region_masks.blend_weights``): regions by mask x
weight, the global prompt by ``global_weight`` plus whatever the regions leave uncovered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from diffstudio.errors import RegionError
from diffstudio.pipeline.guidance import CFGDenoiser

MODES = ("latent", "attention")
DEFAULT_GLOBAL_WEIGHT = 0.2


@dataclass
class Region:
    """One area of the image and its prompt.

    mask: an image, array, tensor or path (white = the region; grey = partly), or
    box: (x0, y0, x1, y1) in fractions of the image, (0, 0) = top-left; neither = the whole image.
    weight: the region's strength against the global prompt and overlapping regions (0 = off).
    negative_prompt: None = the global negative prompt.
    feather: soft edges, a Gaussian blur of std ``feather`` x the image's shorter side (0.05 = 5 %).
    """

    prompt: str
    mask: Any = None
    box: tuple[float, float, float, float] | None = None
    weight: float = 1.0
    negative_prompt: str | None = None
    feather: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise RegionError(f"a region's prompt must be a string, not {type(self.prompt).__name__}")
        if self.mask is not None and self.box is not None:
            raise RegionError(f"the region {self.prompt!r} has both a mask and a box; give one of them")
        if self.box is not None:
            self.box = check_box(self.box)
        if isinstance(self.mask, (str, Path)) and not Path(self.mask).expanduser().is_file():
            raise RegionError(f"the mask file of the region {self.prompt!r} does not exist: {self.mask}")
        if not _finite_number(self.weight) or self.weight < 0:
            raise RegionError(f"the region {self.prompt!r} has weight {self.weight!r}; weights are numbers >= 0")
        if not _finite_number(self.feather) or self.feather < 0:
            raise RegionError(f"the region {self.prompt!r} has feather {self.feather!r}; use a number >= 0 "
                              "(a fraction of the image's shorter side, e.g. 0.05)")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise RegionError(f"the region {self.prompt!r} has a negative prompt that is not a string")


@dataclass
class RegionLayout:
    """Regions plus the settings that apply to all of them.

    global_weight: the global prompt's base share of every pixel (it also gets what the regions
    leave uncovered). max_batch: at most this many latent rows per network call in latent mode
    (None: every pass in one call).
    """

    regions: list[Region] = field(default_factory=list)
    global_weight: float = DEFAULT_GLOBAL_WEIGHT
    max_batch: int | None = None

    def __post_init__(self) -> None:
        self.regions = [as_region(r) for r in self.regions]
        if not _finite_number(self.global_weight) or self.global_weight < 0:
            raise RegionError(f"global_weight must be a number >= 0, got {self.global_weight!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise RegionError(f"max_batch must be a positive integer or None, got {self.max_batch!r}")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box(box) -> tuple[float, float, float, float]:
    """A valid (x0, y0, x1, y1) in fractions, or RegionError saying what is wrong."""
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4 \
            or not all(_finite_number(v) for v in box):
        raise RegionError(f"a box is four numbers (x0, y0, x1, y1) in fractions of the image, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RegionError(f"bad box {list(box)}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the "
                          "image, (0, 0) = top-left)")
    return x0, y0, x1, y1


def as_region(item) -> Region:
    if isinstance(item, Region):
        return item
    if isinstance(item, dict):
        known = {f.name for f in fields(Region)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise RegionError(f"unknown region key(s) {unknown}; known: {sorted(known)}")
        if "prompt" not in item:
            raise RegionError("a region needs a 'prompt'")
        return Region(**item)
    raise RegionError(f"a region is a diffstudio.Region or a dict, not {type(item).__name__}")


def as_layout(regions) -> RegionLayout:
    """A RegionLayout from a layout, or a list of Regions / dicts."""
    if isinstance(regions, RegionLayout):
        return regions
    if isinstance(regions, (Region, dict)):
        regions = [regions]
    return RegionLayout(list(regions))


def region_recipe(regions, mode: str) -> dict:
    """What the PNG recipe records (``extra``): {} without regions."""
    if regions is None:
        return {}
    layout = as_layout(regions)
    if not layout.regions:
        return {}
    items = []
    for r in layout.regions:
        item: dict = {"prompt": r.prompt, "weight": r.weight}
        if r.box is not None:
            item["box"] = list(r.box)
        if r.mask is not None:
            item["mask"] = str(r.mask) if isinstance(r.mask, (str, Path)) else "(in-memory mask)"
        if r.negative_prompt is not None:
            item["negative_prompt"] = r.negative_prompt
        if r.feather:
            item["feather"] = r.feather
        items.append(item)
    return {"regions": {"mode": mode, "global_weight": layout.global_weight, "regions": items}}


# ------------------------------------------------------------------------------------------
# The denoiser


def _rows(cond: dict, index: list[int]) -> dict:
    idx = torch.tensor(index)
    return {k: v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


def encode_passes(encode, regions: list[Region], prompts: list[str], negatives: list[str],
                  given: tuple[dict, dict]) -> list[tuple[dict, dict]]:
    """(cond, uncond) per pass: the global prompt first, then each region, each with the batch's rows.

    ``encode(prompts, negatives) -> (cond, uncond)`` is the run's prompt encoder. Every prompt and
    negative is encoded in one batch so their token lengths pad alike. Entries the pipeline added to
    the global conditioning (image-side inputs such as ``c_concat``) are shared by every pass.
    """
    from diffstudio.conditioning.lora_tags import split_lora_tags

    n, count = len(prompts), len(regions)
    for r in regions:
        if split_lora_tags([r.prompt, r.negative_prompt or ""])[1]:
            raise RegionError(f"the region {r.prompt!r} holds a <lora:...> tag: a LoRA changes the whole model, "
                              "so put its tag in the global prompt")
    region_negatives = [r.negative_prompt if r.negative_prompt is not None else negatives[i]
                        for r in regions for i in range(n)]
    with torch.inference_mode():
        cond, uncond = encode(prompts + [r.prompt for r in regions], negatives + region_negatives)
    passes = [(_rows(cond, list(range(n))), _rows(uncond, list(range(n))))]
    passes += [(_rows(cond, [n + r] * n), _rows(uncond, [n + r * n + i for i in range(n)])) for r in range(count)]
    extra_c = {k: v for k, v in given[0].items() if k not in cond}
    extra_u = {k: v for k, v in given[1].items() if k not in uncond}
    return [({**c, **extra_c}, {**u, **extra_u}) for c, u in passes]


def region_denoiser(denoiser, regions, mode: str, gen):
    """The guided denoiser of a run with regions (``modules.RegionPrompts``); ``gen`` is the run's
    ``modules.Generation`` (its prompts, encoder, conditioning, size and CFG scale)."""
    from diffstudio.pipeline.region_attention import attention_conditioning
    from diffstudio.pipeline.region_latent import RegionLatentDenoiser
    from diffstudio.pipeline.region_masks import blend_weights, region_mask

    request, cfg_scale = gen.request, gen.request.cfg_scale
    if mode not in MODES:
        raise RegionError(f"unknown region_mode {mode!r}; use one of {', '.join(MODES)}")
    layout = as_layout(regions)
    active = [r for r in layout.regions if r.weight > 0]  # a weight-0 region changes nothing: no pass
    if not active:
        return CFGDenoiser(denoiser, gen.cond, gen.uncond, cfg_scale)
    latent_hw = gen.latent_shape[1:]
    size = (request.width, request.height)
    masks = torch.stack([region_mask(r, size, latent_hw) for r in active])
    weights = blend_weights(masks, torch.tensor([float(r.weight) for r in active]), layout.global_weight)
    passes = encode_passes(gen.encode, active, gen.prompts, gen.negatives, (gen.cond, gen.uncond))
    if mode == "attention":
        c, u = attention_conditioning(gen.models.denoiser, [p[0] for p in passes], [p[1] for p in passes],
                                      weights, latent_hw)
        return CFGDenoiser(denoiser, c, u, cfg_scale)
    keep = [p for p in range(len(passes)) if weights[p].max() > 0]  # e.g. the global pass at global_weight 0
    return RegionLatentDenoiser(denoiser, [passes[p] for p in keep], weights[keep], cfg_scale, layout.max_batch)
