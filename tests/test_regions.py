"""Region prompts on a tiny random SD 1.x: masks and blending weights, latent mode, attention mode.

The tiny model draws noise, not shapes, so behaviour is checked on the numbers: what must equal
plain generation does (within float tolerance), what must be blocked gets zero attention, and
a region changes the prediction inside its box and nowhere else (latent mode).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import diffstudio
from diffstudio import Region, RegionError, RegionLayout
from diffstudio.pipeline.guidance import CFGDenoiser
from diffstudio.pipeline.region_attention import cross_attention_bias, joint_attention_bias
from diffstudio.pipeline.region_latent import RegionLatentDenoiser
from diffstudio.pipeline.region_masks import blend_weights, box_mask, region_mask, token_grid_weights
from diffstudio.pipeline.regions import region_recipe
from diffstudio.pipeline.request import Request
from tests.tiny_sd15 import reference_models, write_diffusers_folder

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = write_diffusers_folder(tmp_path_factory.mktemp("regions") / "sd15", *reference_models())
    return diffstudio.Pipeline(diffstudio.load(folder))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def final_x0(pipe, prompt, **kwargs) -> torch.Tensor:
    """The last x0 prediction of a generation (before VAE rounding)."""
    seen = []
    pipe(prompt, **SIZE, steps=4, seed=3, progress=False, callback=lambda i, n, x, d: seen.append(d), **kwargs)
    return seen[-1]


def guided(pipe, prompt, regions=None, mode="latent", cfg=5.0, negative=""):
    """The guided denoiser Pipeline.__call__ would sample with, at 64 x 64."""
    return pipe.prepare(Request(prompt, negative, **SIZE, cfg_scale=cfg, clip_skip=1, regions=regions,
                                region_mode=mode)).guided


def predict(denoiser, seed=0, sigma=4.0) -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigma
    with torch.inference_mode():
        return denoiser(x, torch.tensor([sigma]))


# ------------------------------------------------------------------ masks and weights


def test_box_masks_have_latent_resolution_and_exact_coverage():
    left = region_mask(Region("x", box=(0, 0, 0.5, 1)), (64, 48), (6, 8))
    assert left.shape == (6, 8)
    assert torch.equal(left[:, :4], torch.ones(6, 4)) and torch.equal(left[:, 4:], torch.zeros(6, 4))
    # A box edge through a pixel covers that pixel partly: 0.3 of 8 columns = 2.4 columns.
    m = box_mask((0, 0, 0.3, 1), 4, 8)
    assert torch.allclose(m[0], torch.tensor([1, 1, 0.4, 0, 0, 0, 0, 0]))
    assert math.isclose(float(m.sum()), 0.3 * 32, rel_tol=1e-6)


def test_image_masks_are_area_averaged_to_the_latent():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    from_image = region_mask(Region("x", mask=Image.fromarray(mask)), (64, 64), (8, 8))
    from_box = region_mask(Region("x", box=(0.5, 0, 1, 1)), (64, 64), (8, 8))
    assert torch.allclose(from_image, from_box)
    with pytest.raises(RegionError, match="covers nothing"):
        region_mask(Region("x", mask=Image.new("L", (64, 64), 0)), (64, 64), (8, 8))


def test_feathering_softens_the_edge_but_not_the_image_border():
    hard = region_mask(Region("x", box=(0, 0, 0.5, 1)), (128, 128), (16, 16))
    soft = region_mask(Region("x", box=(0, 0, 0.5, 1), feather=0.1), (128, 128), (16, 16))
    row = soft[8]
    assert 0 < row[7] < 1 and 0 < row[8] < 1                      # the edge is soft on both sides
    assert torch.all(row[:-1] >= row[1:])                         # falling across the edge
    assert math.isclose(float(row[0]), 1.0, abs_tol=1e-4)         # border kept whole (replicate)
    assert math.isclose(float(soft.sum()), float(hard.sum()), rel_tol=1e-3)  # mass preserved


def test_blend_weights_normalise_overlaps_and_give_the_rest_to_the_global_prompt():
    masks = torch.stack([box_mask((0, 0, 0.75, 1), 4, 4), box_mask((0.25, 0, 1, 1), 4, 4)])
    w = blend_weights(masks, torch.tensor([1.0, 1.0]), global_weight=0.5)
    assert w.shape == (3, 4, 4)
    assert torch.allclose(w.sum(0), torch.ones(4, 4))
    # Column 0: region 1 alone (g = 0.5): 1 / 1.5. Columns 1-2: both overlap, g = 0.5: 1 / 2.5 each.
    assert torch.allclose(w[:, 0, 0], torch.tensor([0.5 / 1.5, 1 / 1.5, 0.0]))
    assert torch.allclose(w[:, 0, 1], torch.tensor([0.5 / 2.5, 1 / 2.5, 1 / 2.5]))
    # Nothing covered: all global. A heavier region takes a larger share.
    empty = blend_weights(box_mask((0, 0, 0.5, 1), 2, 4)[None], torch.tensor([2.0]), global_weight=0.0)
    assert torch.allclose(empty[:, 0, 3], torch.tensor([1.0, 0.0]))
    heavy = blend_weights(torch.ones(2, 1, 1), torch.tensor([2.0, 1.0]), global_weight=0.0)
    assert torch.allclose(heavy[:, 0, 0], torch.tensor([0.0, 2 / 3, 1 / 3]))
    # Area pooling to a token grid keeps the per-token sum at 1.
    assert torch.allclose(token_grid_weights(w, (3, 3)).sum(0), torch.ones(9))


@pytest.mark.parametrize("box", [(0.5, 0, 0.5, 1), (0.6, 0, 0.4, 1), (0, 0, 1.2, 1), (-0.1, 0, 1, 1),
                                 (0, 0, 1), (0, 0, float("nan"), 1), "0,0,1,1", (0, 0, True, 1)])
def test_invalid_boxes_raise(box):
    with pytest.raises(RegionError):
        Region("x", box=box)


def test_invalid_regions_raise_named_errors(tmp_path):
    with pytest.raises(RegionError, match="both a mask and a box"):
        Region("x", box=(0, 0, 1, 1), mask=Image.new("L", (8, 8), 255))
    with pytest.raises(RegionError, match="does not exist"):
        Region("x", mask=tmp_path / "nope.png")
    with pytest.raises(RegionError, match="weight"):
        Region("x", weight=-1)
    with pytest.raises(RegionError, match="feather"):
        Region("x", feather=float("inf"))
    with pytest.raises(RegionError, match="unknown region key"):
        RegionLayout([{"prompt": "x", "bx": [0, 0, 1, 1]}])
    with pytest.raises(RegionError, match="global_weight"):
        RegionLayout([Region("x")], global_weight=-0.5)
    assert isinstance(RegionError("x"), diffstudio.InvalidInputError)


# ------------------------------------------------------------------ latent mode


def test_latent_mode_full_region_with_the_global_prompt_equals_plain(pipe):
    plain = final_x0(pipe, "a red circle")
    region = final_x0(pipe, "a red circle", regions=[Region("a red circle")])
    assert (plain - region).abs().max() <= 1e-4 * plain.abs().max()  # the same passes, batched differently
    a = pipe("a red circle", **SIZE, steps=4, seed=3, progress=False)[0]
    b = pipe("a red circle", **SIZE, steps=4, seed=3, progress=False, regions=[Region("a red circle")])[0]
    assert np.abs(arr(a) - arr(b)).max() <= 1


def test_weight_zero_region_changes_nothing(pipe):
    plain = final_x0(pipe, "a red circle")
    off = final_x0(pipe, "a red circle", regions=[Region("a blue square", box=(0, 0, 0.5, 1), weight=0)])
    assert torch.equal(plain, off)
    one = [Region("a green star", box=(0.5, 0, 1, 1))]
    with_off = one + [Region("a blue square", box=(0, 0, 0.5, 1), weight=0.0)]
    for mode in ("latent", "attention"):
        a = final_x0(pipe, "a red circle", regions=one, region_mode=mode)
        b = final_x0(pipe, "a red circle", regions=with_off, region_mode=mode)
        assert (a - b).abs().max() <= 1e-6


def test_latent_mode_changes_the_prediction_only_inside_the_region(pipe):
    plain = predict(guided(pipe, "a red circle"))
    right = predict(guided(pipe, "a red circle", [Region("a blue square", box=(0.5, 0, 1, 1))]))
    left_change = (plain[..., :4] - right[..., :4]).abs().max()    # the global prompt alone (batching rounds)
    right_change = (plain[..., 4:] - right[..., 4:]).abs().mean()  # the region's prompt (a weak random model)
    assert left_change < 5e-4 and right_change > 10 * left_change


def test_latent_mode_blends_the_guided_passes_by_the_weights(pipe):
    layout = RegionLayout([Region("a blue square", box=(0.5, 0, 1, 1), negative_prompt="green")],
                          global_weight=0.25)
    blended = predict(guided(pipe, "a red circle", layout))
    glob = predict(guided(pipe, "a red circle"))
    region = predict(guided(pipe, "a blue square", negative="green"))
    # Right half: g = 0.25, region 1 -> 0.2 global + 0.8 region; the region keeps its own negative.
    # (atol: the passes run in calls of other batch sizes, whose fp32 kernels round differently, ~3e-6 relative)
    assert torch.allclose(blended[..., 4:], 0.2 * glob[..., 4:] + 0.8 * region[..., 4:], atol=1e-4)
    default_negative = predict(guided(pipe, "a red circle", RegionLayout(
        [Region("a blue square", box=(0.5, 0, 1, 1))], global_weight=0.25)))
    assert (default_negative - blended).abs().max() > 1e-4


def test_latent_mode_batches_passes_into_one_call_or_as_max_batch_allows(pipe):
    regions = [Region("a blue square", box=(0, 0, 0.5, 1)), Region("a green star", box=(0.5, 0, 1, 1))]
    one_call = guided(pipe, "a red circle", RegionLayout(regions))
    split = guided(pipe, "a red circle", RegionLayout(regions, max_batch=2))
    assert isinstance(one_call, RegionLatentDenoiser)
    a, b = predict(one_call), predict(split)
    assert one_call.network_calls == 1 and split.network_calls == 3  # 3 passes x (cond, uncond) = 6 rows
    assert torch.allclose(a, b, atol=1e-4)
    # Global weight 0 with full coverage: the global pass has no weight anywhere and is skipped.
    covered = guided(pipe, "a red circle", RegionLayout(regions, global_weight=0.0))
    assert len(covered.passes) == 2


def test_batches_of_images_get_the_regions_too(pipe):
    regions = [Region("a blue square", box=(0.5, 0, 1, 1))]
    batch = pipe(["a red circle", "a green star"], **SIZE, steps=3, seed=5, progress=False, regions=regions)
    single = pipe("a green star", **SIZE, steps=3, seed=6, progress=False, regions=regions)[0]
    assert np.abs(arr(batch[1]) - arr(single)).max() <= 1


# ------------------------------------------------------------------ attention mode


def test_attention_bias_blocks_attention_to_masked_tokens():
    from diffstudio.models.layers import attention
    from diffstudio.models.unet import cpu_bf16_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    bias = torch.zeros(1, 1, 6, 5)
    bias[..., :3, 2:] = float("-inf")            # queries 0-2 may only see keys 0-1
    bias[..., 3:, :2] = float("-inf")            # queries 3-5 only keys 2-4
    k5, v5 = k[:, :5], v[:, :5]
    out = attention(q, k5, v5, heads=2, mask=bias)
    assert torch.allclose(out[:, :3], attention(q[:, :3], k5[:, :2], v5[:, :2], heads=2), atol=1e-6)
    assert torch.allclose(out[:, 3:], attention(q[:, 3:], k5[:, 2:], v5[:, 2:], heads=2), atol=1e-6)
    # Masked tokens get exactly zero weight: huge values behind the mask change nothing.
    v_poisoned = v5.clone()
    v_poisoned[:, 2:] = 1e6
    assert torch.allclose(attention(q[:, :3], k5, v_poisoned, heads=2, mask=bias[..., :3, :]), out[:, :3], atol=1e-6)
    # The CPU bf16 path of the UNet honours the same bias.
    bf = cpu_bf16_attention(q.bfloat16(), k5.bfloat16(), v5.bfloat16(), 2, bias.bfloat16()).float()
    assert torch.allclose(bf, out, atol=5e-2)
    bf_poisoned = cpu_bf16_attention(q.bfloat16(), k5.bfloat16(), v_poisoned.bfloat16(), 2, bias.bfloat16())
    assert bf_poisoned[:, :3].abs().max() < 10


def test_unet_token_grids_and_per_level_bias_sizes(pipe):
    unet = pipe.models.denoiser
    assert unet.region_token_grids(9, 12) == [(9, 12), (5, 6)]      # stride-2 convs round up
    weights = blend_weights(box_mask((0, 0, 0.5, 1), 9, 12)[None], torch.tensor([1.0]), 0.0)
    bias = cross_attention_bias(weights, [0, 0, 1, 1, 1], unet.region_token_grids(9, 12))
    assert set(bias) == {108, 30}
    assert bias[108].shape == (1, 1, 108, 5) and bias[30].shape == (1, 1, 30, 5)
    level0 = bias[108][0, 0].view(9, 12, 5)
    assert torch.all(level0[:, :6, 0] == float("-inf"))          # left half: the global prompt has no weight...
    assert torch.all(level0[:, :6, 2:] == 0)                      # ...its region all of it
    assert torch.all(level0[:, 6:, :2] == 0) and torch.all(level0[:, 6:, 2:] == float("-inf"))


def test_attention_mode_single_region_equal_to_the_global_prompt_equals_plain(pipe):
    plain = final_x0(pipe, "a red circle")
    region = final_x0(pipe, "a red circle", regions=[Region("a red circle")], region_mode="attention")
    assert torch.allclose(plain, region, atol=1e-4, rtol=1e-4)
    boxed = final_x0(pipe, "a red circle", regions=[Region("a red circle", box=(0.25, 0.25, 0.75, 0.75))],
                     region_mode="attention")
    assert torch.allclose(plain, boxed, atol=1e-4, rtol=1e-4)


def test_attention_mode_region_prompt_changes_the_picture_and_runs_at_odd_sizes(pipe):
    plain = predict(guided(pipe, "a red circle"))
    region = guided(pipe, "a red circle", [Region("a blue square", box=(0.5, 0, 1, 1))], mode="attention")
    assert isinstance(region, CFGDenoiser) and "context_bias" in region.cond
    assert region.cond["context"].shape[1] == 2 * 77
    assert (predict(region) - plain).abs().mean() > 1e-4
    out = pipe("a red circle", width=72, height=40, steps=2, progress=False, region_mode="attention",
               regions=[Region("a blue square", box=(0.5, 0, 1, 1), feather=0.1)])[0]
    assert out.size == (72, 40)


def test_joint_attention_bias_structure():
    weights = blend_weights(box_mask((0, 0, 0.5, 1), 2, 2)[None], torch.tensor([1.0]), 0.0)  # (2, 2, 2)
    bias = joint_attention_bias(weights, [0, 0, 1], (2, 2))[0, 0]  # 3 text + 4 image tokens
    inf = float("-inf")
    assert bias.shape == (7, 7)
    assert torch.equal(bias[:3, :3], torch.tensor([[0, 0, inf], [0, 0, inf], [inf, inf, 0]]))
    # Image tokens (row-major: 0 left, 1 right, 2 left, 3 right): the region holds the left column.
    assert torch.equal(bias[3:, :3], torch.tensor([[inf, inf, 0], [0, 0, inf], [inf, inf, 0], [0, 0, inf]]))
    assert torch.equal(bias[:3, 3:], bias[3:, :3].T)
    assert torch.equal(bias[3:, 3:], torch.zeros(4, 4))


def test_attention_mode_needs_the_models_hook(pipe):
    class NoHook(torch.nn.Module):
        pass

    from diffstudio.pipeline.region_attention import region_hook

    with pytest.raises(RegionError, match="region_mode='latent'"):
        region_hook(NoHook())
    with pytest.raises(RegionError, match="unknown region_mode"):
        guided(pipe, "x", [Region("y")], mode="cross")


def test_lora_tags_belong_in_the_global_prompt(pipe):
    with pytest.raises(RegionError, match="global prompt"):
        guided(pipe, "x", [Region("a star <lora:shapes:0.5>")])


# ------------------------------------------------------------------ recipe and inpainting


def test_regions_are_recorded_in_the_recipe(pipe):
    image = pipe("a red circle", **SIZE, steps=2, progress=False, region_mode="attention",
                 regions=[Region("a blue square", box=(0.5, 0, 1, 1), negative_prompt="red", feather=0.05)])[0]
    recorded = image.info["diffstudio_recipe"]["extra"]["regions"]
    assert recorded["mode"] == "attention" and recorded["global_weight"] == 0.2
    assert recorded["regions"] == [{"prompt": "a blue square", "weight": 1.0, "box": [0.5, 0.0, 1.0, 1.0],
                                    "negative_prompt": "red", "feather": 0.05}]
    assert region_recipe(None, "latent") == {} and region_recipe([], "latent") == {}


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_regions_compose_with_inpainting(pipe, mode):
    init = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    out = pipe("a star", init_image=init, mask=Image.fromarray(mask), strength=1.0, steps=3, seed=2, progress=False,
               regions=[Region("a blue square", box=(0.5, 0, 1, 1))], region_mode=mode)[0]
    assert np.array_equal(arr(out)[:, :32], arr(init)[:, :32])


# ------------------------------------------------------------------ SD 1.x (other families: test_regions_families.py)


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_regions_run_on_sd15(pipe, mode):
    out = pipe("a red circle", **SIZE, steps=2, progress=False, region_mode=mode, cfg_scale=1.0,
               regions=[Region("a blue square", box=(0, 0, 0.5, 1)), Region("a star", box=(0.4, 0.2, 1, 0.9))])[0]
    assert np.isfinite(arr(out)).all() and out.size == (64, 64)
