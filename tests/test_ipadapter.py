"""IP-Adapter model layer: parity with diffusers (its UNet with the adapter loaded through `_load_ip_adapter_weights`)
for the base, Plus and full-face projections on SD 1.x- and SDXL-like tiny UNets, InstantStyle's per-layer scales
against diffusers' `set_ip_adapter_scale`, the layer order and names against diffusers' attention processors, and
the hook's default: no `ip`, or scale 0, computes exactly the base UNet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffstudio.errors import InvalidInputError
from diffstudio.models.ipadapter import cross_attention_names
from diffstudio.models.unet import timestep_embedding
from diffstudio.pipeline.ip_adapter import ImagePrompt, layer_scales
from tests.tiny_ipadapter import EMBED, HIDDEN, TEXT, adapter, released_dicts, unets


def inputs(kind: str):
    """(x, t, context), diffusers kwargs, our kwargs for a batch of 2."""
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.5, 700.0]), torch.randn(2, 7, TEXT)
    if kind != "sdxl":
        return (x, t, context), {}, {}
    pooled, time_ids = torch.randn(2, 16), torch.tensor([[512.0, 768, 0, 16, 512, 768]] * 2)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], dim=-1)
    return (x, t, context), {"text_embeds": pooled, "time_ids": time_ids}, {"y": y}


def features(projection: str) -> torch.Tensor:
    """What the adapter reads, one image per row: image_embeds (2, E) or hidden states (2, T, E)."""
    return torch.randn(2, EMBED) if projection == "linear" else torch.randn(2, 5, HIDDEN)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def set_scale(ref, scale) -> None:
    """diffusers' own per-block scale logic (IPAdapterMixin.set_ip_adapter_scale) on a bare UNet."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=ref), scale)


def with_adapter(kind: str, projection: str):
    ref, ours = unets(kind)
    ip = adapter(ours, projection)
    ref._load_ip_adapter_weights([released_dicts(ip.state_dict())])
    return ref, ours, ip


def run_both(kind, ref, ours, ip, feats, scale_ours):
    args, ref_added, our_kw = inputs(kind)
    image_embeds = feats[:, None]  # diffusers: (B, images, ...) per adapter
    with torch.no_grad():
        expected = ref(*args, added_cond_kwargs={**ref_added, "image_embeds": [image_embeds]}).sample
        got = ours(*args, ip=ip.layer_inputs(ip(feats), scale_ours), **our_kw)
        base = ours(*args, **our_kw)
    return got, expected, base


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("projection", ["linear", "resampler", "mlp"])
def test_unet_with_adapter_matches_diffusers(kind, projection):
    ref, ours, ip = with_adapter(kind, projection)
    set_scale(ref, 0.6)
    got, expected, base = run_both(kind, ref, ours, ip, features(projection), 0.6)
    assert rel_err(got, expected) < 1e-4
    assert rel_err(base, expected) > 1e-2  # the image attention matters: a dropped path would show


@pytest.mark.parametrize("kind, reference_scale", [
    ("sdxl", {"up": {"block_0": [0.0, 1.0]}}),  # InstantStyle's up_blocks.0.attentions.1 (2 attentions here)
    ("sd1", {"up": {"block_1": 1.0}}),  # the authors' SD 1.5 style blocks: up_blocks.1
])
def test_style_only_matches_diffusers_instantstyle_scales(kind, reference_scale):
    ref, ours, ip = with_adapter(kind, "linear")
    set_scale(ref, reference_scale)
    scales = layer_scales(ImagePrompt(["x.png"], scale=1.0, style_only=True), cross_attention_names(ours))
    assert 0 < sum(s > 0 for s in scales) < len(scales)
    got, expected, base = run_both(kind, ref, ours, ip, features("linear"), scales)
    assert rel_err(got, expected) < 1e-4
    assert rel_err(base, expected) > 1e-3


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_layer_order_and_names_are_diffusers_processor_order(kind):
    ref, ours = unets(kind)
    theirs = [name.removesuffix(".attn2.processor") for name in ref.attn_processors if name.endswith("attn2.processor")]
    assert cross_attention_names(ours) == theirs
    assert [layer.ip_index for layer in ours.cross_attention_layers()] == list(range(len(theirs)))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_no_ip_or_scale_zero_is_the_base_unet_bit_for_bit(kind):
    _, ours = unets(kind)
    ip = adapter(ours, "linear")
    args, _, our_kw = inputs(kind)
    tokens = ip(features("linear"))
    with torch.no_grad():
        base = ours(*args, **our_kw)
        assert torch.equal(ours(*args, ip=ip.layer_inputs(tokens, 0.0), **our_kw), base)
        assert torch.equal(ours(*args, ip=[[] for _ in ours.cross_attention_layers()], **our_kw), base)
        assert not torch.equal(ours(*args, ip=ip.layer_inputs(tokens, 0.5), **our_kw), base)


def test_scale_is_linear_in_the_image_attention_and_prompts_add():
    """Two prompts at scale s/2 with the same tokens add up to one at s (eq. 5 is linear in the scale)."""
    _, ours = unets("sd1")
    ip = adapter(ours, "linear")
    args, _, _ = inputs("sd1")
    tokens = ip(features("linear"))
    half = ip.layer_inputs(tokens, 0.25)
    with torch.no_grad():
        whole = ours(*args, ip=ip.layer_inputs(tokens, 0.5))
        summed = ours(*args, ip=[a + b for a, b in zip(half, half)])
    assert rel_err(summed, whole) < 1e-5


def test_wrong_hook_length_and_scales_raise():
    _, ours = unets("sd1")
    ip = adapter(ours, "linear")
    args, _, _ = inputs("sd1")
    with pytest.raises(InvalidInputError, match="one entry per cross-attention layer"):
        ours(*args, ip=[[]])
    with pytest.raises(ValueError, match="one IP-Adapter scale per cross-attention layer"):
        ip.layer_inputs(ip(features("linear")), [1.0, 0.5])
    with pytest.raises(InvalidInputError, match="name none"):
        layer_scales(ImagePrompt(["x.png"], blocks=["up_blocks.7"]), cross_attention_names(ours))


def test_gradient_checkpointing_passes_the_hook():
    """Training later (a Shapes IP-Adapter): the hook survives checkpointed blocks, gradients reach the adapter."""
    _, ours = unets("sd1")
    ip = adapter(ours, "linear")
    args, _, _ = inputs("sd1")
    feats = features("linear")
    ours.gradient_checkpointing = True
    out = ours(*args, ip=ip.layer_inputs(ip(feats), 1.0))
    out.square().mean().backward()
    assert ip.ip_adapter["1"].to_k_ip.weight.grad is not None
    assert ip.image_proj.proj.weight.grad.abs().sum() > 0
    ours.gradient_checkpointing = False
    with torch.no_grad():
        assert rel_err(out.detach(), ours(*args, ip=ip.layer_inputs(ip(feats), 1.0))) < 1e-6
