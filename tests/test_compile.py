"""``Models.compile``: torch.compile of the denoiser in place. Dynamo's capture is tested with the ``eager`` backend
(seconds; inductor's code generation takes minutes here and is measured in benchmarks/compile_step.py): the
compiled model gives the plain image, a LoRA applied afterwards still acts, and frozen weights make a LoRA change
compile again; one small inductor compile with frozen weights (our oneDNN linear)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffstudio
from diffstudio.errors import InvalidInputError
from tests.server_fixtures import lora_state_dict

ARGS = dict(steps=2, seed=3, progress=False)


def _image(models) -> np.ndarray:
    return np.asarray(diffstudio.Pipeline(models)("a red circle", **ARGS)[0])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_a_compiled_denoiser_gives_the_plain_image_and_lora_still_acts(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file(lora_state_dict(), str(lora))
    plain_models = diffstudio.load()
    plain = _image(plain_models)
    plain_models.apply_lora(lora, 1.0)
    plain_lora = _image(plain_models)
    assert not np.array_equal(plain, plain_lora)

    models = diffstudio.load().compile(backend="eager")
    assert models.unet._compiled_call_impl is not None
    assert np.array_equal(plain, _image(models))
    models.apply_lora(lora, 1.0)  # the weights are the compiled code's inputs: the LoRA acts
    assert np.array_equal(plain_lora, _image(models))
    assert set(models.unet.state_dict()) == set(plain_models.unet.state_dict())  # names unchanged


def test_frozen_weights_compile_again_when_a_lora_changes_them(tmp_path, monkeypatch):
    lora = tmp_path / "lora.safetensors"
    save_file(lora_state_dict(), str(lora))
    models = diffstudio.load()
    models.unet.frozen_weights = True  # what compile(freeze=True) marks (inductor only: minutes here)
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    handle = models.apply_lora(lora, 1.0)
    _image(models)
    assert resets
    resets.clear()
    handle.remove()
    _image(models)
    assert resets


def test_freeze_needs_inductor_and_no_mode():
    models = diffstudio.load()
    with pytest.raises(InvalidInputError, match="inductor"):
        models.compile(backend="eager", freeze=True)
    with pytest.raises(InvalidInputError, match="mode"):
        models.compile(mode="max-autotune", freeze=True)


def test_our_cpu_linear_compiles_with_inductor_freezing():
    """Inductor with frozen weights (``compile(freeze=True)``) on layers built from ``cpu_linear.Linear``: the
    traced forward leaves the linear to inductor (a direct oneDNN call fails its freezing pass) and gives the
    eager output. Two small layers: inductor's code generation takes seconds here."""
    from diffstudio.models.cpu_linear import Linear

    model = torch.nn.Sequential(Linear(512, 1024), torch.nn.GELU(), Linear(1024, 512)).eval()
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, options={"freezing": True})(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
