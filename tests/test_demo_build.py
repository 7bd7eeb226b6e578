"""The demo model's build recipe: every stage runs and resumes at toy sizes, the result is an SD 1.x
file, and the layout objective measures what its docstring says (x0 error at high noise)."""

from __future__ import annotations

import torch

import diffstudio
from diffstudio.demo import build as recipe


def test_layout_loss_is_zero_for_the_true_noise_and_grows_with_its_error():
    from diffstudio.families.sd15 import SD15
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.objectives import alphas_cumprod

    acp = alphas_cumprod(SD15)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen_t = []

    def oracle(x_t, t, ids, wrong=0.0):  # reads the noise back from x_t, knowing x0
        seen_t.append(t)
        a, s = acp[t.long()].sqrt().view(-1, 1, 1, 1), (1 - acp[t.long()]).sqrt().view(-1, 1, 1, 1)
        return (x_t - a * x0) / s + wrong

    ids = torch.zeros(4, 77, dtype=torch.long)
    exact = recipe.layout_loss(oracle, x0, ids, torch.Generator().manual_seed(1), prediction_for(SD15), t_low=700)
    off = recipe.layout_loss(lambda x, t, i: oracle(x, t, i, wrong=0.01), x0, ids, torch.Generator().manual_seed(1),
                             prediction_for(SD15), t_low=700)
    assert exact < 1e-8
    # an eps error e becomes an x0 error of e * s / a, which at t >= 700 is more than 3x larger
    assert off > 9 * 0.01**2
    assert all(bool((t >= 700).all()) for t in seen_t)


def test_stage_captions_restyle_only_what_they_are_asked_to():
    from diffstudio.demo.shapes import ShapesDataset, parse_background, parse_caption

    n = 200
    data = ShapesDataset(n, size=64, seed=3)
    plain = recipe.stage_captions(n, 64, 3)
    assert plain == [data[i][1] for i in range(n)]  # no restyling: the dataset's own captions
    named = recipe.stage_captions(n, 64, 3, always_position=True)
    phrased = recipe.stage_captions(n, 64, 3, always_position=True, on_background=0.5)
    for i in range(n):
        scene = data.scene(i)[0]
        asked = parse_caption(named[i])
        assert [(a.kind, a.color, a.position) for a in asked] == [(s.kind, s.color, s.position) for s in scene.shapes]
        assert phrased[i].replace(" on a ", ", ") == named[i]  # only the background's phrasing differs
        assert parse_background(phrased[i]) == parse_background(named[i])
    with_background = [p for p in phrased if parse_background(p)]
    share_on = sum(" on a " in p for p in with_background) / len(with_background)
    assert 0.35 < share_on < 0.65


def test_every_stage_runs_resumes_and_assembles_an_sd15_file(tmp_path):
    kw = dict(n_images=16, size=32, vae_steps=2, decoder_steps=2, unet_steps=2, layout_steps=2, polish_steps=2,
              refine_steps=2, vae_batch=2, unet_batch=4, seed=0)
    out = tmp_path / "toy.safetensors"
    recipe.build(out, tmp_path / "work", stages=("vae", "latents", "unet"), **kw)
    state = tmp_path / "work" / "unet" / "checkpoint" / "state.pt"
    written = state.stat().st_mtime_ns
    # a second call runs the rest; a finished stage is not redone (its checkpoint is at its last step)
    path = recipe.build(out, tmp_path / "work", stages=("unet", "layout", "polish", "refine", "decoder", "assemble"),
                        **kw)
    assert state.stat().st_mtime_ns == written
    models = diffstudio.load(path)
    assert models.family.name == "sd15"
    last = recipe._checkpoint_model(tmp_path / "work" / "refine")  # the file holds the last stage's weights
    shipped = models.components["unet"].state_dict()
    name = next(k for k in shipped if k.endswith("weight") and k in {n.removeprefix("unet.") for n in last})
    torch.testing.assert_close(shipped[name].float(), last["unet." + name].half().float())
    image = diffstudio.Pipeline(models)("a red circle", width=32, height=32, steps=2, seed=0, progress=False)[0]
    assert image.size == (32, 32)
    # --decoder-steps 0 skips the decoder fine-tune: the file keeps the VAE stage's decoder
    vae_stage = torch.load(tmp_path / "work" / "latents.pt", weights_only=True)["vae"]
    fine_tuned = recipe._checkpoint_model(tmp_path / "work" / "decoder")
    name = "decoder.conv_out.weight"
    assert not torch.equal(vae_stage[name], fine_tuned[name])
    for decoder_steps, expected in ((2, fine_tuned), (0, vae_stage)):
        path = recipe.build(tmp_path / f"d{decoder_steps}.safetensors", tmp_path / "work", stages=("assemble",),
                            **{**kw, "decoder_steps": decoder_steps})
        decoder = diffstudio.load(path).components["vae"].state_dict()[name]
        torch.testing.assert_close(decoder.float(), expected[name].half().float())


def test_the_optimizer_and_the_unet_rate_schedule_reach_the_trainer(tmp_path, monkeypatch):
    from diffstudio.train import loop

    seen = []

    def spy(model, loss_fn, **kwargs):
        seen.append(kwargs)
        return real_train(model, loss_fn, **kwargs)

    real_train = loop.train
    monkeypatch.setattr(loop, "train", spy)
    kw = dict(n_images=8, size=32, vae_steps=2, decoder_steps=2, unet_steps=2, layout_steps=2, polish_steps=2,
              refine_steps=2, vae_batch=2, unet_batch=4, seed=0)
    recipe.build(tmp_path / "toy.safetensors", tmp_path / "work", stages=("vae", "latents", "unet", "decoder"),
                 optimizer="adamw_fused", unet_lr_end=5e-5, **kw)
    assert [s["desc"] for s in seen] == ["vae", "unet", "decoder"]
    assert all(s["optimizer"] == "adamw_fused" for s in seen)
    assert [s.get("lr_end") for s in seen] == [None, 5e-5, None]
    state = torch.load(tmp_path / "work" / "unet" / "checkpoint" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"] is True


def test_the_edge_weight_reaches_both_autoencoder_stages_and_the_recipe(tmp_path, monkeypatch):
    import json

    from diffstudio.train import objectives

    weights = []

    def spy(*args, **kwargs):
        weights.append(kwargs.get("edge_weight"))
        return real_loss(*args, **kwargs)

    real_loss = objectives.vae_loss
    monkeypatch.setattr(objectives, "vae_loss", spy)
    kw = dict(n_images=8, size=32, vae_steps=2, decoder_steps=3, vae_batch=2, seed=0)
    recipe.build(tmp_path / "toy.safetensors", tmp_path / "work", stages=("vae", "latents", "decoder"),
                 vae_edge_weight=8.0, **kw)
    assert weights == [8.0] * 5  # 2 vae steps, 3 decoder steps
    assert json.loads((tmp_path / "work" / "recipe.json").read_text())["vae_edge_weight"] == 8.0
