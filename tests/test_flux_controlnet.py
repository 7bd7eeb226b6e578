"""FLUX ControlNets (InstantX / diffusers FluxControlNetModel, union included; XLabs): the residuals against diffusers,
the transformer taking them against diffusers' FluxTransformer2DModel, the pipeline (a ControlNet that adds
nothing gives the base image bit for bit), the full-size InstantX Union layout on the meta device, detection,
and the named errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel

import diffstudio
from diffstudio.convert.flux import flux_from_diffusers
from diffstudio.convert.flux_controlnet import (
    flux_controlnet_from_diffusers,
    flux_controlnet_to_diffusers,
    xlabs_controlnet_from_diffusers,
    xlabs_controlnet_to_diffusers,
)
from diffstudio.detect.flux import config_from_diffusers
from diffstudio.detect.flux_controlnet import flux_controlnet_config_from_diffusers, xlabs_config_from_diffusers
from diffstudio.errors import ControlNetMismatchError, InvalidInputError, UnknownModelError
from diffstudio.models.flux import FluxTransformer, image_ids, pack_latents
from diffstudio.models.flux_controlnet import FluxControlNet, FluxControlNetConfig, XLabsFluxControlNet
from diffstudio.pipeline.control import ControlNetUnit
from tests.tiny_sd15 import randomise

pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

TOL = 1e-4
SMALL = dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
             pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
# InstantX/FLUX.1-dev-Controlnet-Union's config.json (the Hugging Face Hub): FLUX.1-dev's widths, 5 double and
# 10 single blocks, a guidance input, 10 union modes.
INSTANTX_UNION = dict(patch_size=1, in_channels=64, num_layers=5, num_single_layers=10, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                      guidance_embeds=True, axes_dims_rope=(16, 56, 56), num_mode=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def ours_from(ref: FluxControlNetModel) -> FluxControlNet:
    model = FluxControlNet(flux_controlnet_config_from_diffusers(ref.config))
    model.load_state_dict(flux_controlnet_from_diffusers(ref.state_dict()))
    return model.eval()


def inputs(batch=2, height=6, width=8, n_txt=5, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(batch, 16, height, width, generator=g),
                hint=torch.randn(batch, 16, height, width, generator=g),
                txt=torch.randn(batch, n_txt, 24, generator=g), y=torch.randn(batch, 20, generator=g),
                t=torch.tensor([0.25, 0.9])[:batch], guidance=torch.tensor([3.5, 1.0])[:batch])


# -- parity with diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("union", [False, True], ids=["plain", "union"])
def test_controlnet_residuals_match_diffusers(union):
    ref = FluxControlNetModel(**SMALL, num_layers=2, num_single_layers=3, guidance_embeds=True,
                              num_mode=4 if union else None).eval()
    randomise(ref, 1)
    ours = ours_from(ref)
    assert ours.is_union == union
    x = inputs()
    mode = 2 if union else None
    with torch.no_grad():
        expected = ref(hidden_states=pack_latents(x["latent"]), controlnet_cond=pack_latents(x["hint"]),
                       controlnet_mode=None if mode is None else torch.full((2, 1), mode),
                       encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                       img_ids=image_ids(6, 8), txt_ids=torch.zeros(5, 3), guidance=x["guidance"])
        # the pipeline's call: latents (B, 16, h, w), the mode from the module (with_mode) or the call
        net = ours.with_mode(mode) if union else ours
        got = net(x["latent"], x["hint"], x["t"], x["txt"], x["y"], guidance=x["guidance"])
    assert len(got["double"]) == 2 and len(got["single"]) == 3
    pairs = zip(got["double"] + got["single"],
                [*expected.controlnet_block_samples, *expected.controlnet_single_block_samples], strict=True)
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape == (2, 12, 32)
        assert rel_err(a, b) < TOL, i
    if union:  # another mode, another answer; the handle with_mode made shares the weights
        other = ours(x["latent"], x["hint"], x["t"], x["txt"], x["y"], guidance=x["guidance"], mode=0)
        assert rel_err(other["double"][0], got["double"][0]) > 1e-3
        assert net.controlnet_mode_embedder.weight is ours.controlnet_mode_embedder.weight


def test_transformer_adds_residuals_as_diffusers_does():
    """4 double / 5 single blocks fed 2 / 3 residuals: each covers ceil(4/2) = 2 and ceil(5/3) = 2 blocks."""
    ref = FluxTransformer2DModel(**SMALL, num_layers=4, num_single_layers=5, guidance_embeds=True).eval()
    randomise(ref, 2)
    ours = FluxTransformer(config_from_diffusers(ref.config))
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()))
    ours.eval()
    x = inputs()
    g = torch.Generator().manual_seed(1)
    control = {"double": [torch.randn(2, 12, 32, generator=g) for _ in range(2)],
               "single": [torch.randn(2, 12, 32, generator=g) for _ in range(3)]}
    img, ids, txt_ids = pack_latents(x["latent"]), image_ids(6, 8), torch.zeros(5, 3)
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                       timestep=x["t"], img_ids=ids, txt_ids=txt_ids, guidance=x["guidance"],
                       controlnet_block_samples=control["double"],
                       controlnet_single_block_samples=control["single"]).sample
        got = ours(img, ids, x["txt"], txt_ids, x["t"], x["y"], x["guidance"], control=control)
        plain = ours(img, ids, x["txt"], txt_ids, x["t"], x["y"], x["guidance"])
        zeros = {k: [torch.zeros_like(r) for r in v] for k, v in control.items()}
        zero_control = ours(img, ids, x["txt"], txt_ids, x["t"], x["y"], x["guidance"], control=zeros)
    assert rel_err(got, expected) < TOL
    assert rel_err(got, plain) > 1e-3
    assert torch.equal(zero_control, plain)


def test_union_mode_is_checked():
    ours = ours_from(FluxControlNetModel(**SMALL, num_layers=1, num_single_layers=1, num_mode=10).eval())
    x = inputs()
    with pytest.raises(InvalidInputError, match="union"):
        ours(x["latent"], x["hint"], x["t"], x["txt"], x["y"])
    with pytest.raises(InvalidInputError, match="unknown union mode"):
        ours.with_mode("sketch")
    assert ours.with_mode("depth").mode_index("depth") == 2  # InstantX: canny 0, tile 1, depth 2, ...
    plain = ours_from(FluxControlNetModel(**SMALL, num_layers=1, num_single_layers=1).eval())
    with pytest.raises(InvalidInputError, match="no union modes"):
        plain.with_mode(1)


# -- the InstantX Union layout at full size, on the meta device ----------------------------------------------


def test_full_size_instantx_union_keys_shapes_and_detection():
    with torch.device("meta"):
        ref = FluxControlNetModel(**INSTANTX_UNION)
        ours = FluxControlNet(FluxControlNetConfig(num_modes=10))
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    converted = flux_controlnet_from_diffusers(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in converted.values()) == sum(p.numel() for p in ref.parameters())
    config = flux_controlnet_config_from_diffusers(ref.config)
    assert config == ours.config
    assert (config.depth, config.depth_single_blocks, config.num_modes, config.guidance_embed) == (5, 10, 10, True)
    back = flux_controlnet_to_diffusers(converted, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    for sd, layout in ((ref.state_dict(), "diffusers"), (converted, "original")):
        det = diffstudio.detect(sd)
        (comp,) = det.components.values()
        assert (det.family, comp.role, comp.arch, comp.layout) == ("flux", "controlnet", "flux_controlnet", layout)
        assert comp.config == config


def test_hint_encoders_other_than_xlabs_are_refused_by_name():
    """A pixel-space hint encoder is XLabs' layout (tested below); one that does not make in_channels / 4 channels
    is no release diffstudio knows, and an InstantX config cannot name one."""
    ref = FluxControlNetModel(**{**SMALL, "patch_size": 2}, num_layers=1, num_single_layers=0,
                              conditioning_embedding_channels=8)
    with pytest.raises(UnknownModelError, match="in_channels / 4"):
        xlabs_config_from_diffusers(ref.config)
    with pytest.raises(UnknownModelError, match="pixel space"):
        flux_controlnet_config_from_diffusers(ref.config)


# -- loading and the pipeline on a tiny FLUX.1-dev ------------------------------------------------------------

RUN = dict(width=64, height=64, steps=2, seed=3, progress=False)


def tiny_reference_controlnet(zero: bool, union: bool = False, single: int = 1, seed: int = 7) -> FluxControlNetModel:
    """At tests/tiny_flux.py's widths (one 128-wide head; the transformer has 1 double and 2 single blocks): 1
    double, ``single`` single blocks, a guidance input. ``zero``: as diffusers initialises it (the output Linears
    at zero); else every weight random."""
    from tests.tiny_flux import DIT

    config = {**DIT, "num_layers": 1, "num_single_layers": single}
    ref = FluxControlNetModel(**config, guidance_embeds=True, num_mode=10 if union else None).eval()
    torch.manual_seed(0)
    if not zero:
        randomise(ref, seed)
    return ref


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(models, {name: ControlNet path}) for a tiny FLUX.1-dev and ControlNets in the layouts users have."""
    from safetensors.torch import save_file

    from tests.tiny_flux import reference_models, write_bundle

    root = tmp_path_factory.mktemp("flux_cn")
    models = diffstudio.load(write_bundle(root / "flux.safetensors", *reference_models("dev")))
    paths = {}
    ref = tiny_reference_controlnet(zero=False, union=True)
    ref.save_pretrained(root / "union_folder")  # config.json + diffusion_pytorch_model.safetensors
    paths["union_folder"] = root / "union_folder"
    paths["union_file"] = root / "union_folder" / "diffusion_pytorch_model.safetensors"
    save_file(tiny_reference_controlnet(zero=False).state_dict(), str(root / "random.safetensors"))
    paths["random"] = root / "random.safetensors"
    save_file(tiny_reference_controlnet(zero=True).state_dict(), str(root / "zero.safetensors"))
    paths["zero"] = root / "zero.safetensors"
    for single in (0, 2):
        sd = tiny_reference_controlnet(zero=False, single=single, seed=8 + single).state_dict()
        save_file(sd, str(root / f"single{single}.safetensors"))
        paths[f"single{single}"] = root / f"single{single}.safetensors"
    return models, paths


def image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe("a red circle", **RUN, **kwargs)[0], dtype=np.int16)


def hint_picture() -> np.ndarray:
    picture = np.full((64, 64, 3), 255, np.uint8)
    picture[16:48, 8:30] = 0
    return picture


def test_pipeline_units_that_add_nothing_give_the_base_image_bit_for_bit(flux):
    models, paths = flux
    pipe = diffstudio.Pipeline(models)
    zero, random = models.add_controlnet(paths["zero"]), models.add_controlnet(paths["random"])
    assert isinstance(zero, FluxControlNet) and zero.hint_space == "latent"
    base = image(pipe)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(zero, hint_picture())]), base)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(random, hint_picture(), scale=0.0)]), base)
    changed = image(pipe, controlnets=[ControlNetUnit(random, hint_picture(), scale=1.0)])
    assert np.abs(changed - base).max() > 0
    # an odd latent side (72 px = 9 latent rows) is padded for the control as for the transformer
    (wide,) = pipe("a red circle", **{**RUN, "width": 72}, controlnets=[ControlNetUnit(random, hint_picture())])
    assert wide.size == (72, 64)


def test_units_with_different_block_counts_add_up_block_by_block(flux):
    """The loaded ControlNets give one residual per transformer block (2 single blocks here), so a 1-single-block
    ControlNet and a 2-single-block one add up place by place; a scale-0 unit then changes nothing."""
    models, paths = flux
    pipe = diffstudio.Pipeline(models)
    one, two, none = (models.add_controlnet(paths[k]) for k in ("random", "single2", "single0"))
    assert one.transformer_blocks == (1, 2)
    x = torch.randn(1, 16, 8, 8)
    res = one(x, x, torch.tensor([0.5]), torch.randn(1, 4, 32), torch.randn(1, 64), guidance=torch.tensor([3.5]))
    assert len(res["single"]) == 2 and res["single"][0] is res["single"][1]  # repeated, not copied
    for base, other in ((two, one), (one, none)):
        alone = image(pipe, controlnets=[ControlNetUnit(base, hint_picture())])
        both = image(pipe, controlnets=[ControlNetUnit(base, hint_picture()), ControlNetUnit(other, hint_picture(),
                                                                                             scale=0.0)])
        assert np.array_equal(both, alone)
    assert not np.array_equal(image(pipe, controlnets=[ControlNetUnit(none, hint_picture())]),
                              image(pipe, controlnets=[ControlNetUnit(one, hint_picture())]))


def test_union_controlnet_loads_from_a_folder_and_a_file(flux):
    models, paths = flux
    pipe = diffstudio.Pipeline(models)
    union = models.add_controlnet(paths["union_folder"])
    assert union.is_union and union.config.num_modes == 10
    from_file = models.add_controlnet(paths["union_file"])
    assert all(torch.equal(a, b) for a, b in zip(union.state_dict().values(), from_file.state_dict().values()))
    with pytest.raises(InvalidInputError, match="union"):
        pipe("a red circle", **RUN, controlnets=[ControlNetUnit(union, hint_picture())])
    depth = image(pipe, controlnets=[ControlNetUnit(union.with_mode("depth"), hint_picture())])
    canny = image(pipe, controlnets=[ControlNetUnit(union.with_mode("canny"), hint_picture())])
    assert not np.array_equal(depth, canny)
    # the unit's mode field is the same as with_mode (and wins over the module's mode)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(union, hint_picture(), mode="depth")]), depth)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(union.with_mode("depth"), hint_picture(),
                                                                  mode="canny")]), canny)
    with pytest.raises(InvalidInputError, match="only a ControlNet-Union"):
        pipe("a red circle", **RUN, controlnets=[ControlNetUnit(union, [hint_picture()] * 2, mode=["depth", 0])])


@pytest.mark.parametrize("name", ["union_folder", "random"])
def test_info_names_a_flux_controlnet(flux, name, capsys):
    from diffstudio.cli import main

    _, paths = flux
    assert main(["info", str(paths[name])]) == 0
    out = capsys.readouterr().out
    assert "family: flux" in out and "flux_controlnet" in out


def test_named_errors(flux):
    from safetensors.torch import save_file

    from diffstudio.demo.untrained import untrained_demo_models
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel

    models, paths = flux
    sd15 = untrained_demo_models()
    with pytest.raises(ControlNetMismatchError, match="for flux models"):
        sd15.add_controlnet(paths["random"])
    unet_controlnet = ControlNetModel(ControlNetConfig.from_unet(sd15.configs["unet"], hint_block_channels=[16] * 4))
    save_file(unet_controlnet.state_dict(), str(paths["random"].parent / "sd15_cn.safetensors"))
    with pytest.raises(ControlNetMismatchError, match="for sd15 models"):
        models.add_controlnet(paths["random"].parent / "sd15_cn.safetensors")
    with pytest.raises(UnknownModelError, match="holds no ControlNet"):
        models.add_controlnet(models.sources["dit"])
    with pytest.raises(UnknownModelError, match="is a ControlNet for flux"):
        diffstudio.load(paths["random"])
    narrow = FluxControlNetModel(**{**SMALL, "num_layers": 1, "num_single_layers": 1}, guidance_embeds=True)
    narrow.save_pretrained(paths["random"].parent / "narrow")
    with pytest.raises(ControlNetMismatchError, match="hidden width is 32, the transformer's 128"):
        models.add_controlnet(paths["random"].parent / "narrow")


# -- XLabs -------------------------------------------------------------------------------------------------------


def xlabs_reference(seed: int = 4, **config) -> FluxControlNetModel:
    """diffusers' port of an XLabs ControlNet: a pixel-space hint encoder (16 channels, packed 2x2: patch_size 2),
    2 double blocks, no single blocks."""
    ref = FluxControlNetModel(**{**SMALL, "patch_size": 2, "num_layers": 2, "num_single_layers": 0,
                                 "guidance_embeds": True, "conditioning_embedding_channels": 16, **config}).eval()
    randomise(ref, seed)
    return ref


def xlabs_from(ref: FluxControlNetModel) -> XLabsFluxControlNet:
    model = XLabsFluxControlNet(xlabs_config_from_diffusers(ref.config))
    model.load_state_dict(xlabs_controlnet_from_diffusers(ref.state_dict()))
    return model.eval()


def test_xlabs_residuals_and_their_spread_match_diffusers():
    """The residuals of diffusers' port from a control image in [-1, 1], and the transformer taking them with
    diffusers' ``controlnet_blocks_repeat`` (block j gets residual j % 2) against ours spread over its 4 blocks."""
    ref = xlabs_reference()
    ours = xlabs_from(ref)
    assert ours.hint_space == "pixels" and ours.config.hint_channels == 3
    x = inputs()
    picture = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))  # 8x the 6 x 8 latent
    with torch.no_grad():
        expected = ref(hidden_states=pack_latents(x["latent"]), controlnet_cond=picture * 2 - 1,
                       encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                       img_ids=image_ids(6, 8), txt_ids=torch.zeros(5, 3), guidance=x["guidance"])
        ours.transformer_blocks = (4, 3)
        got = ours(x["latent"], picture, x["t"], x["txt"], x["y"], guidance=x["guidance"])  # the pipeline's call
    samples = list(expected.controlnet_block_samples)
    assert expected.controlnet_single_block_samples is None and got["single"] == []
    assert [id(r) for r in got["double"]] == [id(got["double"][i % 2]) for i in range(4)]  # x-flux's j % n
    for a, b in zip(got["double"][:2], samples, strict=True):
        assert rel_err(a, b) < TOL

    transformer_ref = FluxTransformer2DModel(**SMALL, num_layers=4, num_single_layers=1, guidance_embeds=True).eval()
    randomise(transformer_ref, 6)
    transformer = FluxTransformer(config_from_diffusers(transformer_ref.config))
    transformer.load_state_dict(flux_from_diffusers(transformer_ref.state_dict()))
    img, ids, txt_ids = pack_latents(x["latent"]), image_ids(6, 8), torch.zeros(5, 3)
    with torch.no_grad():
        expected = transformer_ref(hidden_states=img, encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                                   timestep=x["t"], img_ids=ids, txt_ids=txt_ids, guidance=x["guidance"],
                                   controlnet_block_samples=samples, controlnet_blocks_repeat=True).sample
        out = transformer.eval()(img, ids, x["txt"], txt_ids, x["t"], x["y"], x["guidance"], control=got)
    assert rel_err(out, expected) < TOL


def test_xlabs_layouts_and_detection():
    """x-flux's names (the release files) and diffusers' port convert both ways; each is detected as an XLabs
    ControlNet for FLUX; an InstantX one is not mistaken for it."""
    ref = xlabs_reference(joint_attention_dim=24)
    canonical = xlabs_controlnet_from_diffusers(ref.state_dict())
    hint_convs = sorted(int(k.split(".")[1]) for k in canonical if k.startswith("input_hint_block.") and
                        k.endswith("weight"))
    assert hint_convs == list(range(0, 16, 2)) and "pos_embed_input.weight" in canonical
    assert "double_blocks.1.img_attn.qkv.weight" in canonical and not any("single" in k for k in canonical)
    config = xlabs_config_from_diffusers(ref.config)
    back = xlabs_controlnet_to_diffusers(canonical, config)
    assert back.keys() == ref.state_dict().keys()
    hints = {"axes_dim": (4, 6, 6)}  # 16-wide heads: the RoPE split comes from the base
    from diffstudio.detect.controlnet import find_controlnet

    for sd, layout in ((ref.state_dict(), "diffusers"), (canonical, "original")):
        component, family = find_controlnet(sd, None, hints)
        assert (family.name, component.arch, component.layout) == ("flux", "xlabs_flux_controlnet", layout)
        assert component.config == config
    instantx = FluxControlNetModel(**SMALL, num_layers=1, num_single_layers=1).state_dict()
    assert find_controlnet(instantx, None, hints)[0].arch == "flux_controlnet"


def test_xlabs_full_size_on_meta():
    """XLabs' FLUX.1-dev ControlNets (x-flux ControlNetFlux at FLUX.1-dev's params, controlnet_depth 2)."""
    with torch.device("meta"):
        ref = FluxControlNetModel(**{**INSTANTX_UNION, "num_layers": 2, "num_single_layers": 0, "num_mode": None,
                                     "patch_size": 2, "conditioning_embedding_channels": 16})
        ours = XLabsFluxControlNet()
    canonical = xlabs_controlnet_from_diffusers(ref.state_dict())
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in canonical.items()} == expected
    det = diffstudio.detect(canonical)
    assert (det.family, det.components["controlnet"].arch) == ("flux", "xlabs_flux_controlnet")
    assert det.components["controlnet"].config == ours.config == xlabs_config_from_diffusers(ref.config)


def test_xlabs_controlnet_in_the_pipeline(flux, tmp_path):
    """Loaded from x-flux's names, spread over the base's blocks, the control image fed in pixels."""
    from safetensors.torch import save_file

    from tests.tiny_flux import DIT

    models, paths = flux
    ref = xlabs_reference(**{k: DIT[k] for k in ("attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                                  "pooled_projection_dim", "axes_dims_rope")})
    save_file({k: v.contiguous() for k, v in xlabs_controlnet_from_diffusers(ref.state_dict()).items()},
              str(tmp_path / "flux-canny-controlnet.safetensors"))
    xlabs = models.add_controlnet(tmp_path / "flux-canny-controlnet.safetensors")
    assert isinstance(xlabs, XLabsFluxControlNet) and xlabs.transformer_blocks == (1, 2)
    pipe = diffstudio.Pipeline(models)
    base = image(pipe)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(xlabs, hint_picture(), scale=0.0)]), base)
    assert np.abs(image(pipe, controlnets=[ControlNetUnit(xlabs, hint_picture())]) - base).max() > 0
    random = models.add_controlnet(paths["random"])
    both = [ControlNetUnit(xlabs, hint_picture(), scale=0.5), ControlNetUnit(random, hint_picture(), scale=0.5)]
    (wide,) = pipe("a red circle", **{**RUN, "width": 72}, controlnets=both)  # odd latent side, mixed layouts
    assert wide.size == (72, 64)
