"""Hunyuan-DiT ControlNets: the ControlNet against diffusers' HunyuanDiT2DControlNetModel, the DiT's control residuals
against HunyuanDiT2DModel's ``controlnet_block_samples``, the converter (diffusers <-> Tencent's .pt names), detection,
the full-size released layouts on the meta device, loading onto a tiny Hunyuan-DiT and running in diffstudio.Pipeline,
the whole controlled run against HunyuanDiTControlNetPipeline, and the named errors."""

from __future__ import annotations

import pytest
import tiny_hunyuan as th
import torch
from diffusers import HunyuanDiT2DControlNetModel

import diffstudio
from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
from diffstudio.convert.hunyuan_dit_controlnet import hunyuan_controlnet_from_diffusers, hunyuan_controlnet_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.hunyuan_dit import config_from_diffusers
from diffstudio.detect.hunyuan_dit_controlnet import hunyuan_controlnet_config_from_diffusers
from diffstudio.errors import ControlNetMismatchError, InvalidInputError, UnknownModelError
from diffstudio.models.hunyuan_dit import HunyuanDiT, rope_2d
from diffstudio.models.hunyuan_dit_controlnet import HunyuanDiTControlNet


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def controlnet_kwargs(style: bool = False, layers: int = 4) -> dict:
    """diffusers' HunyuanDiT2DControlNetModel for tiny_hunyuan's DiT (its depth as transformer_num_layers)."""
    kw = th.dit_kwargs(style)
    kw.pop("learn_sigma")
    kw.pop("num_layers")
    return {**kw, "transformer_num_layers": layers}


def reference_controlnet(style: bool = False, layers: int = 4, seed: int = 5) -> HunyuanDiT2DControlNetModel:
    ref = HunyuanDiT2DControlNetModel(**controlnet_kwargs(style, layers))
    th.randomise(ref, seed)  # as trained: the zero-initialised Linears are not zero
    return ref.eval()


def ours_of(ref: HunyuanDiT2DControlNetModel) -> HunyuanDiTControlNet:
    ours = HunyuanDiTControlNet(hunyuan_controlnet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(hunyuan_controlnet_from_diffusers(ref.state_dict()), strict=True)
    return ours.eval()


def inputs(batch: int = 2, h: int = 8, w: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bert_mask = torch.zeros(batch, 77, dtype=torch.long)
    t5_mask = torch.zeros(batch, 256, dtype=torch.long)
    for i in range(batch):
        bert_mask[i, : 5 + 20 * i] = 1
        t5_mask[i, : 3 + 40 * i] = 1
    return dict(x=torch.randn(batch, 4, h, w, generator=g), hint=torch.randn(batch, 4, h, w, generator=g),
                t=torch.tensor([10.0, 700.0][:batch]), bert=torch.randn(batch, 77, th.BERT_WIDTH, generator=g),
                bert_mask=bert_mask, t5=torch.randn(batch, 256, th.T5_WIDTH, generator=g), t5_mask=t5_mask,
                size=torch.tensor([[1024.0, 1024.0, 96.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long))


@pytest.mark.parametrize("style", [False, True], ids=["v1.2", "v1.1"])
def test_residuals_and_controlled_dit_match_diffusers(style):
    """6 DiT blocks: 2 long skips, 2 residuals, so their order is checked too."""
    from diffusers import HunyuanDiT2DModel

    base_ref = HunyuanDiT2DModel(**{**th.dit_kwargs(style), "num_layers": 6}).eval()
    th.randomise(base_ref, 1)
    base = HunyuanDiT(config_from_diffusers(dict(base_ref.config))).eval()
    base.load_state_dict(hunyuan_dit_from_diffusers(base_ref.state_dict()), strict=True)
    ref = reference_controlnet(style, layers=6)
    ours = ours_of(ref)
    assert len(ours.blocks) == 2 and ours.config == base.config
    a = inputs()
    rope = rope_2d(base.config.head_dim, 4, 6)
    extra = dict(image_meta_size=a["size"], style=a["style"]) if style else {}
    text = dict(encoder_hidden_states=a["bert"], text_embedding_mask=a["bert_mask"],
                encoder_hidden_states_t5=a["t5"], text_embedding_mask_t5=a["t5_mask"])
    with torch.no_grad():
        want = ref(a["x"], a["t"], a["hint"], conditioning_scale=1.0, **text, image_meta_size=a["size"],
                   style=a["style"], image_rotary_emb=rope, return_dict=False)[0]
        got = ours(a["x"], a["hint"], a["t"], **text, **extra)
        assert len(got) == len(want) == 2
        print(f"residuals vs diffusers: {max(rel_err(g, w) for g, w in zip(got, want)):.1e}")
        assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-4
        reference = base_ref(a["x"], a["t"], **text, image_meta_size=a["size"], style=a["style"],
                             image_rotary_emb=rope, controlnet_block_samples=[0.7 * w for w in want],
                             return_dict=False)[0]
        controlled = base(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], **extra,
                          control=[0.7 * g for g in got])
        plain = base(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], **extra)
        print(f"controlled DiT vs diffusers: {rel_err(controlled, reference):.1e}")
        assert rel_err(controlled, reference) < 1e-4
        assert rel_err(controlled, plain) > 1e-2  # the residuals do something
        # Zero residuals change nothing; a wrong count is a named error.
        assert torch.equal(base(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], **extra,
                                control=[torch.zeros_like(g) for g in got]), plain)
        with pytest.raises(InvalidInputError, match="3 ControlNet residuals"):
            base(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], **extra, control=got + got[:1])


@pytest.mark.parametrize("style", [False, True], ids=["v1.2", "v1.1"])
def test_converter_round_trip_and_detection(style):
    ref = reference_controlnet(style)
    theirs = ref.state_dict()
    ours = hunyuan_controlnet_from_diffusers(theirs)
    assert "before_proj.weight" in ours and "after_proj_list.0.weight" in ours and "final_layer.linear.weight" \
        not in ours
    config = hunyuan_controlnet_config_from_diffusers(dict(ref.config))
    back = hunyuan_controlnet_to_diffusers(ours, config)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    for sd, layout in ((theirs, "diffusers"), (ours, "original")):
        found = detect(sd)
        component = found.components["controlnet"]
        assert found.family == "hunyuan_dit" and component.arch == "hunyuan_dit_controlnet"
        assert component.layout == layout and component.config == config
    # A DiT is not taken for its ControlNet, nor the other way round.
    assert set(detect(hunyuan_dit_from_diffusers(th.reference_dit(style).state_dict())).components) == {"dit"}
    from diffstudio.detect.hunyuan_dit_controlnet import derive_hunyuan_controlnet_config

    with pytest.raises(UnknownModelError, match="2 blocks and 1 after_proj_list"):
        derive_hunyuan_controlnet_config({**ours, "blocks.1.norm1.weight": ours["blocks.0.norm1.weight"]})


# -- full size, on the meta device ----------------------------------------------------------------------

# HunyuanDiT-v1.x-ControlNet-Diffusers-{Canny,Depth,Pose}: diffusers' conversion script builds them from
# HunyuanDiT-v1.2-Diffusers' transformer config.json, use_style_cond_and_image_meta_size true for v1.1 and false for
# v1.2 (the class reads transformer_num_layers, default 40; the transformer's num_layers is not its field).
RELEASED = {"activation_fn": "gelu-approximate", "attention_head_dim": 88, "cross_attention_dim": 1024,
            "cross_attention_dim_t5": 2048, "hidden_size": 1408, "in_channels": 4, "mlp_ratio": 4.3637,
            "num_attention_heads": 16, "patch_size": 2, "pooled_projection_dim": 1024, "sample_size": 128,
            "text_len": 77, "text_len_t5": 256, "transformer_num_layers": 40}


@pytest.mark.parametrize("style, gigabytes", [(True, 3.04), (False, 2.98)], ids=["v1.1", "v1.2"])
def test_full_size_released_layout_on_meta(style, gigabytes):
    config_json = {**RELEASED, "use_style_cond_and_image_meta_size": style}
    with torch.device("meta"):
        theirs = HunyuanDiT2DControlNetModel(**config_json).state_dict()
        ours = HunyuanDiTControlNet(hunyuan_controlnet_config_from_diffusers(config_json)).state_dict()
    released = hunyuan_controlnet_from_diffusers(theirs)
    assert {k: tuple(v.shape) for k, v in released.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert "blocks.18.attn1.Wqkv.weight" in ours and "blocks.19.attn1.Wqkv.weight" not in ours
    assert "after_proj_list.18.weight" in ours and ours["before_proj.weight"].shape == (1408, 1408)
    found = detect(released)
    config = found.components["controlnet"].config
    assert found.family == "hunyuan_dit" and config == hunyuan_controlnet_config_from_diffusers(config_json)
    assert (config.depth, config.hidden_size, config.num_heads, config.mlp_hidden) == (40, 1408, 16, 6144)
    # The released diffusion_pytorch_model.safetensors are fp32: 3.04 GB (v1.1) and 2.98 GB (v1.2) on the Hub.
    assert sum(v.numel() for v in ours.values()) * 4 / 1e9 == pytest.approx(gigabytes, abs=0.01)


# -- on a tiny Hunyuan-DiT, through the pipeline -----------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan-controlnet")
    refs = th.reference_models(style=False)
    th.write_diffusers_folder(root / "model", *refs)
    return root, refs


@pytest.fixture(scope="module")
def models(folder):
    return diffstudio.load(folder[0] / "model")


@pytest.fixture(scope="module")
def controlnets(folder):
    root = folder[0]
    paths = {}
    reference_controlnet().save_pretrained(root / "canny")
    paths["folder"] = root / "canny"
    zero = reference_controlnet()
    with torch.no_grad():
        zero.input_block.weight.zero_()
        zero.input_block.bias.zero_()
        for block in zero.controlnet_blocks:
            block.weight.zero_()
            block.bias.zero_()
    zero.save_pretrained(root / "zero")
    paths["zero"] = root / "zero"
    # Tencent's own .pt: the release's names, pickled
    torch.save(hunyuan_controlnet_from_diffusers(reference_controlnet().state_dict()), root / "canny.pt")
    paths["pt"] = root / "canny.pt"
    return paths


def generate(models, units=None, **kw):
    args = dict(width=64, height=64, steps=2, seed=0, progress=False)
    return diffstudio.Pipeline(models)("a red circle", **{**args, **kw}, controlnets=units or [])[0]


def test_in_the_pipeline(models, controlnets):
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = generate(models)
    zero = models.add_controlnet(controlnets["zero"])
    assert type(zero).hint_space == "latent"
    assert generate(models, [diffstudio.ControlNetUnit(zero, control)]).tobytes() == base.tobytes()
    controlnet = models.add_controlnet(controlnets["folder"])
    assert generate(models, [diffstudio.ControlNetUnit(controlnet, control, scale=0.0)]).tobytes() == base.tobytes()
    changed = generate(models, [diffstudio.ControlNetUnit(controlnet, control, scale=0.8)])
    assert changed.tobytes() != base.tobytes()
    # Image sides that are multiples of 8 but not of 16 (odd latent sides) are padded as the DiT's input.
    assert generate(models, [diffstudio.ControlNetUnit(controlnet, control)], width=40, height=72).size == (40, 72)
    # Tencent's .pt (the release's names) is the folder's ControlNet.
    from_pt = models.add_controlnet(controlnets["pt"])
    assert from_pt.config == controlnet.config
    assert all(torch.equal(a, b) for a, b in zip(from_pt.state_dict().values(), controlnet.state_dict().values()))


def test_info_names_it(controlnets, capsys):
    from diffstudio.cli import main

    for path, layout in ((controlnets["folder"], "diffusers layout"), (controlnets["pt"], "original layout")):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert "family: hunyuan_dit" in out and "hunyuan_dit_controlnet" in out and layout in out


def test_named_errors(models, controlnets, tmp_path):
    v11 = tmp_path / "v11"
    reference_controlnet(style=True).save_pretrained(v11)
    with pytest.raises(ControlNetMismatchError, match="made for Hunyuan-DiT v1.0/v1.1"):
        models.add_controlnet(v11)
    deeper = tmp_path / "deeper"
    reference_controlnet(layers=6).save_pretrained(deeper)
    with pytest.raises(ControlNetMismatchError, match="2 residuals, the DiT has 1 long skips"):
        models.add_controlnet(deeper)
    with pytest.raises(UnknownModelError, match="ControlNet for hunyuan_dit models"):
        diffstudio.load(controlnets["pt"])
    from tests.tiny_controlnet import reference_controlnet as sd15_controlnet

    sd15_controlnet("sd15").save_pretrained(tmp_path / "sd15-controlnet")
    with pytest.raises(ControlNetMismatchError, match="for sd15 models, the loaded model is hunyuan_dit"):
        models.add_controlnet(tmp_path / "sd15-controlnet")


# -- the whole run against diffusers' HunyuanDiTControlNetPipeline --------------------------------------------


def test_controlled_run_matches_diffusers_pipeline(folder, models, controlnets, monkeypatch):
    """Two DDIM steps (eta 0, the final alpha 1) of HunyuanDiTControlNetPipeline = two Euler steps of ours over the
    same timesteps, from the same start, with CFG and the ControlNet (scale 0.7) as diffstudio's module applies it.
    diffusers encodes the control image with a sample of the VAE's posterior; it is pinned to the mean here."""
    from diffusers import DDIMScheduler, HunyuanDiTControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from diffstudio.conditioning.tokenizers import load_tokenizer
    from diffstudio.families import get_family
    from diffstudio.pipeline.control import ControlNets, ControlNetUnit
    from diffstudio.pipeline.denoiser import make_denoiser
    from diffstudio.pipeline.guidance import CFGDenoiser
    from diffstudio.sampling import sample_euler

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    _, (dit, vae, bert, t5) = folder
    bert_tok, t5_tok = (load_tokenizer(s.tokenizer_data) for s in get_family("hunyuan_dit").text_encoders)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", set_alpha_to_one=True, steps_offset=1, clip_sample=False)
    ref = HunyuanDiTControlNetPipeline(
        vae=vae, text_encoder=bert, tokenizer=bert_tok, transformer=dit, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, text_encoder_2=t5, tokenizer_2=t5_tok,
        controlnet=HunyuanDiT2DControlNetModel.from_pretrained(controlnets["folder"]).eval())
    ref.set_progress_bar_config(disable=True)
    control = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt, scale = "一只猫 a cat", 0.7
    expected = ref(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=6.0, latents=start.clone(),
                   control_image=control, controlnet_conditioning_scale=scale, output_type="latent",
                   use_resolution_binning=False).images

    pipe = diffstudio.Pipeline(models)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompts([prompt], [""], 1, width=64, height=64)
        denoiser = make_denoiser(models, (8, 8))
        scheduler.set_timesteps(2)
        sigmas = torch.cat([denoiser.t_to_sigma(scheduler.timesteps.double()), torch.zeros(1, dtype=torch.float64)])

        class Run:  # what ControlNets.wrap reads of a run
            request = type("Request", (), {"width": 64, "height": 64, "tiled_vae": False})()
            family = models.family

            def sigma_at(self, fraction):
                return float(sigmas[0]) if fraction == 0 else 0.0

        gen = Run()
        gen.models, gen.prompts, gen.cond, gen.uncond = models, [prompt], cond, uncond
        controlled = ControlNets([ControlNetUnit(controlnets["folder"], control, scale=scale)]).wrap(denoiser, gen)
        x = start * (1 + sigmas[0] ** 2).sqrt().float()
        got = sample_euler(CFGDenoiser(controlled, gen.cond, gen.uncond, 6.0), x, sigmas.float())
        plain = sample_euler(CFGDenoiser(denoiser, cond, uncond, 6.0), x, sigmas.float())
    print(f"controlled run vs diffusers: {rel_err(got, expected):.1e}; without the ControlNet: "
          f"{rel_err(plain, expected):.1e}")
    assert rel_err(got, expected) < 1e-4
    assert rel_err(plain, expected) > 1e-3  # the ControlNet's share is far above the tolerance


def test_with_region_prompts(models, controlnets):
    """Region prompts (cross-attention masks) run with a ControlNet: a region that repeats the global prompt leaves the
    controlled result as it was, and other regions change it."""
    from diffstudio.pipeline.regions import Region

    controlnet = models.add_controlnet(controlnets["folder"])
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    units = [diffstudio.ControlNetUnit(controlnet, control, scale=0.8)]

    def final(**kw):
        seen = []
        diffstudio.Pipeline(models)("a red circle", "blurry", width=64, height=64, steps=2, seed=3, cfg_scale=3.0,
                                    progress=False, callback=lambda i, n, x, d: seen.append(d), controlnets=units,
                                    **kw)
        return seen[-1]

    plain = final()
    same = final(regions=[Region("a red circle", box=(0.25, 0.0, 1.0, 0.75))], region_mode="attention")
    other = final(regions=[Region("a blue square", box=(0.5, 0.0, 1.0, 1.0))], region_mode="attention")
    noise = (same - plain).abs().max()
    assert noise <= 1e-4 * plain.abs().max()
    assert (other - plain).abs().max() > 10 * max(noise, 1e-6 * plain.abs().max())


def test_the_cross_attention_bias_reaches_the_controlnet():
    """Two prompts' tokens (BERT chunks, then mT5 chunks) with a bias that hides the second from every image token:
    the residuals are those of the first prompt alone."""
    ours = ours_of(reference_controlnet(layers=6))
    a, b = inputs(seed=0), inputs(seed=1)
    n_bert, n_t5 = 77, 256
    two = dict(encoder_hidden_states=torch.cat([a["bert"], b["bert"]], 1),
               text_embedding_mask=torch.cat([a["bert_mask"], b["bert_mask"]], 1),
               encoder_hidden_states_t5=torch.cat([a["t5"], b["t5"]], 1),
               text_embedding_mask_t5=torch.cat([a["t5_mask"], b["t5_mask"]], 1))
    hide = torch.zeros(1, 1, 24, 2 * (n_bert + n_t5))
    hide[..., n_bert:2 * n_bert] = float("-inf")
    hide[..., 2 * n_bert + n_t5:] = float("-inf")
    with torch.no_grad():
        alone = ours(a["x"], a["hint"], a["t"], encoder_hidden_states=a["bert"], text_embedding_mask=a["bert_mask"],
                     encoder_hidden_states_t5=a["t5"], text_embedding_mask_t5=a["t5_mask"])
        masked = ours(a["x"], a["hint"], a["t"], **two, context_bias={24: hide})
        open_ = ours(a["x"], a["hint"], a["t"], **two)
    assert max(rel_err(m, r) for m, r in zip(masked, alone)) < 1e-5
    assert max(rel_err(o, r) for o, r in zip(open_, alone)) > 1e-3
