"""Fewer network evaluations, opt-in: DeepCache feature reuse (pipeline/deep_cache.py) and guidance on the first
steps only (pipeline/cfg_until.py). Off, the output is bit-identical; on, the network does the work stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.deep_cache import DeepCache, FeatureSlot

SMALL = dict(width=64, height=64, progress=False, sampler="euler", seed=3)


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.context_dim, generator=g)
    return x, torch.tensor([500.0, 500.0]), context


def _counting(pipe):
    """Hooks that count the UNet's calls, its rows and the middle block's calls (full passes)."""
    counts = {"calls": 0, "rows": 0, "middle": 0}
    unet = pipe.models.unet

    def on_unet(_, args, kwargs):
        counts["calls"] += 1
        counts["rows"] += args[0].shape[0]

    def on_middle(*_):
        counts["middle"] += 1

    handles = [unet.register_forward_pre_hook(on_unet, with_kwargs=True),
               unet.middle_block.register_forward_pre_hook(on_middle)]
    return counts, handles


def _array(image):
    return np.asarray(image)


# -- the UNet's hook --------------------------------------------------------------------------------------------

def test_a_slot_that_never_reuses_leaves_the_unet_output_bit_identical(pipe):
    unet = pipe.models.unet
    x, t, context = _inputs(unet)
    with torch.inference_mode():
        plain = unet(x, t, context)
        slot = FeatureSlot(branch=1)
        cached = unet(x, t, context, feature_cache=slot)
    assert torch.equal(plain, cached)
    assert slot.feature is not None  # the full pass stored the deep feature


def test_a_reused_pass_from_the_same_inputs_equals_the_full_pass_at_every_branch(pipe):
    """The partial pass (shallow input blocks + the stored deep feature + shallow output blocks) is the full pass
    when the feature comes from the same inputs: the skip pairing and the resumption point are right."""
    unet = pipe.models.unet
    x, t, context = _inputs(unet)
    with torch.inference_mode():
        full = unet(x, t, context)
        for branch in range(len(unet.input_blocks) - 1):
            slot = FeatureSlot(branch=branch)
            unet(x, t, context, feature_cache=slot)
            slot.reuse = True
            partial = unet(x, t, context, feature_cache=slot)
            torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5, msg=f"branch {branch}")
            other = unet(x + 1, t, context, feature_cache=slot)  # and the shallow blocks do see the new input
            assert not torch.allclose(other, full)


# -- DeepCache in the pipeline ----------------------------------------------------------------------------------

def test_deep_cache_runs_one_full_pass_in_reuse_plus_one_calls(pipe):
    counts, handles = _counting(pipe)
    try:
        plain = pipe("a red circle", steps=7, **SMALL)[0]
        assert (counts["calls"], counts["middle"]) == (7, 7)
        counts.update(calls=0, middle=0, rows=0)
        image = pipe("a red circle", steps=7, deep_cache=2, **SMALL)[0]
    finally:
        for h in handles:
            h.remove()
    assert counts["calls"] == 7 and counts["middle"] == 3  # full at calls 0, 3, 6; 4 calls reuse
    assert image.info["diffstudio_recipe"]["extra"]["deep_cache"] == {"reuse": 2, "branch": 0}
    assert not np.array_equal(_array(image), _array(plain))


def test_levers_off_give_the_same_image_as_before(pipe):
    a = pipe("a red circle", steps=3, **SMALL)[0]
    b = pipe("a red circle", steps=3, deep_cache=None, cfg_until=None, **SMALL)[0]
    assert np.array_equal(_array(a), _array(b))
    c = pipe("a red circle", steps=3, cfg_until=1.0, **SMALL)[0]  # guidance on every step: the plain run
    assert np.array_equal(_array(a), _array(c))


def test_deep_cache_values_that_cannot_work_are_named_errors(pipe):
    with pytest.raises(InvalidInputError, match="reuse"):
        DeepCache(0)
    with pytest.raises(InvalidInputError, match="branch"):
        pipe("a red circle", steps=2, modules=[DeepCache(1, branch=99)], **SMALL)


# -- guidance on the first steps only ---------------------------------------------------------------------------

def test_cfg_until_evaluates_one_row_per_image_after_the_fraction(pipe):
    counts, handles = _counting(pipe)
    try:
        pipe("a red circle", steps=4, cfg_until=0.5, **SMALL)
    finally:
        for h in handles:
            h.remove()
    assert counts["calls"] == 4 and counts["rows"] == 2 + 2 + 1 + 1  # 6 rows instead of 8


def test_cfg_until_zero_is_the_conditional_prediction_alone(pipe):
    """After the fraction the image follows the conditional prediction: with no guided step at all that is the
    run with cfg_scale 1, where CFG itself skips the unconditional branch."""
    unguided = pipe("a red circle", steps=3, cfg_scale=1.0, **SMALL)[0]
    truncated = pipe("a red circle", steps=3, cfg_until=0.0, **SMALL)[0]
    assert np.array_equal(_array(unguided), _array(truncated))
    guided = pipe("a red circle", steps=3, **SMALL)[0]
    assert not np.array_equal(_array(guided), _array(truncated))


def test_cfg_until_outside_zero_to_one_is_refused(pipe):
    with pytest.raises(InvalidInputError, match="fraction"):
        pipe("a red circle", steps=2, cfg_until=1.5, **SMALL)


def test_the_command_line_flags_reach_the_pipeline(tmp_path, monkeypatch):
    from diffstudio.cli import main

    seen = {}

    def fake_call(self, prompt, negative="", **options):
        seen.update(options)
        raise SystemExit(0)

    monkeypatch.setattr(diffstudio.Pipeline, "__call__", fake_call)
    monkeypatch.setattr(diffstudio, "load", lambda *a, **k: untrained_demo_models())
    with pytest.raises(SystemExit):
        main(["generate", "x", "-o", str(tmp_path / "x.png"), "--deep-cache", "2", "--cfg-until", "0.4"])
    assert seen["deep_cache"] == 2 and seen["cfg_until"] == 0.4
