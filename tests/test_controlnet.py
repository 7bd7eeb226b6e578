"""ControlNet: parity with diffusers' ControlNetModel (tiny, random weights), the converter both ways, config
derivation and family detection from shapes, and UNet + ControlNet end to end against diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from diffstudio.convert.controlnet import controlnet_from_diffusers, controlnet_to_diffusers
from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect import detect
from diffstudio.detect.controlnet import controlnet_config_from_diffusers, derive_controlnet_config
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.errors import ConversionError, InvalidSizeError, UnknownModelError
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
from diffstudio.models.unet import UNetModel
from tests.tiny_controlnet import HINT_WIDTHS, HINTS, inputs, reference_controlnet, reference_unet, rel_err

KINDS = ["sd15", "sdxl"]


def ours_from(ref) -> ControlNetModel:
    model = ControlNetModel(controlnet_config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(controlnet_from_diffusers(ref.state_dict()), strict=True)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_residuals_match_diffusers(kind):
    ref = reference_controlnet(kind)
    ours = ours_from(ref)
    (x, hint, t, ctx), ref_kw, our_kw = inputs(kind)
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, return_dict=False, **ref_kw)
        got = ours(x, hint, t, ctx, **our_kw)
    expected = [*down, mid]
    assert len(got) == len(ours.input_blocks) + 1 == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and b.norm() > 0
        assert rel_err(a, b) < 1e-4
    # The hint matters: another control image changes every residual.
    with torch.no_grad():
        other = ours(x, 1 - hint, t, ctx, **our_kw)
    assert all(rel_err(a, b) > 1e-3 for a, b in zip(other, got))


def test_global_average_pooling_matches_diffusers():
    ref = reference_controlnet("sd15", global_pool_conditions=True)
    ours = ours_from(ref)
    assert ours.config.global_average_pooling
    (x, hint, t, ctx), _, _ = inputs("sd15")
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, return_dict=False)
        got = ours(x, hint, t, ctx)
    assert all(a.shape[-2:] == (1, 1) and rel_err(a, b) < 1e-4 for a, b in zip(got, [*down, mid]))


def test_a_hint_of_the_wrong_size_is_a_named_error():
    ours = ours_from(reference_controlnet("sd15"))
    (x, hint, t, ctx), _, _ = inputs("sd15")
    with pytest.raises(InvalidSizeError, match="8x the latent"):
        ours(x, hint[..., :32, :], t, ctx)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_derived_config(kind):
    ref = reference_controlnet(kind)
    diffusers_sd = ref.state_dict()
    config = controlnet_config_from_diffusers(dict(ref.config))
    assert config.hint_block_channels == list(HINT_WIDTHS[kind])
    canonical = controlnet_from_diffusers(diffusers_sd)
    assert {k.split(".")[0] for k in canonical} >= {"input_hint_block", "zero_convs", "middle_block_out"}
    assert derive_controlnet_config(canonical, HINTS[kind]) == config
    back = controlnet_to_diffusers(canonical, config)
    assert set(back) == set(diffusers_sd)
    assert all(torch.equal(back[k], diffusers_sd[k]) for k in back)
    assert ControlNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_converter_refuses_incomplete_or_foreign_state_dicts():
    ref = reference_controlnet("sd15")
    sd = ref.state_dict()
    with pytest.raises(ConversionError, match="matched no rule"):
        controlnet_from_diffusers({**sd, "some_adapter.weight": torch.zeros(1)})
    canonical = controlnet_from_diffusers(sd)
    config = controlnet_config_from_diffusers(dict(ref.config))
    del canonical["zero_convs.2.0.weight"]
    with pytest.raises(ConversionError, match="missing"):
        controlnet_to_diffusers(canonical, config)


@pytest.mark.parametrize("kind,family", [("sd15", "sd15"), ("sdxl", "sdxl")])
@pytest.mark.parametrize("layout", ["cldm", "prefixed", "diffusers"])
def test_detect_names_a_controlnet_and_its_family(kind, family, layout):
    ref = reference_controlnet(kind)
    sd = ref.state_dict()
    if layout != "diffusers":
        sd = controlnet_from_diffusers(sd)
    if layout == "prefixed":
        sd = {"control_model." + k: v for k, v in sd.items()}
    det = detect(sd)
    assert det.family == family
    assert list(det.components) == ["controlnet"]
    comp = det.components["controlnet"]
    assert comp.arch == "controlnet"
    assert comp.prefix == ("control_model." if layout == "prefixed" else "")
    assert comp.layout == ("diffusers" if layout == "diffusers" else "original")
    expected = controlnet_config_from_diffusers(dict(ref.config))
    for name in ("context_dim", "model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                 "transformer_depth_middle", "adm_in_channels", "use_linear_in_transformer", "hint_block_channels"):
        assert getattr(comp.config, name) == getattr(expected, name), name
    assert "controlnet" in det.summary()


def test_a_controlnet_bundled_with_its_model_is_found_beside_it():
    """The cldm v1.0 files carry a whole SD model and the ControlNet under control_model."""
    from tests.tiny_sd15 import original_layout_state_dict, reference_models

    base = original_layout_state_dict(*reference_models())
    cn = controlnet_from_diffusers(reference_controlnet("sd15").state_dict())
    det = detect({**base, **{"control_model." + k: v for k, v in cn.items()}})
    assert det.family == "sd15"
    assert {"unet", "vae", "text_encoder", "controlnet"} <= set(det.components)
    assert not any(k.startswith("control_model.") for k in det.ignored)


def test_a_truncated_controlnet_is_a_named_error():
    sd = controlnet_from_diffusers(reference_controlnet("sd15").state_dict())
    del sd["zero_convs.3.0.weight"], sd["zero_convs.3.0.bias"]
    with pytest.raises(UnknownModelError, match="zero_convs"):
        derive_controlnet_config(sd, HINTS["sd15"])


@pytest.mark.parametrize("kind", KINDS)
def test_unet_with_controlnet_matches_diffusers(kind):
    """diffusers UNet fed diffusers ControlNet residuals vs our UNet fed ours, same weights."""
    unet_ref, cn_ref = reference_unet(kind), reference_controlnet(kind)
    unet = UNetModel(config_from_diffusers(dict(unet_ref.config))).eval()
    unet.load_state_dict(unet_from_diffusers(unet_ref.state_dict()), strict=True)
    cn = ours_from(cn_ref)
    (x, hint, t, ctx), ref_kw, our_kw = inputs(kind)
    with torch.no_grad():
        down, mid = cn_ref(x, t, ctx, hint, return_dict=False, **ref_kw)
        expected = unet_ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                            **ref_kw).sample
        plain = unet(x, t, ctx, **our_kw)
        got = unet(x, t, ctx, control=cn(x, hint, t, ctx, **our_kw), **our_kw)
    assert rel_err(got, plain) > 1e-2  # the control changes the output
    assert rel_err(got, expected) < 1e-4
