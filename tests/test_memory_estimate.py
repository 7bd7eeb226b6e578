"""Memory estimates (diffstudio/memory/estimate.py) against the measured peak of live tensor bytes, at tiny widths:
the formulas count tensors that scale with tokens x width, so their factors do not depend on the width."""

from __future__ import annotations

import pytest
import torch

from diffstudio.memory import estimate
from diffstudio.memory.measure import TensorPeak

TOLERANCE = 0.15


def _measure(call) -> int:
    with torch.inference_mode(), TensorPeak() as peak:
        call()
    return peak.peak


def _close(estimated: int, measured: int) -> bool:
    return abs(estimated - measured) <= TOLERANCE * measured


def test_tensor_peak_counts_new_storages_once_and_forgets_freed_ones():
    weight = torch.randn(100, 100)
    with TensorPeak() as peak:
        a = weight @ weight          # 40 kB new
        view = weight.t()            # a view of a tensor that existed before: nothing new
        b = (a + 1).relu_()          # 40 kB new; relu_ in place
        del a                        # freed
        c = b * 2                    # 40 kB new
    assert peak.peak == 80_000 and peak.current == 80_000
    del view, c


@pytest.mark.parametrize("size", [256, 512])
def test_flux_step(size):
    from diffstudio.models.flux import FluxConfig, FluxTransformer

    config = FluxConfig(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, context_in_dim=32)
    model = FluxTransformer(config).eval()
    lat, txt = size // 16, 128
    inputs = dict(img=torch.randn(1, lat * lat, 64), img_ids=torch.zeros(1, lat * lat, 3),
                  txt=torch.randn(1, txt, 32), txt_ids=torch.zeros(1, txt, 3), timesteps=torch.tensor([0.5]),
                  y=torch.randn(1, 768), guidance=torch.tensor([3.5]))
    measured = _measure(lambda: model(**inputs))
    estimated = estimate.denoiser_activation_bytes("flux_dit", config, size, size, text_tokens=txt, batch=1,
                                                   dtype=torch.float32)
    assert _close(estimated, measured), (estimated, measured)


@pytest.mark.parametrize("size", [512, 1024])
def test_mmdit_step(size):
    from diffstudio.models.mmdit import MMDiT, MMDiTConfig

    config = MMDiTConfig(depth=1, hidden_size=64, num_heads=1, mlp_hidden_size=256, qk_norm="rms",
                         context_in_dim=32, adm_in_channels=16)
    model = MMDiT(config).eval()
    batch, txt = 2, 333
    x = torch.randn(batch, 16, size // 8, size // 8)
    measured = _measure(lambda: model(x, torch.full((batch,), 500.0), torch.randn(batch, 16),
                                      torch.randn(batch, txt, 32)))
    estimated = estimate.denoiser_activation_bytes("mmdit", config, size, size, text_tokens=txt, batch=batch,
                                                   dtype=torch.float32)
    assert _close(estimated, measured), (estimated, measured)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_unet_step(layout):
    from diffstudio.models.unet import UNetConfig, UNetModel

    if layout == "sd15":  # attention at the first three of four levels
        config = UNetConfig(model_channels=32, context_dim=32, num_heads=4)
    else:  # no attention at the first level, deep transformers below
        config = UNetConfig(model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                            transformer_depth=[0, 1, 2], transformer_depth_middle=2, context_dim=32, num_heads=-1,
                            num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=16)
    model = UNetModel(config).eval()
    batch, size = 2, 256
    x, ctx = torch.randn(batch, 4, size // 8, size // 8), torch.randn(batch, 77, 32)
    extra = {"y": torch.randn(batch, 16)} if config.adm_in_channels else {}
    measured = _measure(lambda: model(x, torch.full((batch,), 500.0), ctx, **extra))
    estimated = estimate.denoiser_activation_bytes("ldm_unet", config, size, size, text_tokens=77, batch=batch,
                                                   dtype=torch.float32)
    assert _close(estimated, measured), (estimated, measured)


def test_vae_decode_whole_and_tiled():
    from diffstudio.models.vae import AutoencoderKL, VAEConfig
    from diffstudio.pipeline.tiled_vae import decode_tiled

    config = VAEConfig(block_out_channels=(32, 64, 128, 128))  # the released ratio of widths (x 1/4)
    vae = AutoencoderKL(config).eval()
    z = torch.randn(1, 4, 24, 24)
    measured = _measure(lambda: vae.decode(z))
    assert _close(estimate.vae_decode_bytes(config, 192, 192, dtype=torch.float32, tiled=False), measured)
    # tiled: one 16-latent tile at a time (the estimate's tile is DECODE_TILE; scaled down here)
    z = torch.randn(1, 4, 40, 40)
    measured = _measure(lambda: decode_tiled(vae, z, tile=16, overlap=4, progress=False))
    expected = 128 * 128 * estimate.VAE_FACTOR * 32 * 4 + 320 * 320 * estimate.TILE_ACCUMULATOR_BYTES_PER_PIXEL
    assert _close(expected, measured), (expected, measured)


def test_weights_of_a_component_and_its_fp8_storage():
    from diffstudio.models.flux import FluxConfig

    config = FluxConfig(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, context_in_dim=32)
    linear, largest = estimate.linear_weight_params("flux_dit", config)
    from diffstudio.models.flux import FluxTransformer

    model = FluxTransformer(config)
    total = sum(p.numel() for p in model.parameters())
    weights = estimate.ComponentWeights("dit", "flux_dit", total, linear)
    assert weights.bytes(torch.bfloat16) == 2 * total
    stored = model.to(torch.bfloat16)
    for module in stored.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    assert weights.bytes(torch.bfloat16, fp8=True) == sum(p.numel() * p.element_size() for p in stored.parameters())
    assert largest == max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
