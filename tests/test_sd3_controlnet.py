"""SD3 / SD3.5 ControlNets: the ControlNet against diffusers' SD3ControlNetModel (InstantX's joint blocks, SD3.5's
single-stream blocks on the base's embedding), the MMDiT's control residuals against SD3Transformer2DModel's
``block_controlnet_hidden_states``, the converter, detection, full-size layouts on the meta device, loading onto a
tiny SD3 and running in diffstudio.Pipeline, and the named errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

import diffstudio
from diffstudio.convert.mmdit import mmdit_from_diffusers
from diffstudio.convert.sd3_controlnet import sd3_controlnet_from_diffusers, sd3_controlnet_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.mmdit import config_from_diffusers
from diffstudio.detect.sd3_controlnet import sd3_controlnet_config_from_diffusers
from diffstudio.errors import ControlNetMismatchError, UnknownModelError
from diffstudio.models.mmdit import MMDiT
from diffstudio.models.sd3_controlnet import SD3ControlNet
from tests.tiny_sd3 import TRANSFORMER, randomise, reference_models, write_single_file

# Odd widths (4 heads of 8, a text width unlike the image width, 5 blocks for 2 or 3 residuals) so that a mix-up
# of heads, widths or the residual spacing cannot cancel out.
ODD = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=5, attention_head_dim=8,
           num_attention_heads=4, joint_attention_dim=40, caption_projection_dim=32, pooled_projection_dim=24,
           pos_embed_max_size=12)
CONTROLNET_FIELDS = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size", "sample_size")
# Stability's SD3.5 ControlNets as diffusers reads them: single-stream blocks, the base's patch embedding.
SINGLE = dict(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None, pos_embed_max_size=None,
              force_zeros_for_pooled_projection=False)
KINDS = {"instantx": {"num_layers": 3}, "sd3.5": {"num_layers": 2, **SINGLE}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def controlnet_reference(base_fields: dict, kind: str, seed: int = 3) -> SD3ControlNetModel:
    ref = SD3ControlNetModel(**{**{k: base_fields[k] for k in CONTROLNET_FIELDS}, **KINDS[kind]}).eval()
    randomise(ref, seed)
    return ref


def ours_of(ref: SD3ControlNetModel, base: MMDiT | None = None) -> SD3ControlNet:
    ours = SD3ControlNet(sd3_controlnet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(sd3_controlnet_from_diffusers(ref.state_dict()), strict=True)
    if base is not None and not ours.config.own_embedding:
        ours.use_base_embedding(base)
    return ours.eval()


@pytest.fixture(scope="module")
def odd_base():
    ref = SD3Transformer2DModel(**ODD).eval()
    randomise(ref, 1)
    ours = MMDiT(config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(mmdit_from_diffusers(ref.state_dict()))
    return ref, ours.eval()


def inputs(batch: int = 2, height: int = 8, width: int = 6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 16, height, width, generator=g), torch.randn(batch, 16, height, width, generator=g),
            torch.tensor([700.0, 30.0][:batch]), torch.randn(batch, 7, 40, generator=g),
            torch.randn(batch, 24, generator=g))


@pytest.mark.parametrize("kind", list(KINDS))
def test_residuals_and_controlled_mmdit_match_diffusers(odd_base, kind):
    base_ref, base = odd_base
    ref = controlnet_reference(ODD, kind)
    ours = ours_of(ref, base)
    if kind == "sd3.5":  # as diffusers' SD3 ControlNet pipeline does for these
        ref.pos_embed = ref._get_pos_embed_from_transformer(base_ref)
    x, hint, t, ctx, y = inputs()
    cfg = ours.config
    assert cfg.zero_pooled == (kind == "instantx") and cfg.own_embedding == (kind == "instantx")
    with torch.no_grad():
        want = ref(x, hint, encoder_hidden_states=ctx if cfg.joint else None,
                   pooled_projections=torch.zeros_like(y) if cfg.zero_pooled else y, timestep=t, return_dict=False)[0]
        got = ours(x, hint, t, ctx, y)
        assert len(got) == len(want) == cfg.depth
        assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4
        # The MMDiT with these residuals (5 blocks, 3 or 2 residuals: diffusers' int(i / (5 / M)) spacing).
        controlled = base(x, t, y, ctx, control=got)
        reference = base_ref(x, ctx, y, t, block_controlnet_hidden_states=want, return_dict=False)[0]
        assert rel_err(controlled, reference) < 1e-4
        assert rel_err(controlled, base(x, t, y, ctx)) > 1e-2  # the residuals do something


def test_without_control_the_mmdit_is_unchanged_and_zero_residuals_change_nothing(odd_base):
    _, base = odd_base
    x, _, t, ctx, y = inputs()
    with torch.no_grad():
        plain = base(x, t, y, ctx)
        zeros = [torch.zeros(2, 12, 32)] * 3
        assert torch.equal(base(x, t, y, ctx, control=zeros), plain)


@pytest.mark.parametrize("kind", list(KINDS))
def test_converter_round_trip_and_detection(kind):
    ref = controlnet_reference(ODD, kind)
    theirs = ref.state_dict()
    ours = sd3_controlnet_from_diffusers(theirs)
    config = sd3_controlnet_config_from_diffusers(dict(ref.config))
    back = sd3_controlnet_to_diffusers(ours, config)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    # Detection derives the config from shapes (tiny_sd3's widths: SD3's 64-wide heads, as released).
    ref = controlnet_reference(TRANSFORMER, kind)
    theirs = ref.state_dict()
    for sd, layout in ((theirs, "diffusers"), (sd3_controlnet_from_diffusers(theirs), "original")):
        detection = detect(sd)
        component = detection.components["controlnet"]
        assert detection.family == "sd3" and component.arch == "sd3_controlnet" and component.layout == layout
        assert component.config == sd3_controlnet_config_from_diffusers(dict(ref.config))
    with pytest.raises(UnknownModelError, match="head width"):  # 8-wide heads: in no shape, and no hint
        detect(ours)


def test_stabilitys_sd35_file_layout_reads():
    """Stability's SD3.5 files: blocks in our names, embedders in diffusers' names, a control_type entry."""
    ref = controlnet_reference(TRANSFORMER, "sd3.5")
    ours = sd3_controlnet_from_diffusers(ref.state_dict())
    stability = {k: v for k, v in ours.items() if k.startswith(("transformer_blocks", "controlnet_blocks", "pos_"))}
    stability.update({k: v for k, v in ref.state_dict().items() if k.startswith("time_text_embed")})
    stability["control_type"] = torch.tensor(1.0)
    assert sd3_controlnet_from_diffusers(stability).keys() == ours.keys()
    assert detect(stability).components["controlnet"].arch == "sd3_controlnet"


# -- full size, on the meta device --------------------------------------------------------------------

# InstantX/SD3-Controlnet-Canny's config.json; Stability's SD3.5-large ControlNets as diffusers' conversion
# script builds them (19 single-stream blocks, 38 heads).
INSTANTX = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_LARGE = dict(patch_size=2, in_channels=16, num_layers=19, attention_head_dim=64, num_attention_heads=38,
                  caption_projection_dim=2048, pooled_projection_dim=2048, out_channels=16, **SINGLE)


@pytest.mark.parametrize("fields", [INSTANTX, SD35_LARGE], ids=["instantx-canny", "sd3.5-large"])
def test_full_size_layouts_map_and_detect(fields):
    with torch.device("meta"):
        theirs = SD3ControlNetModel(**fields).state_dict()
    expected = sd3_controlnet_config_from_diffusers(fields)
    ours = sd3_controlnet_from_diffusers(theirs)
    with torch.device("meta"):
        built = SD3ControlNet(expected).state_dict()
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    detection = detect(theirs)
    assert detection.family == "sd3" and detection.components["controlnet"].config == expected


# -- on a tiny SD3, through the pipeline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def refs():
    return reference_models("sd3-medium")


@pytest.fixture(scope="module")
def models(refs, tmp_path_factory):
    return diffstudio.load(write_single_file(tmp_path_factory.mktemp("sd3") / "sd3.safetensors", refs))


def write_controlnet(root, kind: str, zero: bool = False, seed: int = 5, **overrides):
    """A ControlNet for tiny_sd3's MMDiT as a diffusers folder (config.json + weights)."""
    ref = SD3ControlNetModel(**{**{k: TRANSFORMER[k] for k in CONTROLNET_FIELDS}, **KINDS[kind], **overrides})
    if not zero:  # as trained: zero-initialised in training, random here
        randomise(ref, seed)
    ref.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-controlnets")
    from safetensors.torch import save_file

    paths = {kind: write_controlnet(root / kind, kind) for kind in KINDS}
    paths["zero"] = write_controlnet(root / "zero", "instantx", zero=True)
    weights = SD3ControlNetModel.from_pretrained(paths["instantx"]).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "instantx.safetensors"))
    paths["file"] = root / "instantx.safetensors"
    return paths


def generate(models, units=None):
    return diffstudio.Pipeline(models)("a red circle", width=64, height=64, steps=2, seed=0, progress=False,
                                       controlnets=units or [])[0]


def test_in_the_pipeline(models, controlnets):
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = generate(models)
    zero = models.add_controlnet(controlnets["zero"])
    assert type(zero).hint_space == "latent" and zero.hint_offset == pytest.approx(0.0609 * 1.5305)
    assert generate(models, [diffstudio.ControlNetUnit(zero, control)]).tobytes() == base.tobytes()
    for kind in ("instantx", "sd3.5"):
        controlnet = models.add_controlnet(controlnets[kind])
        assert generate(models, [diffstudio.ControlNetUnit(controlnet, control, scale=0.0)]).tobytes() == \
            base.tobytes()
        changed = generate(models, [diffstudio.ControlNetUnit(controlnet, control, scale=0.7)])
        assert changed.tobytes() != base.tobytes()
    # Latent sides that are not multiples of the patch (40 x 72 pixels: 5 x 9 latents) are padded as the MMDiT's.
    odd = diffstudio.Pipeline(models)("a red circle", width=40, height=72, steps=1, seed=0, progress=False,
                                      controlnets=[diffstudio.ControlNetUnit(controlnet, control)])[0]
    assert odd.size == (40, 72)
    # A single file (diffusers names, no config.json) gives the folder's ControlNet.
    from_file = models.add_controlnet(controlnets["file"])
    folder = models.add_controlnet(controlnets["instantx"])
    assert from_file.config == folder.config
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), folder.state_dict().values()))


def test_info_names_it(controlnets, capsys):
    from diffstudio.cli import main

    for path in (controlnets["file"], controlnets["sd3.5"]):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert "family: sd3" in out and "sd3_controlnet" in out and "diffusers layout" in out


# -- named errors --------------------------------------------------------------------------------------


def test_a_controlnet_that_does_not_fit_is_refused(models, tmp_path):
    wider = write_controlnet(tmp_path / "wide", "instantx", num_attention_heads=3,
                             caption_projection_dim=192)
    with pytest.raises(ControlNetMismatchError, match="residuals are 192 wide"):
        models.add_controlnet(wider)
    inpaint = write_controlnet(tmp_path / "inpaint", "instantx", extra_conditioning_channels=1)
    with pytest.raises(ControlNetMismatchError, match="inpainting ControlNet"):
        models.add_controlnet(inpaint)


def test_an_sd3_controlnet_on_another_family_and_a_file_that_is_none(models, controlnets, tmp_path):
    from tests import tiny_sd15

    sd15 = diffstudio.load(tiny_sd15.write_single_file(tmp_path / "sd15.safetensors",
                                                       *tiny_sd15.reference_models()))
    for path in (controlnets["file"], controlnets["instantx"]):
        with pytest.raises(ControlNetMismatchError, match="for sd3 models"):
            sd15.add_controlnet(path)
    from tests.tiny_controlnet import reference_controlnet

    reference_controlnet("sd15").save_pretrained(tmp_path / "sd15-controlnet")
    with pytest.raises(ControlNetMismatchError, match="for sd15 models, the loaded model is sd3"):
        models.add_controlnet(tmp_path / "sd15-controlnet")
    with pytest.raises(UnknownModelError, match="holds no ControlNet"):
        models.add_controlnet(models.sources["dit"])
    with pytest.raises(UnknownModelError, match="ControlNet for sd3 models"):
        diffstudio.load(controlnets["file"])


# -- the whole run against diffusers' StableDiffusion3ControlNetPipeline ---------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_controlled_txt2img_matches_diffusers_pipeline(kind, refs, models, controlnets, monkeypatch):
    """Same tiny SD3, same ControlNet, same sigmas and noise: the final latents agree. diffusers encodes the control
    image with a sample of the VAE's posterior; it is pinned to the mean (diffstudio's) here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer, load_tokenizer
    from diffstudio.sampling.noise import SeededNoise

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    ref = StableDiffusion3ControlNetPipeline(
        **refs, controlnet=SD3ControlNetModel.from_pretrained(controlnets[kind]).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"), tokenizer_3=load_tokenizer("t5"))
    ref.set_progress_bar_config(disable=True)
    control = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    steps, cfg, scale = 3, 4.0, 0.7
    ref.scheduler.set_timesteps(steps)
    sigmas = ref.scheduler.sigmas.tolist()
    noise = SeededNoise([3], (16, 8, 8), dtype=torch.float32, device="cpu").initial()
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=steps, guidance_scale=cfg,
                   height=64, width=64, latents=noise, control_image=control, controlnet_conditioning_scale=scale,
                   output_type="latent").images
    final = {}
    diffstudio.Pipeline(models)("a red circle", "blue", width=64, height=64, cfg_scale=cfg, seed=3, sigmas=sigmas,
                                progress=False, callback=lambda i, total, x, denoised: final.update(z=denoised),
                                controlnets=[diffstudio.ControlNetUnit(controlnets[kind], control, scale=scale)])
    assert rel_err(final["z"], expected) < 1e-4  # (measured 6e-7; 7e-3 with the control latent's shift left in)
