"""ExVideo-SVD: the ping-pong position map, the identity start (the extended UNet equals the base for T <= 25 and
the base run with ping-pong positions beyond), grafting a layout-equal synthetic extension file with full coverage,
detection by structure, and the released SVD-XT patch layout on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from diffstudio.components import ARCHS
from diffstudio.convert.exvideo import diffsynth_temporal_blocks, exvideo_to_unet_names
from diffstudio.detect import detect
from diffstudio.detect.exvideo import derive_exvideo_config
from diffstudio.errors import ConversionError, InvalidInputError
from diffstudio.exvideo_loading import graft_exvideo
from diffstudio.models.exvideo import ExVideoPositions, attach_exvideo, pingpong_positions
from diffstudio.models.exvideo_file import ExVideoConfig, ExVideoPatch
from diffstudio.models.svd_unet import SVDUNet, SVDUNetConfig
from diffstudio.release_configs import SVD_XT_UNET

# Two levels, attention on both (so every output block has a temporal transformer), 16-wide heads.
TINY = SVDUNetConfig(in_channels=8, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                     transformer_depth=[1, 1], context_dim=24, num_head_channels=16, addition_time_embed_dim=8,
                     norm_groups=32)


def random_unet(config: SVDUNetConfig = TINY) -> SVDUNet:
    model = SVDUNet(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    return model


def inputs(frames: int, size: int = 4):
    return (torch.randn(1, frames, 8, size, size), 0.3, torch.randn(1, 1, 24), torch.tensor([[29.0, 127.0, 0.0]]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_pingpong_map_follows_exvideo():
    """ExVideo's PositionalID(max_id=25, repeat_length=20): identity below 25, then down from 23 to 4, up to 24."""
    ids = pingpong_positions(128).tolist()
    assert ids[:25] == list(range(25))
    assert ids[25:45] == list(range(23, 3, -1))
    assert ids[45:65] == list(range(5, 25))
    assert ids[65:67] == [23, 22]
    assert max(ids) == 24 and min(ids[25:]) == 4


def test_identity_start_equals_base_up_to_25_frames():
    base = random_unet()
    extended = attach_exvideo(random_unet(), positions=128)
    extended.load_state_dict(base.state_dict(), strict=False)  # same base weights; the patches stay fresh
    with torch.no_grad():
        for frames in (2, 25):
            args = inputs(frames)
            assert rel_err(extended(*args), base(*args)) < 1e-6


def test_identity_start_beyond_25_frames_equals_base_with_pingpong_positions():
    base = random_unet()
    extended = attach_exvideo(random_unet(), positions=128)
    extended.load_state_dict(base.state_dict(), strict=False)
    args = inputs(30)
    with torch.no_grad():
        got = extended(*args)
        expected = base(*args, position_ids=pingpong_positions(30))
        plain = base(*args)
    assert rel_err(got, expected) < 1e-6
    assert rel_err(got, plain) > 1e-4  # the map matters: positions 25..29 are not the base's own


def test_trained_patch_changes_output_and_length_is_bounded():
    model = attach_exvideo(random_unet(), positions=6)
    args = inputs(5)
    with torch.no_grad():
        before = model(*args)
        model.input_blocks[1][1].exvideo.conv.bias.add_(0.5)
        assert rel_err(model(*args), before) > 1e-3
        with pytest.raises(InvalidInputError, match="6 frames"):
            model(*inputs(7))


def _synthetic_file(unet_config: SVDUNetConfig, finetuned: bool = True) -> tuple[dict, ExVideoConfig]:
    """A file with the released layout at this UNet's size, random values."""
    blocks = diffsynth_temporal_blocks(unet_config)
    model = SVDUNet(unet_config)
    widths = [dict(model.named_modules())[prefix].time_pos_embed[0].in_features for _, prefix in blocks]
    # Without the temporal weights nothing in the file shows the context width: it stays the release's 1024.
    config = ExVideoConfig([i for i, _ in blocks], widths, positions=40,
                           context_dim=unet_config.context_dim if finetuned else 1024, finetuned=finetuned)
    patch = ExVideoPatch(config)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn_like(p))
    return {k: v.clone() for k, v in patch.state_dict().items()}, config


@pytest.mark.parametrize("finetuned", [True, False], ids=["with-temporal-weights", "tables-and-convs-only"])
def test_synthetic_extension_grafts_with_full_coverage(finetuned):
    file, config = _synthetic_file(TINY, finetuned)
    assert ARCHS["exvideo_svd"].is_canonical(file)
    assert derive_exvideo_config(file) == config
    unet = random_unet()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    graft_exvideo(unet, file)
    grafted = unet.state_dict()
    mapped = exvideo_to_unet_names(file, TINY, grafted)
    assert len(mapped) == len(file)  # every tensor of the file has a place
    assert all(torch.equal(grafted[k], v) for k, v in mapped.items())
    untouched = [k for k in base if k not in mapped]
    assert untouched and all(torch.equal(grafted[k], base[k]) for k in untouched)
    expected_new = 3 * len(config.block_ids)  # table, conv weight, conv bias per temporal block
    assert len(grafted) - len(base) == expected_new
    with torch.no_grad():
        out = unet(*inputs(40))
    assert out.shape == (1, 40, 4, 4, 4) and torch.isfinite(out).all()


def test_mismatched_or_foreign_files_are_refused():
    file, _ = _synthetic_file(TINY)
    other = SVDUNetConfig(**{**TINY.to_dict(), "transformer_depth": [1, 0]})  # fewer temporal blocks
    with pytest.raises(ConversionError, match="temporal blocks"):
        graft_exvideo(random_unet(other), file)
    bad = dict(file)
    bad["blocks.7.positional_conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    with pytest.raises(ConversionError, match="shape"):
        graft_exvideo(random_unet(), bad)
    extra = {**file, "blocks.7.something_else.weight": torch.zeros(2)}
    with pytest.raises(ConversionError, match="matched no rule"):
        graft_exvideo(random_unet(), extra)
    with pytest.raises(ConversionError, match="not an ExVideo"):
        graft_exvideo(random_unet(), {"foo.weight": torch.zeros(1)})


def test_lone_extension_file_is_detected_as_an_addon():
    file, config = _synthetic_file(TINY)
    detection = detect(file)
    assert detection.family is None
    (component,) = detection.components.values()
    assert component.arch == "exvideo_svd" and component.config == config


def test_full_size_svd_xt_patch_layout():
    """The released file's block numbers and widths (DiffSynth's SVDUNet) for SVD-XT, and a graft on the meta
    device covering every key."""
    from diffstudio.convert.svd_unet import svd_unet_from_diffusers
    from diffstudio.detect.svd_unet import config_from_diffusers

    unet_config = config_from_diffusers(SVD_XT_UNET)
    blocks = diffsynth_temporal_blocks(unet_config)
    assert [i for i, _ in blocks] == [7, 17, 29, 39, 51, 61, 83, 113, 123, 133, 144, 154, 164, 175, 185, 195]
    assert dict(blocks)[7] == "input_blocks.1.1"
    assert dict(blocks)[83] == "middle_block.1"
    assert dict(blocks)[113] == "output_blocks.3.1"
    assert dict(blocks)[195] == "output_blocks.11.1"
    widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    config = ExVideoConfig([i for i, _ in blocks], widths, positions=128)
    with torch.device("meta"):
        file = ExVideoPatch(config).state_dict()
        unet = SVDUNet(unet_config)
        release = svd_unet_from_diffusers(UNetSpatioTemporalConditionModel(**SVD_XT_UNET).state_dict())
    assert file["blocks.7.positional_embedding.embeddings"].shape == (128, 320)
    assert file["blocks.83.positional_conv.weight"].shape == (1280, 1280, 3, 3, 3)
    assert file["blocks.195.act_fn_out.proj.weight"].shape == (320 * 8, 320)
    assert derive_exvideo_config(file) == config
    assert set(unet.state_dict()) == set(release)
    graft_exvideo(unet, file)
    mapped = exvideo_to_unet_names(file, unet_config, unet.state_dict())
    assert len(mapped) == len(file)
    assert all(k in release for k in mapped if ".exvideo." not in k)  # fine-tuned weights replace base ones


def test_positions_module_identity_initialisation():
    patch = ExVideoPositions(8, 30)
    patch.reset_to_identity()
    x = torch.randn(2 * 3, 4 * 5, 8)
    assert torch.allclose(patch.convolve(x, 3, 4, 5), x, atol=1e-6)
