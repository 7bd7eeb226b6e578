"""LoRA training on every family: a 2-step run on each tiny random fixture (tests/tiny_*.py).

Per family: the run finishes with a finite loss; the kohya file names exactly the expected layers
(diffusers module paths for the LDM UNets, as kohya's sd-scripts trains them; the original release's
names for the DiTs); the adapters moved; the base model is left as it was; diffstudio's own loader
applies the file with full coverage, as W + (alpha / r) up @ down on exactly those layers. The peft
export of the same run means the same update, and diffusers itself reads it so (all but Hunyuan-DiT,
which diffusers cannot load LoRAs into). Gradient checkpointing recomputes the blocks in the backward
pass and gives the gradients of a plain step. SD 1.x resume / CLI / diffusers-kohya tests are in
test_train_lora.py.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest
import torch

import diffstudio
from diffstudio.train.lora import LoRATrainConfig, train_lora
from tests import tiny_flux, tiny_hunyuan, tiny_kolors, tiny_sd3, tiny_sd15, tiny_sdxl

RANK, STEPS, ALPHA = 2, 2, 1.0  # alpha != rank: the scale alpha / r must be applied, not assumed 1


def _sd15(folder):
    unet, vae, text = tiny_sd15.reference_models()
    return tiny_sd15.write_single_file(folder / "model.safetensors", unet, vae, text), unet


def _sdxl(folder, refiner=False):
    models = tiny_sdxl.refiner_reference_models() if refiner else tiny_sdxl.reference_models()
    return tiny_sdxl.write_diffusers_folder(folder / "model", models), models.unet


def _kolors(folder):
    unet, vae, text = tiny_kolors.reference_models()
    return tiny_kolors.write_diffusers_folder(folder / "model", unet, vae, text), unet


def _sd3(folder):
    models = tiny_sd3.reference_models("sd3.5-medium")  # QK-norm and an MMDiT-X block (attn2) too
    return tiny_sd3.write_diffusers_folder(folder / "model", models), models["transformer"]


def _flux(folder):
    dit, vae, clip, t5 = tiny_flux.reference_models("dev")  # dev: the guidance input is conditioning too
    return tiny_flux.write_diffusers_folder(folder / "model", dit, vae, clip, t5), dit


def _hunyuan(folder, style=False):
    dit, vae, bert, t5 = tiny_hunyuan.reference_models(style=style)
    return tiny_hunyuan.write_diffusers_folder(folder / "model", dit, vae, bert, t5), None  # no diffusers LoRA


# case -> (builder, family name)
CASES = {
    "sd15": (_sd15, "sd15"),
    "sdxl": (_sdxl, "sdxl"),
    "sdxl_refiner": (lambda folder: _sdxl(folder, refiner=True), "sdxl_refiner"),
    "kolors": (_kolors, "kolors"),
    "sd3": (_sd3, "sd3"),
    "flux": (_flux, "flux"),
    "hunyuan_dit": (_hunyuan, "hunyuan_dit"),
    "hunyuan_dit_v1.1": (lambda folder: _hunyuan(folder, style=True), "hunyuan_dit"),  # + size / style inputs
}

# What kohya's sd-scripts trains in an LDM UNet, in diffusers' module paths: every Linear / 1x1 Conv of the
# spatial transformers (proj_in / proj_out, self- and cross-attention, feed-forward).
UNET_KOHYA = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.(proj_in|proj_out|"
                        r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")


def expected_layers(models, reference) -> set[str]:
    """The module paths the kohya file must name, written out per architecture (not read off the regex)."""
    config = models.denoiser.config
    family = models.family.name
    if models.family.denoiser_role == "unet":  # diffusers paths, from the diffusers reference UNet
        return {n for n, _ in reference.named_modules() if UNET_KOHYA.fullmatch(n)}
    names = set()
    if family == "flux":
        for i in range(config.depth):
            names |= {f"double_blocks.{i}.{s}_{layer}" for s in ("img", "txt")
                      for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
        for i in range(config.depth_single_blocks):
            names |= {f"single_blocks.{i}.linear1", f"single_blocks.{i}.linear2"}
    elif family == "sd3":
        for i in range(config.depth):
            for stream in ("context_block", "x_block"):
                names.add(f"joint_blocks.{i}.{stream}.attn.qkv")
                if not (stream == "context_block" and i == config.depth - 1):  # the last context block: qkv only
                    names |= {f"joint_blocks.{i}.{stream}.{layer}" for layer in ("attn.proj", "mlp.fc1", "mlp.fc2")}
            if i in config.dual_attention_layers:
                names |= {f"joint_blocks.{i}.x_block.attn2.qkv", f"joint_blocks.{i}.x_block.attn2.proj"}
    elif family == "hunyuan_dit":
        for i in range(config.depth):
            names |= {f"blocks.{i}.{layer}" for layer in ("attn1.Wqkv", "attn1.out_proj", "attn2.q_proj",
                                                           "attn2.kv_proj", "attn2.out_proj", "mlp.fc1", "mlp.fc2")}
    return names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from diffstudio.demo.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data"), 2, 64, 0)


def _config(data, out, workdir, **kw) -> LoRATrainConfig:
    kw = {"rank": RANK, "alpha": ALPHA, "steps": STEPS, "lr": 1e-3, "resolution": 64, "checkpoint_every": 1, **kw}
    return LoRATrainConfig(data=str(data), out=str(out), workdir=str(workdir), **kw)


def _snapshot(module: torch.nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in module.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in module.named_parameters()},
            "types": {n: type(m) for n, m in module.named_modules()},
            "attrs": set(vars(module)), "checkpointing": getattr(module, "gradient_checkpointing", None)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (model path, diffusers reference denoiser or None), each fixture written once per module."""
    cache = {}

    def build(case):
        if case not in cache:
            folder = tmp_path_factory.mktemp(case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers / transformers chatter while writing the fixture
                cache[case] = CASES[case][0](folder)
        return cache[case]

    return build


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory, dataset, built):
    """One training run per family (kohya export), then the same adapters exported as peft (a resume at the
    last step: no training, the checkpoint is re-exported)."""
    path, reference = built(request.param)
    folder = tmp_path_factory.mktemp(f"{request.param}-run")
    models = diffstudio.load(path)
    assert models.family.name == CASES[request.param][1]
    before = _snapshot(models.denoiser)
    work = folder / "run"
    kohya = train_lora(_config(dataset, folder / "kohya.safetensors", work), models=models)
    after = _snapshot(models.denoiser)
    peft = train_lora(_config(dataset, folder / "peft.safetensors", work, export_format="peft"), models=models)
    return {"case": request.param, "models": models, "reference": reference, "kohya": kohya, "peft": peft,
            "work": work, "before": before, "after": after}


def _load(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_the_run_finishes_with_a_finite_loss(run):
    progress = json.loads((run["work"] / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == STEPS and len(progress["losses"]) == STEPS
    assert all(math.isfinite(x) and x > 0 for x in progress["losses"])
    _, meta = _load(run["kohya"])
    assert meta["ss_base_model_version"] == run["models"].family.name
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert math.isfinite(json.loads(meta["diffstudio.lora"])["final_loss"])


def test_the_kohya_file_names_the_expected_layers(run):
    models, reference = run["models"], run["reference"]
    sd, meta = _load(run["kohya"])
    assert meta["diffstudio.lora_format"] == "kohya"
    expected = expected_layers(models, reference)
    assert expected
    stems = {"lora_unet_" + n.replace(".", "_"): n for n in expected}
    assert set(sd) == {f"{s}.{part}" for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    # Shapes against the named layer: the UNets' names are diffusers', the DiTs' our (the original) ones.
    modules = dict((reference if models.family.denoiser_role == "unet" else models.denoiser).named_modules())
    for stem, name in stems.items():
        weight = modules[name].weight
        assert sd[f"{stem}.lora_down.weight"].shape[:2] == (RANK, weight.shape[1]), stem
        assert sd[f"{stem}.lora_up.weight"].shape[:2] == (weight.shape[0], RANK), stem
        assert float(sd[f"{stem}.alpha"]) == ALPHA


def test_training_moved_the_adapters(run):
    sd, _ = _load(run["kohya"])
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(u).all() for u in ups)
    moved = sum(bool(u.abs().max() > 0) for u in ups)
    assert moved == len(ups), f"only {moved} of {len(ups)} adapters moved"


def test_the_base_model_is_left_as_it_was(run):
    for after in (run["after"], _snapshot(run["models"].denoiser)):  # after the kohya run, after both
        before = run["before"]
        assert after["state"].keys() == before["state"].keys()
        assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
        assert after["grad"] == before["grad"] and after["types"] == before["types"]
        assert after["attrs"] == before["attrs"] and after["checkpointing"] == before["checkpointing"]


def _apply(models, path) -> tuple[dict, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial match warns: full coverage means no warning at all
        handle = models.apply_lora(path)
    return {k: v.clone() for k, v in models.denoiser.state_dict().items()}, handle


def test_diffstudio_applies_the_kohya_file_to_every_trained_layer(run):
    models = run["models"]
    before = run["before"]["state"]
    sd, _ = _load(run["kohya"])
    patched, handle = _apply(models, run["kohya"])
    try:
        assert handle.report.coverage == 1.0 and handle.report.layers == len(sd) // 3
    finally:
        handle.remove()
    assert all(torch.equal(before[k], v) for k, v in models.denoiser.state_dict().items())
    changed = {k for k in before if not torch.equal(before[k], patched[k])}
    assert len(changed) == len(sd) // 3 and all(k.endswith(".weight") for k in changed)
    if models.family.denoiser_role != "unet":  # the DiTs' kohya names are ours: check the update itself
        for stem in {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}:
            name = stem[len("lora_unet_"):]
            param = next(k for k in changed if k[: -len(".weight")].replace(".", "_") == name)
            down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
            torch.testing.assert_close(patched[param] - before[param], (ALPHA / RANK) * up @ down,
                                       rtol=1e-4, atol=1e-6)


def test_the_peft_export_is_the_same_update(run):
    """diffstudio reads the peft file as the kohya one; diffusers reads it so too (its own LoRA loader, the
    fused result converted back to our layout). Fused layers (FLUX's qkv, linear1) are split for diffusers."""
    from diffstudio.components import ARCHS

    models, reference = run["models"], run["reference"]
    sd, meta = _load(run["peft"])
    prefix = "unet." if models.family.denoiser_role == "unet" else "transformer."
    assert meta["diffstudio.lora_format"] == "peft" and all(k.startswith(prefix) for k in sd)
    ours = {}
    for fmt in ("kohya", "peft"):
        ours[fmt], handle = _apply(models, run[fmt])
        handle.remove()
    for k in ours["kohya"]:
        torch.testing.assert_close(ours["peft"][k], ours["kohya"][k], rtol=1e-5, atol=1e-6)
    if reference is None:
        return
    theirs = copy.deepcopy(reference)
    theirs.load_lora_adapter(sd, prefix=prefix[:-1], adapter_name="trained")
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora()
    arch = ARCHS[models.family.role(models.family.denoiser_role).arch]
    converted = arch.to_canonical(theirs.state_dict())
    changed = [k for k in ours["kohya"] if not torch.equal(ours["kohya"][k], run["before"]["state"][k])]
    assert changed
    for k in changed:
        torch.testing.assert_close(converted[k], ours["kohya"][k], rtol=1e-5, atol=1e-6)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)]


def test_training_feeds_the_network_what_the_sampler_feeds_it(run, tmp_path, dataset, monkeypatch):
    """At the noise level of a training step, the sampler's denoiser (pipeline/denoiser.py) must call the
    network with the same input and timestep as the trainer: the flow time scale (SD3: 1000 s, FLUX: s), the
    discrete schedule (Kolors: 1100 steps), the family's call (FLUX's packing, Hunyuan's channel cut)."""
    import diffstudio.train.objectives as objectives
    from diffstudio.pipeline.denoiser import make_denoiser

    models = run["models"]
    seen, captured = [], {}
    hook = models.denoiser.register_forward_pre_hook(lambda m, args, kwargs: seen.append(_tensors(args, kwargs)),
                                                     with_kwargs=True)
    real = objectives.diffusion_loss

    def spy(family, net, x0, cond, gen, **kw):
        state = gen.get_state()
        captured.update(x0=x0.clone(), cond=cond, noise=torch.randn(x0.shape, generator=gen))  # its first draw
        gen.set_state(state)

        def net_spy(x, t, **c):
            captured.update(x_t=x.clone())
            return net(x, t, **c)

        return real(family, net_spy, x0, cond, gen, **kw)

    monkeypatch.setattr(objectives, "diffusion_loss", spy)
    try:
        train_lora(_config(dataset, tmp_path / "one.safetensors", tmp_path / "run", steps=1), models=models)
    finally:
        hook.remove()
    trained = seen[0]
    # The noise level of that step: x_t = alpha x0 + beta noise, solved by least squares.
    x0, noise, x_t = captured["x0"].double(), captured["noise"].double(), captured["x_t"].double()
    basis = torch.stack([x0.flatten(), noise.flatten()], dim=1)
    alpha, beta = torch.linalg.lstsq(basis, x_t.flatten()[:, None]).solution.flatten().tolist()
    assert (basis @ torch.tensor([[alpha], [beta]], dtype=torch.float64) - x_t.flatten()[:, None]).abs().max() < 1e-4
    denoiser = make_denoiser(models, tuple(x0.shape[-2:]))
    sigma = beta if denoiser.kind == "flow" else beta / alpha  # flow: x = (1 - s) x0 + s n; else x0 + sigma n
    x = denoiser.noise_scaling(torch.tensor(sigma), captured["noise"], captured["x0"])
    seen.clear()
    hook = models.denoiser.register_forward_pre_hook(lambda m, args, kwargs: seen.append(_tensors(args, kwargs)),
                                                     with_kwargs=True)
    try:
        with torch.no_grad():
            denoiser(x, torch.tensor([sigma]), **captured["cond"])
    finally:
        hook.remove()
    sampled = seen[0]
    assert len(sampled) == len(trained)
    for a, b in zip(sampled, trained):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)


# --- gradient checkpointing ---------------------------------------------------------------------------

BLOCK = re.compile(r"input_blocks\.1|joint_blocks\.0|double_blocks\.0|blocks\.0")  # one block per denoiser


def _lora_grads(models, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of every adapter weight after one training loss (fixed noise), and how often a block ran."""
    from diffstudio.train.lora import inject_lora, remove_lora, target_modules
    from diffstudio.train.objectives import diffusion_loss

    family, denoiser = models.family, models.denoiser
    inject_lora(denoiser, target_modules(denoiser, family.lora_targets), RANK, ALPHA, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, p in denoiser.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A without a gradient
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    block = next(m for n, m in denoiser.named_modules() if BLOCK.fullmatch(n))
    calls = []
    # A pre-hook: the recomputation stops once it has every saved tensor, before a forward hook would run.
    hook = block.register_forward_pre_hook(lambda *_: calls.append(1))
    denoiser.gradient_checkpointing = checkpointing
    try:
        with torch.no_grad():
            cond = family.make_conditioning(models, ["a red circle"], width=64, height=64, guidance=None,
                                            clip_skip=family.text_encoders[0].default_clip_skip)
        x0 = torch.randn(1, family.latent.channels, 8, 8, generator=g)
        call = family.call_denoiser or (lambda net, x, t, c: net(x, t, **c))
        loss = diffusion_loss(family, lambda x, t, **c: call(denoiser, x, t, c), x0, cond,
                              torch.Generator().manual_seed(2))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    finally:
        hook.remove()
        denoiser.gradient_checkpointing = False
        remove_lora(denoiser)
    return grads, len(calls)


@pytest.mark.parametrize("case", ["sd15", "sd3", "flux", "hunyuan_dit"])
def test_gradient_checkpointing_gives_the_same_gradients(case, built):
    models = diffstudio.load(built(case)[0])  # fp32
    plain, plain_calls = _lora_grads(models, checkpointing=False)
    checked, checked_calls = _lora_grads(models, checkpointing=True)
    assert plain_calls == 1 and checked_calls == 2, "the block was not recomputed in the backward pass"
    assert plain.keys() == checked.keys() and plain
    assert all(g.abs().max() > 0 for g in plain.values())  # every adapter weight takes part
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def flux_models(built):
    return diffstudio.load(built("flux")[0])


def test_train_lora_with_gradient_checkpointing_trains_the_same_adapters(flux_models, tmp_path, dataset):
    models = flux_models
    files = {gc: train_lora(_config(dataset, tmp_path / f"{gc}.safetensors", tmp_path / f"run{gc}",
                                    gradient_checkpointing=gc), models=models) for gc in (False, True)}
    assert models.denoiser.gradient_checkpointing is False  # put back as it was
    a, _ = _load(files[False])
    b, _ = _load(files[True])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_on_a_denoiser_without_the_switch_is_a_named_error(flux_models, tmp_path, dataset):
    from diffstudio.errors import InvalidInputError

    denoiser = flux_models.denoiser
    types = {n: type(m) for n, m in denoiser.named_modules()}
    del denoiser.gradient_checkpointing
    try:
        with pytest.raises(InvalidInputError, match="gradient checkpointing"):
            train_lora(_config(dataset, tmp_path / "x.safetensors", tmp_path / "run", gradient_checkpointing=True),
                       models=flux_models)
        assert {n: type(m) for n, m in denoiser.named_modules()} == types  # no adapter left behind
    finally:
        denoiser.gradient_checkpointing = False


def test_snr_gamma_on_a_flow_family_is_a_named_error(flux_models, tmp_path, dataset):
    from diffstudio.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="flow matching"):
        train_lora(_config(dataset, tmp_path / "x.safetensors", tmp_path / "run", snr_gamma=5.0), models=flux_models)
    assert not (tmp_path / "run").exists()  # refused before any work
