"""The training loop: exact resume after an interruption, named failure on NaN, folder captions."""

from __future__ import annotations

import pytest
import torch

from diffstudio.train.data import batch_indices, read_captions
from diffstudio.train.loop import step_generator, train


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    data_x = torch.randn(64, 4)
    data_y = data_x.sum(dim=1, keepdim=True).sin()

    def loss_fn(net, step):
        idx = batch_indices(64, 8, step, seed=3)
        noise = torch.randn(8, 1, generator=step_generator(3, step)) * 0.01
        return torch.nn.functional.mse_loss(net(data_x[idx]), data_y[idx] + noise)

    return model, loss_fn


@pytest.mark.parametrize("lr_end", [None, 1e-3])
def test_interrupted_and_resumed_run_follows_the_same_loss_curve(tmp_path, lr_end):
    kw = dict(steps=12, lr=1e-2, lr_end=lr_end, warmup=4, progress=False)
    model, loss_fn = _problem()
    straight = train(model, loss_fn, out_dir=tmp_path / "a", **kw)
    model_b, loss_fn_b = _problem()
    first = train(model_b, loss_fn_b, out_dir=tmp_path / "b", stop_after=5, **kw)
    assert len(first) == 5
    model_c, loss_fn_c = _problem()  # a fresh process: new model object, state from the checkpoint
    resumed = train(model_c, loss_fn_c, out_dir=tmp_path / "b", **kw)
    assert resumed == pytest.approx(straight, rel=1e-6)
    for p, q in zip(model.parameters(), model_c.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"])
def test_the_loop_follows_plain_adamw(tmp_path, optimizer):
    """Reference: torch's per-tensor AdamW on the same batches, written out without the loop (clipping at
    norm 1 as the loop does). "adamw" repeats it bit for bit; torch's fused kernel to the last bit."""
    model, loss_fn = _problem()
    reference = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    expected = []
    for step in range(10):
        loss = loss_fn(reference, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        expected.append(float(loss.detach()))
    losses = train(model, loss_fn, steps=10, lr=1e-3, weight_decay=0.01, out_dir=tmp_path, optimizer=optimizer,
                   progress=False)
    exact = optimizer == "adamw"
    assert losses == (expected if exact else pytest.approx(expected, rel=1e-5))
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert losses[-1] < losses[0]


def test_learning_rate_warms_up_then_anneals_to_lr_end():
    from diffstudio.train.loop import lr_factor

    lrs = [1e-2 * lr_factor(s, 12, 4, 1e-2, 1e-3) for s in range(12)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # linear warm-up
    assert lrs[4] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)  # half cosine to lr_end
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert [lr_factor(s, 12, 4, 1e-2, None) for s in range(4, 12)] == [1.0] * 8  # constant without lr_end


def test_a_nan_loss_stops_with_a_named_error_and_keeps_the_checkpoint(tmp_path):
    from diffstudio.errors import NaNError

    model, loss_fn = _problem()
    train(model, loss_fn, steps=4, out_dir=tmp_path, lr=1e-2, progress=False)
    with pytest.raises(NaNError, match="checkpoint"):
        train(model, lambda net, step: loss_fn(net, step) * float("nan"), steps=8, out_dir=tmp_path,
              progress=False)
    assert (tmp_path / "checkpoint" / "state.pt").exists()


def test_batches_are_a_function_of_seed_and_step():
    assert torch.equal(batch_indices(100, 10, 7, 1), batch_indices(100, 10, 7, 1))
    epoch = torch.cat([batch_indices(100, 10, s, 1) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch sees every sample once


def test_captions_from_metadata_csv_or_txt_files(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "metadata.csv").write_text("file_name,text\nx.png,a red circle\n")
    assert read_captions(tmp_path / "a")[0][1] == "a red circle"
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "y.png")
    (tmp_path / "b" / "y.txt").write_text("a blue star\n")
    assert read_captions(tmp_path / "b")[0][1] == "a blue star"


def _counting(loss_fn):
    calls = []

    def counted(net, step):
        calls.append(step)
        return loss_fn(net, step)

    return counted, calls


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(tmp_path):
    kw = dict(steps=12, lr=1e-2, warmup=4, progress=False, checkpoint_every=4)
    model, loss_fn = _problem()
    straight = train(model, loss_fn, out_dir=tmp_path / "a", **kw)
    model_b, loss_fn_b = _problem()
    train(model_b, loss_fn_b, out_dir=tmp_path / "b", stop_after=8, **kw)
    # killed after `checkpoint` became `checkpoint.old` and before `checkpoint.tmp` became `checkpoint`
    (tmp_path / "b" / "checkpoint").rename(tmp_path / "b" / "checkpoint.old")
    (tmp_path / "b" / "checkpoint.tmp").mkdir()
    (tmp_path / "b" / "checkpoint.tmp" / "state.pt").write_bytes(b"half a file")
    model_c, loss_fn_c = _problem()
    counted, calls = _counting(loss_fn_c)
    resumed = train(model_c, counted, out_dir=tmp_path / "b", **kw)
    assert calls == list(range(8, 12))  # resumed at step 8, not started over
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint"]


def test_the_recipe_is_kept_with_its_checkpoint_and_discarded_with_it(tmp_path):
    from diffstudio.train.loop import discard_checkpoints, read_checkpoint

    model, loss_fn = _problem()
    assert read_checkpoint(tmp_path) is None
    train(model, loss_fn, steps=4, out_dir=tmp_path, progress=False, checkpoint_every=2, stop_after=3,
          recipe={"lr": 1e-4, "data": "x"})
    assert read_checkpoint(tmp_path) == (3, {"lr": 1e-4, "data": "x"})
    discard_checkpoints(tmp_path)
    assert read_checkpoint(tmp_path) is None and not list(tmp_path.iterdir())


def test_a_checkpoint_of_another_shape_is_a_short_named_error(tmp_path):
    from diffstudio.errors import CorruptFileError

    model, loss_fn = _problem()
    train(model, loss_fn, steps=2, out_dir=tmp_path, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    for trainable_only in (False, True):
        with pytest.raises(CorruptFileError, match="does not fit") as err:
            train(other, loss_fn, steps=4, out_dir=tmp_path, progress=False, trainable_only=trainable_only)
        assert len(str(err.value)) < 400


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, loss_fn = _problem()
    train(model, loss_fn, steps=2, out_dir=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def disk_full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(model, loss_fn, steps=4, out_dir=tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


def test_the_loop_without_accelerate_names_the_train_extra(tmp_path, monkeypatch):
    import sys

    from diffstudio.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "accelerate", None)
    model, loss_fn = _problem()
    with pytest.raises(MissingExtraError, match=r'pip install "diffstudio\[train\]"'):
        train(model, loss_fn, steps=2, out_dir=tmp_path, progress=False)
