"""ControlNet training: the ControlNet starts as the base UNet's encoder and adds nothing, only it learns, a killed
run resumes exactly, a run on other control images is refused, and the file loads back through add_controlnet
(SD 1.x and SDXL, the latter with its vector input y)."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import diffstudio
from diffstudio.errors import InvalidInputError, ModelNotFoundError, StaleRunError
from diffstudio.train.controlnet import ControlNetTrainConfig, controlnet_from_unet, train_controlnet
from tests import tiny_sd15, tiny_sdxl

HINT_WIDTHS = [8, 16, 16, 32]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet, vae, text = tiny_sd15.reference_models()
    return tiny_sd15.write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", unet, vae, text)


@pytest.fixture(scope="module")
def models(base):
    return diffstudio.load(str(base))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffstudio.demo.controlnet_build import write_control_dataset

    return write_control_dataset(tmp_path_factory.mktemp("control_data"), 4, progress=False)


def _config(data, out, **kw) -> ControlNetTrainConfig:
    kw = {"steps": 4, "lr": 1e-3, "batch_size": 2, "resolution": 64, "checkpoint_every": 2,
          "hint_block_channels": HINT_WIDTHS, **kw}
    return ControlNetTrainConfig(data=str(data), out=str(out), **kw)


def _inputs(models, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 5, models.unet.config.context_dim, generator=g)
    return x, hint, t, context


# --- the initialisation -----------------------------------------------------------------------------------------


def test_an_initialised_controlnet_adds_nothing_so_the_unet_gives_its_own_output(models):
    controlnet = controlnet_from_unet(models.unet, HINT_WIDTHS)
    x, hint, t, context = _inputs(models)
    with torch.no_grad():
        residuals = controlnet(x, hint, t, context)
        plain = models.unet(x, t, context)
        controlled = models.unet(x, t, context, control=residuals)
    assert len(residuals) == len(models.unet.input_blocks) + 1
    assert all(torch.count_nonzero(r) == 0 for r in residuals)
    assert torch.equal(controlled, plain)


def test_the_initialised_encoder_computes_the_unets_encoder_features(models):
    """With identity zero convs, the residuals are the UNet's own skip activations and middle output (read from
    the UNet by forward hooks): the encoder, middle block and embeddings were copied, and the hint enters as 0."""
    controlnet = controlnet_from_unet(models.unet, HINT_WIDTHS)
    with torch.no_grad():
        for conv in [zc[0] for zc in controlnet.zero_convs] + [controlnet.middle_block_out[0]]:
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    seen = []
    hooks = [block.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
             for block in [*models.unet.input_blocks, models.unet.middle_block]]
    x, hint, t, context = _inputs(models, seed=1)
    try:
        with torch.no_grad():
            models.unet(x, t, context)
            residuals = controlnet(x, hint, t, context)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(residuals)
    for mine, theirs in zip(residuals, seen):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_the_hint_encoder_draws_its_weights_from_the_seed(models):
    a, b, c = (controlnet_from_unet(models.unet, HINT_WIDTHS, seed) for seed in (0, 0, 1))
    first = "input_hint_block.0.weight"
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])


# --- training -----------------------------------------------------------------------------------------------------


def test_training_changes_the_controlnet_only_and_leaves_the_base_as_it_was(models, data, tmp_path):
    before = {role: {k: v.clone() for k, v in module.state_dict().items()}
              for role, module in models.components.items() if isinstance(module, torch.nn.Module)}
    flags = {name: p.requires_grad for name, p in models.unet.named_parameters()}
    out = train_controlnet(_config(data, tmp_path / "cn.safetensors"), models)
    for role, state in before.items():
        after = models.components[role].state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), f"training changed the {role}"
    assert flags == {name: p.requires_grad for name, p in models.unet.named_parameters()}
    trained = load_file(str(out))
    start = controlnet_from_unet(models.unet, HINT_WIDTHS).state_dict()
    assert trained.keys() == start.keys()
    moved = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert {k for k in moved if k.startswith(("zero_convs.", "middle_block_out."))}, "the zero convs did not learn"
    assert {k for k in moved if k.startswith("input_blocks.")}, "the copied encoder did not learn"


def test_an_interrupted_run_resumes_exactly(models, data, tmp_path):
    whole = train_controlnet(_config(data, tmp_path / "a.safetensors", workdir=str(tmp_path / "ra")), models)
    cfg = _config(data, tmp_path / "b.safetensors", workdir=str(tmp_path / "rb"))
    assert train_controlnet(cfg, models, stop_after=2) is None  # killed after 2 of 4 steps
    assert not (tmp_path / "b.safetensors").exists()
    resumed = train_controlnet(cfg, models)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_on_other_control_images_is_refused(models, data, tmp_path):
    from PIL import Image

    out = tmp_path / "cn.safetensors"
    train_controlnet(_config(data, out, steps=2), models, stop_after=1)
    other = tmp_path / "other"
    other.mkdir()
    rows = list(csv.DictReader((data / "metadata.csv").open(encoding="utf-8")))
    for row in rows:  # the same images and captions, every control image flipped
        for column in ("file_name", "conditioning_image"):
            target = other / row[column]
            target.parent.mkdir(exist_ok=True)
            image = Image.open(data / row[column])
            (image.transpose(Image.FLIP_LEFT_RIGHT) if column == "conditioning_image" else image).save(target)
    with (other / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "conditioning_image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(StaleRunError, match="control images sha256"):
        train_controlnet(_config(other, out, steps=2, workdir=str(out) + ".run"), models)


def test_the_file_loads_back_through_add_controlnet_and_computes_the_trained_residuals(models, data, tmp_path):
    from diffstudio.detect import stored_configs
    from diffstudio.io.state_dict import read_file_metadata

    config = _config(data, tmp_path / "cn.safetensors", steps=2)
    out = train_controlnet(config, models)
    assert stored_configs(read_file_metadata(out))["controlnet"]["hint_block_channels"] == HINT_WIDTHS
    loaded = models.add_controlnet(out)
    reference = controlnet_from_unet(models.unet, HINT_WIDTHS)  # the checkpoint's weights, in a fresh model
    state = torch.load(config.work_path() / "checkpoint" / "state.pt", weights_only=True)["model"]
    reference.load_state_dict(state)
    x, hint, t, context = _inputs(models, seed=3)
    with torch.no_grad():
        for mine, theirs in zip(loaded(x, hint, t, context), reference(x, hint, t, context)):
            assert torch.equal(mine, theirs)
    half = train_controlnet(_config(data, tmp_path / "half.safetensors", steps=2, save_dtype="fp16",
                                    workdir=str(config.work_path())), models)  # a finished run: only written again
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert models.add_controlnet(half).config.hint_block_channels == HINT_WIDTHS


def test_an_sdxl_controlnet_takes_the_unets_vector_input(data, tmp_path):
    folder = tiny_sdxl.write_diffusers_folder(tmp_path / "xl", tiny_sdxl.reference_models())
    xl = diffstudio.load(str(folder))
    out = train_controlnet(_config(data, tmp_path / "xl.safetensors", steps=2), xl)
    controlnet = xl.add_controlnet(out)
    assert controlnet.config.adm_in_channels == xl.unet.config.adm_in_channels
    start = controlnet_from_unet(xl.unet, HINT_WIDTHS).state_dict()
    assert torch.equal(start["label_emb.0.0.weight"], xl.unet.state_dict()["label_emb.0.0.weight"])
    images = diffstudio.Pipeline(xl)("a red shape", width=64, height=64, steps=2, seed=0, progress=False,
                                     controlnets=[_unit(controlnet, data)])
    assert images[0].size == (64, 64)


def _unit(controlnet, data):
    from diffstudio.pipeline.control import ControlNetUnit

    return ControlNetUnit(controlnet, data / "outlines" / "00000.png")


# --- what the trainer refuses --------------------------------------------------------------------------------------


def test_a_folder_without_the_control_column_is_a_named_error(models, data, tmp_path):
    folder = tmp_path / "captions_only"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file_name,text\nimages/00000.png,a red shape\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="conditioning_image"):
        train_controlnet(_config(folder, tmp_path / "x.safetensors"), models)
    (folder / "metadata.csv").write_text("file_name,conditioning_image,text\na.png,b.png,x\n", encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="missing"):
        train_controlnet(_config(folder, tmp_path / "x.safetensors"), models)
    with pytest.raises(InvalidInputError, match="needs 4 stage widths"):
        train_controlnet(_config(data, tmp_path / "x.safetensors", hint_block_channels=[8, 16]), models)
    with pytest.raises(InvalidInputError, match="save_dtype"):
        train_controlnet(_config(data, tmp_path / "x.safetensors", save_dtype="int8"), models)
