"""What a model needs in memory, from its detection alone (headers: shapes and configs, no weights read).

Two kinds of bytes:

* **weights**: each component's parameters in the storage dtype (exact: the detection counts them). With fp8
  storage (models/lowbit.py) the denoiser's Linear weights take 1 byte each and everything else the compute
  dtype; the Linear layers are found by building the denoiser on the meta device.
* **activations**: the most bytes one call holds at once above its weights, by a formula per architecture kind:
  a count of "units" that the call's largest tensors scale with, times a factor calibrated by measuring the
  peak of live tensor bytes of real-size models (benchmarks/memory_plan.py; the numbers are in docs/memory.md).

  - DiTs (FLUX, SD3): every block's tensors are tokens x width x a constant (qkv, the MLP's 4x hidden, the
    attention output), so ``units = batch * (image tokens + text tokens) * hidden_size``. Attention maps are
    never held: scaled-dot-product attention runs fused (flash / memory-efficient kernels).
  - LDM UNets (SD 1.x, SDXL, Kolors): the skip connections of every input block are held until the output
    blocks read them, and the widest working set is a transformer's feed-forward (GEGLU: 8x the width, then
    4x) at the largest attended level, else a ResNet's at the full latent size, so ``units = batch *
    (sum of skips + max over levels of pixels x width x (UNET_ATTENTION_WIDTH or UNET_RESNET_WIDTH))``.
  - VAE decode: the last levels run at full image size, so ``units = pixels x block_out_channels[0]``; tiled,
    the pixels are one tile's, plus the full-size fp32 sums that the tiles are blended into.
  - Text encoders: ``batch * tokens * (feed-forward width + 4 x width)`` plus T5's attention scores
    (``heads * tokens^2`` in fp32, transformers' T5 computes them eagerly); small next to the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffstudio.models.unet import CPU_BF16_SCORE_CHUNK
from diffstudio.pipeline.tiled_vae import DECODE_TILE

# Calibrated factors (bytes of live activations per unit per byte of the compute dtype): fitted on tiny widths
# (tests/test_memory_estimate.py) and checked at the released widths with benchmarks/memory_plan.py (docs/memory.md).
# DiTs: (per image-token unit, per text-token unit). FLUX's text tokens run through the same blocks as the image's;
# SD3's context stream is lighter at the moment of the peak (the image stream's MLP).
DIT_FACTORS = {"flux_dit": (22.5, 22.5), "mmdit": (18.0, 8.6)}
UNET_FACTOR = 0.96
UNET_ATTENTION_WIDTH = 18.0  # a transformer block's feed-forward: x, norm, 8C projection, 4C gelu, 4C product
UNET_RESNET_WIDTH = 6.0  # a ResNet block: x, norm, activation, conv, the skip concatenated in the decoder
VAE_FACTOR = 5.7
# pipeline/tiled_vae.py blends the tiles in fp32: while they run it holds the output sum (3 x fp32) and the weight
# sum (fp32) per image pixel; at the end the division adds a second 3 x fp32.
TILE_ACCUMULATOR_BYTES_PER_PIXEL = 3 * 4 + 4
TILE_FINISH_BYTES_PER_PIXEL = 3 * 4 * 2 + 4


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ComponentWeights:
    """One component's parameter counts: all of them, and those in Linear weights (what fp8 storage shrinks)."""

    role: str
    arch: str
    params: int
    linear_params: int = 0

    def bytes(self, dtype: torch.dtype, fp8: bool = False) -> int:
        if not fp8:
            return self.params * dtype_bytes(dtype)
        return self.linear_params + (self.params - self.linear_params) * dtype_bytes(dtype)


def linear_weight_params(arch: str, config) -> tuple[int, int]:
    """(Linear weight parameters, the largest single Linear weight) of ``arch`` built at ``config`` on meta."""
    from diffstudio.components import ARCHS

    with torch.device("meta"):
        module = ARCHS[arch].build(config)
    sizes = [m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return sum(sizes), max(sizes, default=0)


def component_weights(detection, fp8_role: str | None = None) -> dict[str, ComponentWeights]:
    """Per role of ``detection``: its parameter counts. ``fp8_role``'s Linear weights are counted apart."""
    out = {}
    for role, comp in detection.components.items():
        linear = linear_weight_params(comp.arch, comp.config)[0] if role == fp8_role else 0
        out[role] = ComponentWeights(role, comp.arch, comp.num_params, linear)
    return out


# -- activations -----------------------------------------------------------------------------------------------

def dit_units(config, latent_h: int, latent_w: int, text_tokens: int, batch: int) -> tuple[int, int]:
    """(image-token units, text-token units): batch x tokens x hidden size."""
    patch = getattr(config, "patch_size", 2)
    image_tokens = (latent_h // patch) * (latent_w // patch)
    return batch * image_tokens * config.hidden_size, batch * text_tokens * config.hidden_size


def unet_units(config, latent_h: int, latent_w: int, batch: int) -> int:
    pixels, skips, widest = latent_h * latent_w, 0, 0
    for level, mult in enumerate(config.channel_mult):
        level_pixels, width = pixels // 4 ** level, config.model_channels * mult
        skips += (config.num_res_blocks[level] + 1) * level_pixels * width
        per = UNET_ATTENTION_WIDTH if config.transformer_depth[level] else UNET_RESNET_WIDTH
        widest = max(widest, int(per * level_pixels * width))
    return batch * (skips + widest)


def denoiser_activation_bytes(arch: str, config, width: int, height: int, *, text_tokens: int, batch: int,
                              dtype: torch.dtype, downscale: int = 8, device_type: str = "cuda") -> int:
    """Peak live activation bytes of one denoiser call on a ``width`` x ``height`` image. On a CPU in bf16 the
    UNet attends in chunks of materialised scores (models/unet.py) instead of a fused kernel: two chunks more."""
    h, w = height // downscale, width // downscale
    if arch in DIT_FACTORS:
        (per_image, per_text), (image, text) = DIT_FACTORS[arch], dit_units(config, h, w, text_tokens, batch)
        return int((per_image * image + per_text * text) * dtype_bytes(dtype))
    if arch == "ldm_unet":
        size = UNET_FACTOR * unet_units(config, h, w, batch) * dtype_bytes(dtype)
        if device_type == "cpu" and dtype == torch.bfloat16:  # models/unet.py's chunked attention: scores, softmax
            size += 2 * CPU_BF16_SCORE_CHUNK * dtype_bytes(dtype)
        return int(size)
    from diffstudio.errors import MemoryPlanError

    raise MemoryPlanError(f"no activation estimate for a {arch} denoiser yet (estimated: "
                          f"{', '.join([*DIT_FACTORS, 'ldm_unet'])})")


def vae_tile_pixels(width: int, height: int, downscale: int = 8) -> int:
    """Pixels of the largest tile the tiled decoder runs (pipeline/tiled_vae.py's layout)."""
    tile = DECODE_TILE * downscale
    return min(width, tile) * min(height, tile)


def vae_decode_bytes(config, width: int, height: int, *, dtype: torch.dtype, tiled: bool, batch: int = 1,
                     downscale: int = 8) -> int:
    """Peak live bytes of decoding ``batch`` images (decoded together, as the pipeline does)."""
    per_pixel = VAE_FACTOR * config.block_out_channels[0] * dtype_bytes(dtype)
    if not tiled or (width <= DECODE_TILE * downscale and height <= DECODE_TILE * downscale):
        return int(batch * width * height * per_pixel)
    running = vae_tile_pixels(width, height, downscale) * per_pixel + width * height * TILE_ACCUMULATOR_BYTES_PER_PIXEL
    return int(batch * max(running, width * height * TILE_FINISH_BYTES_PER_PIXEL))


def text_encoder_bytes(arch: str, config, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Peak live bytes of encoding ``batch`` prompts of ``tokens`` tokens."""
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    ffn = (getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None)
           or getattr(config, "ffn_hidden_size", None) or 4 * width)
    gated = 2 if arch == "t5_encoder" else 1  # T5's gated-GELU feed-forward holds two ffn-wide tensors
    size = batch * tokens * (gated * ffn + 4 * width) * dtype_bytes(dtype)
    if arch == "t5_encoder":
        size += batch * getattr(config, "num_heads", 0) * tokens * tokens * 4
    return int(size)

