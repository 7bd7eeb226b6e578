"""Token merging (ToMe for SD): our UNet with merging against diffusers' UNet patched by the released ``tomesd``
(the reference implementation), the pipeline option, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import tomesd
import torch

import diffstudio
from diffstudio.errors import InvalidInputError
from diffstudio.models.token_merge import MergePlan, TokenMerge, TokenMerging
from tests.test_unet import inputs, ours_from, reference, rel_err


@pytest.mark.parametrize("kind,size,batch,ratio,max_downsample", [
    ("sd1", (16, 16), 2, 0.5, 1),
    ("sd1", (14, 18), 2, 0.3, 2),   # a grid of 7 x 9 at the second level: the stride leaves a column
    ("sd1", (16, 16), 1, 0.6, 1),   # an odd batch: the windows' first places (no random draw)
    ("sdxl", (16, 16), 2, 0.5, 2),  # SDXL has no transformer at full resolution
])
def test_a_merged_unet_equals_diffusers_patched_by_tomesd(kind, size, batch, ratio, max_downsample):
    ref = reference(kind)
    ours, _ = ours_from(ref)
    (x, t, context), ref_kwargs, our_kwargs = inputs(kind, size)
    x, t, context = x[:batch], t[:batch], context[:batch]
    ref_kwargs = {k: {n: v[:batch] for n, v in d.items()} for k, d in ref_kwargs.items()}
    our_kwargs = {k: v[:batch] for k, v in our_kwargs.items()}
    with torch.no_grad():
        plain = ref(x, t, context, **ref_kwargs).sample
        tomesd.apply_patch(ref, ratio=ratio, max_downsample=max_downsample, use_rand=True)
        ref._tome_info["args"]["generator"] = torch.Generator().manual_seed(7)
        expected = ref(x, t, context, **ref_kwargs).sample
        merging = TokenMerging(TokenMerge(ratio, max_downsample), torch.Generator().manual_seed(7))
        got = ours(x, t, context, token_merge=merging, **our_kwargs)
    assert rel_err(expected, plain) > 1e-3  # the merge changes the output...
    assert rel_err(got, expected) < 1e-4  # ...exactly as the reference's does
    with torch.no_grad():  # and it is taken off after the call
        assert rel_err(ours(x, t, context, **our_kwargs), plain) < 1e-5


def test_merge_then_unmerge_keeps_unmerged_tokens_and_averages_merged_ones():
    x = torch.randn(2, 6 * 8, 5)
    plan = MergePlan(x, 6, 8, r=20, stride=2, generator=torch.Generator().manual_seed(0))
    merged = plan.merge(x)
    assert merged.shape == (2, 48 - 20, 5)
    back = plan.unmerge(merged)
    kept = plan.src.expand(2, -1).gather(1, plan.kept)
    assert torch.equal(back.gather(1, kept.unsqueeze(-1).expand(-1, -1, 5)),
                       x.gather(1, kept.unsqueeze(-1).expand(-1, -1, 5)))
    # a destination's value is the mean of itself and the sources merged into it
    row, d = 0, int(plan.target[0, 0])
    members = [plan.dst[d]] + [plan.src[int(s)] for s, t in zip(plan.merged[row], plan.target[row]) if int(t) == d]
    assert torch.allclose(back[row, plan.dst[d]], x[row, members].mean(0), atol=1e-6)


def test_the_pipeline_option_is_deterministic_recorded_and_refused_where_it_cannot_work(tmp_path):
    models = diffstudio.load()
    pipe = diffstudio.Pipeline(models)
    args = dict(width=128, height=128, steps=3, seed=4, progress=False)
    plain = np.asarray(pipe("a red circle", **args)[0])
    first = pipe("a red circle", token_merging=0.5, **args)[0]
    again = pipe("a red circle", token_merging=0.5, **args)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), plain)
    assert first.info["diffstudio_recipe"]["extra"]["token_merging"]["ratio"] == 0.5
    with pytest.raises(InvalidInputError, match="ratio"):
        pipe("a red circle", token_merging=0.8, **args)
    from tests.tiny_flux import reference_models, write_bundle

    flux = diffstudio.load(write_bundle(tmp_path / "flux.safetensors", *reference_models()))
    with pytest.raises(InvalidInputError, match="UNet"):
        diffstudio.Pipeline(flux)("a cat", token_merging=0.5, **dict(args, width=64, height=64, steps=1))
