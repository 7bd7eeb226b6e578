"""FastBlend (diffstudio.video.fastblend) on synthetic videos the tests make.

The scene: a smooth random texture seen through a window that moves by a known, constant number of
pixels per frame (so frame t+1 at q shows what frame t shows at q + motion). The "stylisation" is a
fixed colour transform of the guide; the flickering input adds a random colour gain and offset per
frame and pixel noise. Small sizes keep the whole file to a few tens of seconds on a shared CPU.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from diffstudio.errors import InvalidSizeError
from diffstudio.video import video_io
from diffstudio.video.fastblend import blend, cli, interpolate, iter_blend, remap, tree
from diffstudio.video.fastblend.frames import ArrayFrames, DiskFrames, FrameCache, as_unit_float
from diffstudio.video.fastblend.modes import blend_accurate, blend_balanced, blend_fast
from diffstudio.video.fastblend.patch_match import MatchConfig, PatchMatcher
from diffstudio.video.fastblend.remapper import PatchMatchRemapper

MOTION = (1, 2)  # rows, columns per frame
MARGIN = 8  # pixels near the border (content entering the view) are left out of the measures


def texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tex = gaussian_filter(rng.random((height, width, 3)), sigma=(1.5, 1.5, 0))
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    return (tex * 255).round().astype(np.uint8)


def stylise(guide: np.ndarray) -> np.ndarray:
    """A consistent stylisation: inverted, channels rotated, contrast lowered."""
    return np.clip(0.8 * (255.0 - guide[..., [2, 0, 1]]) + 30, 0, 255)


def make_scene(frames: int = 10, size: int = 64, seed: int = 0):
    """(guide, clean style, flickering style), each (N, size, size, 3) uint8."""
    my, mx = MOTION
    canvas = texture(size + my * frames + 16, size + mx * frames + 16, seed)
    crops = [canvas[8 + t * my:8 + t * my + size, 8 + t * mx:8 + t * mx + size] for t in range(frames)]
    guide = np.stack(crops)
    clean = stylise(guide.astype(np.float64))
    rng = np.random.default_rng(seed + 1)
    gain = 1 + rng.uniform(-0.08, 0.08, (frames, 1, 1, 3))
    offset = rng.uniform(-15, 15, (frames, 1, 1, 3))
    noisy = clean * gain + offset + rng.normal(0, 6, clean.shape)
    return guide, clean.round().astype(np.uint8), np.clip(noisy, 0, 255).round().astype(np.uint8)


def flicker(frames: np.ndarray) -> float:
    """Mean squared change between consecutive frames after undoing the known motion."""
    my, mx = MOTION
    f = frames.astype(np.float64)
    _, h, w, _ = f.shape
    m = MARGIN
    now = f[1:, m:h - m, m:w - m]
    before = f[:-1, m + my:h - m + my, m + mx:w - m + mx]
    return float(((now - before) ** 2).mean())


def psnr(a: np.ndarray, b: np.ndarray, margin: int = MARGIN) -> float:
    a = a[:, margin:a.shape[1] - margin, margin:a.shape[2] - margin].astype(np.float64)
    b = b[:, margin:b.shape[1] - margin, margin:b.shape[2] - margin].astype(np.float64)
    return float(10 * np.log10(255.0 ** 2 / max(((a - b) ** 2).mean(), 1e-12)))


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one torch thread is faster than two, far more so on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def blended(scene):
    guide, _, style = scene
    return {mode: blend(style, guide, mode=mode, window_size=3, batch_size=8) for mode in ("fast", "balanced",
                                                                                            "accurate")}


# -- patch matching and remapping ----------------------------------------------------------------

def test_identity_pair_is_reproduced_exactly():
    guide = texture(48, 56, seed=3)[None]
    style = np.clip(stylise(guide.astype(np.float64)), 0, 255).round().astype(np.uint8)
    remapped, field = PatchMatcher(MatchConfig()).match(as_float(guide), as_float(style), as_float(guide),
                                                        as_float(style), seeds=[7])
    assert torch.equal(field, torch.zeros_like(field))
    assert torch.equal(remapped, as_float(style))


@pytest.mark.parametrize("shift", [(3, -5), (-6, 2)])
def test_translated_texture_is_matched(shift):
    dy, dx = shift
    size, pad = 96, 16
    canvas = texture(size + 2 * pad, size + 2 * pad, seed=5)
    source = canvas[pad:pad + size, pad:pad + size]
    target = canvas[pad - dy:pad - dy + size, pad - dx:pad - dx + size]  # target(q) = source(q - shift)
    style = lambda g: np.clip(stylise(g.astype(np.float64)), 0, 255).round().astype(np.uint8)  # noqa: E731
    remapped, field = PatchMatcher(MatchConfig()).match(
        as_float(source[None]), as_float(style(source)[None]), as_float(target[None]),
        as_float(style(target)[None]), seeds=[1])
    inner = field[0, :, MARGIN:-MARGIN, MARGIN:-MARGIN]
    exact = ((inner[0] == -dy) & (inner[1] == -dx)).float().mean().item()
    assert exact >= 0.95
    # With the right matches, the voting remap rebuilds the target's style inside.
    error = (remapped - as_float(style(target)[None])).abs()[..., MARGIN:-MARGIN, MARGIN:-MARGIN]
    assert error.mean().item() < 1 / 255


def test_voting_remap_of_a_translation_field_shifts_the_image():
    image = as_float(texture(20, 24, seed=9)[None])
    coords = torch.stack(torch.meshgrid(torch.arange(20), torch.arange(24), indexing="ij")).int()[None]
    coords = (coords + torch.tensor([2, -3], dtype=torch.int32).view(1, 2, 1, 1))
    coords[:, 0].clamp_(0, 19)
    coords[:, 1].clamp_(0, 23)
    out = remap(image, coords, patch_size=5)
    # Inside, every vote agrees: out(q) = image(q + (2, -3)).
    assert torch.equal(out[..., 4:14, 7:20], image[..., 6:16, 4:17])


# -- the blending modes' bookkeeping, with an oracle remap ----------------------------------------

class IdentityRemapper:
    """An oracle for a static scene: every frame already lines up with every other."""

    def __init__(self):
        self.pair_count = 0

    def pairs(self, src_guide, src_style, tgt_guide, tgt_style, keys, tracks=None):
        self.pair_count += src_style.shape[0]
        return as_unit_float(src_style).clone()

    def consensus(self, src_guide, src_style, tgt_guide, tgt_style, keys, tracks=None):
        total = as_unit_float(tgt_style) + as_unit_float(src_style).sum(0, keepdim=True)
        return total / (src_style.shape[0] + 1)


def box_filter(frames: np.ndarray, window: int) -> np.ndarray:
    out = np.empty(frames.shape, dtype=np.float64)
    for j in range(len(frames)):
        out[j] = frames[max(0, j - window):j + window + 1].astype(np.float64).mean(0)
    return out


def run_mode(mode, frames, window, remapper, batch_size=4, **kwargs):
    cache = FrameCache(ArrayFrames(frames), frames.shape[1:3], torch.device("cpu"), "style")
    if mode == "fast":
        outputs = blend_fast(cache, cache, remapper, window, batch_size, **kwargs)
    elif mode == "balanced":
        outputs = blend_balanced(cache, cache, remapper, window, batch_size)
    else:
        outputs = blend_accurate(cache, cache, remapper, window)
    indices, images = zip(*outputs)
    assert list(indices) == list(range(len(frames)))  # streamed in frame order
    return np.stack([image.permute(1, 2, 0).double().numpy() * 255 for image in images])


@pytest.mark.parametrize("window", [0, 1, 3, 6, 15])
def test_fast_mode_with_oracle_remap_is_a_box_filter(window):
    rng = np.random.default_rng(window)
    frames = rng.integers(0, 256, (37, 3, 5, 3), dtype=np.uint8)  # frames very unlike each other
    expected = box_filter(frames, window)
    exact = run_mode("fast", frames, window, IdentityRemapper(), block_dtype=torch.float32)
    np.testing.assert_allclose(exact, expected, atol=1e-3)
    stored_8bit = run_mode("fast", frames, window, IdentityRemapper())  # the default block storage
    np.testing.assert_allclose(stored_8bit, expected, atol=2.0)


def test_fast_mode_needs_n_log_n_remaps():
    frames = np.zeros((64, 2, 2, 3), dtype=np.uint8)
    fast, balanced = IdentityRemapper(), IdentityRemapper()
    run_mode("fast", frames, 15, fast, batch_size=8)
    run_mode("balanced", frames, 15, balanced, batch_size=8)
    assert balanced.pair_count == sum(min(63, j + 15) - max(0, j - 15) for j in range(64))
    assert fast.pair_count < balanced.pair_count / 2.5


@pytest.mark.parametrize("mode", ["balanced", "accurate"])
def test_balanced_and_accurate_with_oracle_remap_are_box_filters(mode):
    frames = np.random.default_rng(1).integers(0, 256, (11, 3, 4, 3), dtype=np.uint8)
    out = run_mode(mode, frames, 2, IdentityRemapper())
    np.testing.assert_allclose(out, box_filter(frames, 2), atol=1e-3)


def test_aligned_blocks_tile_every_run_exactly():
    for start in range(0, 40):
        for stop in range(start, 72):
            blocks = tree.aligned_blocks(start, stop)
            covered = [f for level, index in blocks for f in range(*tree.block_span(level, index))]
            assert covered == list(range(start, stop))
            assert len(blocks) <= 2 * max(1, (stop - start).bit_length())


# -- deflickering the synthetic video -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "balanced", "accurate"])
def test_blending_removes_flicker(scene, blended, mode):
    _, clean, style = scene
    out = blended[mode]
    assert out.shape == style.shape and out.dtype == np.uint8
    assert flicker(out) <= flicker(style) / 10
    assert psnr(out, clean) >= psnr(style, clean) + 2


def test_fast_mode_agrees_with_balanced(blended):
    assert psnr(blended["fast"], blended["balanced"], margin=0) >= 35


def test_same_seed_same_output(scene, blended):
    guide, _, style = scene
    again = blend(list(style), list(guide), mode="fast", window_size=3, batch_size=3, seed=0)
    assert np.array_equal(again, blended["fast"])  # also independent of the batch size


def test_tracking_keeps_quality(scene, blended):
    guide, clean, style = scene
    out = blend(style[:6], guide[:6], mode="balanced", window_size=2, tracking_window_size=1)
    assert psnr(out, clean[:6]) >= psnr(style[:6], clean[:6]) + 2


def test_frames_from_disk_stream_the_same(tmp_path, scene):
    guide, _, style = scene
    with DiskFrames.spill(iter(guide[:4]), str(tmp_path)) as guides, \
            DiskFrames.spill(iter(style[:4]), str(tmp_path)) as styles:
        assert np.array_equal(guides[3], guide[3])
        streamed = np.stack(list(iter_blend(styles, guides, mode="fast", window_size=2, num_iter=2)))
    assert np.array_equal(streamed, blend(style[:4], guide[:4], mode="fast", window_size=2, num_iter=2))
    assert not list(tmp_path.iterdir())  # the spill files are gone


# -- interpolation ------------------------------------------------------------------------------

def test_interpolation_reproduces_keyframes_and_weights_by_distance(scene):
    guide, _, _ = scene
    guide = guide[:7]
    a = np.full((64, 64, 3), (200, 40, 10), dtype=np.uint8)
    b = np.full((64, 64, 3), (20, 100, 250), dtype=np.uint8)
    key = scene[2][3]  # a textured keyframe is reproduced exactly too
    out = interpolate({0: a, 3: key, 6: b}, guide, num_iter=2)
    assert np.array_equal(out[0], a) and np.array_equal(out[3], key) and np.array_equal(out[6], b)
    flat = interpolate({0: a, 6: b}, guide, num_iter=2)
    for j in range(7):  # a flat keyframe remaps to itself, so frame j is the distance-weighted mix
        expected = (a.astype(np.float64) * (6 - j) + b.astype(np.float64) * j) / 6
        assert np.abs(flat[j] - expected).max() <= 1.0
    nearest = interpolate({0: a, 6: b}, guide, num_iter=2, single_keyframe=True)
    assert all(np.array_equal(nearest[j], a) for j in range(4))
    assert all(np.array_equal(nearest[j], b) for j in range(4, 7))


@pytest.mark.parametrize("key_indices", [(0, 15), (0, 7, 15)])
@pytest.mark.parametrize("as_pil", [False, True])
def test_interpolation_over_several_batches(key_indices, as_pil):
    """Videos longer than one batch: the keyframe list must survive every batch."""
    from PIL import Image

    guide = make_scene(frames=16, size=24, seed=4)[0]
    colours = [(200, 40, 10), (20, 100, 250), (90, 220, 60)]
    flat = {k: np.full((24, 24, 3), colour, dtype=np.uint8) for k, colour in zip(key_indices, colours)}
    keys = {k: Image.fromarray(frame) if as_pil else frame for k, frame in flat.items()}
    out = interpolate(keys, guide, batch_size=3, num_iter=1)
    assert out.shape == guide.shape
    for j in range(16):  # a flat keyframe remaps to itself: frame j is the distance-weighted mix
        a = max(k for k in key_indices if k <= j)
        b = min(k for k in key_indices if k >= j)
        t = 0.0 if a == b else (j - a) / (b - a)
        expected = flat[a].astype(np.float64) * (1 - t) + flat[b].astype(np.float64) * t
        assert np.abs(out[j] - expected).max() <= 1.0, j
    # Each pair draws from its own seeded stream, so one batch gives the same frames.
    assert np.array_equal(out, interpolate(keys, guide, batch_size=64, num_iter=1))


def test_interpolation_follows_the_motion(scene):
    guide, clean, _ = scene
    out = interpolate({0: clean[0], 6: clean[6]}, guide[:7], num_iter=3)
    assert psnr(out[1:6], clean[1:6]) >= 30


# -- errors -------------------------------------------------------------------------------------

def test_errors_name_the_problem(scene):
    guide, _, style = scene
    with pytest.raises(InvalidSizeError, match="style frames"):
        blend(style[:3], guide[:4])
    with pytest.raises(InvalidSizeError, match="style frames"):
        iter_blend(style[:3], guide[:4])  # checked when called, not at the first frame
    with pytest.raises(InvalidSizeError, match="resize"):
        blend(style[:3, :32], guide[:3])
    with pytest.raises(ValueError, match="mode"):
        blend(style[:3], guide[:3], mode="quick")
    with pytest.raises(InvalidSizeError, match="patch"):
        blend(style[:2, :4, :4], guide[:2, :4, :4])
    with pytest.raises(InvalidSizeError, match="outside"):
        interpolate({9: style[0]}, guide[:3])
    with pytest.raises(ValueError, match="odd"):
        blend(style[:2], guide[:2], minimum_patch_size=4)


@pytest.fixture
def cli_inputs(tmp_path, monkeypatch):
    """A 5-frame guide and style video as frame folders, a keyframe folder; no decoding allowed."""
    from PIL import Image

    guide, _, style = make_scene(frames=5, size=24)
    video_io.write_frames(str(tmp_path / "guide"), guide)
    video_io.write_frames(str(tmp_path / "style"), style)
    (tmp_path / "keys").mkdir()
    Image.fromarray(style[0]).save(tmp_path / "keys" / "00000.png")

    def no_work(*args, **kwargs):
        raise AssertionError("a video was decoded before the arguments were checked")

    monkeypatch.setattr(DiskFrames, "spill", no_work)
    return tmp_path


CLI_MISTAKES = [  # (arguments replacing the defaults, error class, words the message must hold)
    (["--guide", "{tmp}/missing.mp4"], "InputFileNotFoundError", "guide video"),
    (["--style", "{tmp}/missing"], "InputFileNotFoundError", "style video"),
    (["--guide", "{tmp}/keys/00000.png"], "UnsupportedFormatError", "guide video"),
    (["--keyframes", "{tmp}/nokeys"], "InputFileNotFoundError", "keyframe folder"),
    (["--keyframes", "{tmp}/keys", "--name-key", "style.png"], "InvalidInputError", "00042.png"),
    (["--keyframes", "{tmp}/keys", "--name-key", "key_0.png"], "InvalidInputError", "both name frame 0"),
    (["--window-size", "-1"], "InvalidInputError", "window_size"),
    (["--minimum-patch-size", "4"], "InvalidInputError", "odd"),
    (["--batch-size", "0"], "InvalidInputError", "batch_size"),
    (["--num-iter", "0"], "InvalidInputError", "num_iter"),
    (["--guide-weight", "-1"], "InvalidInputError", "guide_weight"),
    (["--tracking-window-size", "-2"], "InvalidInputError", "tracking_window_size"),
    (["--device", "nodevice"], "InvalidInputError", "device"),
    (["--fps", "0"], "InvalidInputError", "fps"),
    (["--crf", "99"], "InvalidInputError", "crf"),
    (["--tmp-dir", "{tmp}/noscratch"], "InputFileNotFoundError", "tmp-dir"),
    (["-o", "{tmp}/out.avi"], "UnsupportedFormatError", ".mp4"),
    (["-o", "{tmp}/guide.mp4"], "InvalidInputError", "is a folder"),
    (["-o", "{tmp}/keys/00000.png"], "InvalidInputError", "is a file"),
    (["-o", "{tmp}"], "InvalidInputError", "holds more than frames"),
]


@pytest.mark.parametrize("changes, error, words", CLI_MISTAKES, ids=[c[2] + ":" + c[0][-1] for c in CLI_MISTAKES])
def test_cli_names_user_mistakes_before_any_work(cli_inputs, capsys, changes, error, words):
    from PIL import Image

    from diffstudio.cli import main

    tmp = str(cli_inputs)
    (cli_inputs / "guide.mp4").mkdir()
    options = {"--guide": f"{tmp}/guide", "--style": f"{tmp}/style", "-o": f"{tmp}/out.mp4"}
    changes = [arg.format(tmp=tmp) for arg in changes]
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag == "--name-key":  # a second keyframe file with this name
            Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(cli_inputs / "keys" / value)
            continue
        options[flag] = value
    if "--keyframes" in options:
        del options["--style"]
    argv = ["fastblend", *[part for item in options.items() for part in item], "--quiet"]
    before = sorted(p.name for p in cli_inputs.iterdir())
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: {error}: ") and words in message, message
    assert sorted(p.name for p in cli_inputs.iterdir()) == before  # nothing written
    assert cli.main(argv[1:]) == 2  # the standalone entry point answers the same way
    assert capsys.readouterr().err == message


def test_cli_names_mistakes_found_in_the_frames(tmp_path, capsys):
    """Keyframe numbers past the video's end and mismatched sizes show up once frames are read."""
    from diffstudio.cli import main

    guide, _, style = make_scene(frames=5, size=24)
    video_io.write_frames(str(tmp_path / "guide"), guide)
    video_io.write_frames(str(tmp_path / "style"), style[:, :16])
    video_io.write_frames(str(tmp_path / "keys"), style[:1])
    (tmp_path / "keys" / "00000.png").rename(tmp_path / "keys" / "00009.png")
    assert main(["fastblend", "--guide", str(tmp_path / "guide"), "--keyframes", str(tmp_path / "keys"),
                 "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "InvalidSizeError" in capsys.readouterr().err
    assert main(["fastblend", "--guide", str(tmp_path / "guide"), "--style", str(tmp_path / "style"),
                 "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "resize" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guide", "keys", "style"]


# -- video files and the command line -----------------------------------------------------------

def test_video_io_round_trip(tmp_path, scene):
    guide = scene[0][:4]
    folder = tmp_path / "frames"
    assert video_io.write_frames(str(folder), guide) == 4
    assert np.array_equal(np.stack(video_io.read_frames(str(folder))), guide)
    path = str(tmp_path / "clip.mp4")
    video_io.write_frames(path, guide, fps=12, crf=0)
    back = np.stack(video_io.read_frames(path))
    assert back.shape == guide.shape
    assert np.abs(back.astype(int) - guide).mean() < 10  # 4:2:0 chroma loses some colour detail
    assert video_io.video_fps(path) == pytest.approx(12)
    assert video_io.frame_index("key_0042.png") == 42


def test_cli_blends_and_interpolates(tmp_path, scene):
    guide, _, style = scene
    video_io.write_frames(str(tmp_path / "guide"), guide[:5])
    video_io.write_frames(str(tmp_path / "style"), style[:5])
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fastblend", "--guide", str(tmp_path / "guide"), "--style",
                              str(tmp_path / "style"), "-o", str(tmp_path / "out"), "--window-size", "2",
                              "--num-iter", "2", "--quiet"])
    assert args.func(args) == 0
    out = np.stack(video_io.read_frames(str(tmp_path / "out")))
    assert np.array_equal(out, blend(style[:5], guide[:5], window_size=2, num_iter=2))
    keys = tmp_path / "keys"
    keys.mkdir()
    from PIL import Image

    Image.fromarray(style[4]).save(keys / "frame_4.png")
    assert cli.main(["--guide", str(tmp_path / "guide"), "--keyframes", str(keys),
                     "-o", str(tmp_path / "o.mp4"), "--num-iter", "2", "--quiet"]) == 0
    assert len(video_io.read_frames(str(tmp_path / "o.mp4"))) == 5


@pytest.mark.parametrize("output", ["out.mp4", "out"])
def test_a_crashed_run_leaves_the_old_output(tmp_path, scene, monkeypatch, output):
    guide, _, style = scene
    video_io.write_frames(str(tmp_path / "guide"), guide)
    keys = tmp_path / "keys"
    keys.mkdir()
    from PIL import Image

    Image.fromarray(style[0]).save(keys / "00000.png")
    Image.fromarray(style[9]).save(keys / "00009.png")
    out = tmp_path / output
    video_io.write_frames(str(out), style)
    files = lambda: {p: p.read_bytes() for p in (sorted(out.iterdir()) if out.is_dir() else [out])}  # noqa: E731
    before = files()
    calls = []
    real_pairs = PatchMatchRemapper.pairs

    def crash_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_pairs(self, *args, **kwargs)

    monkeypatch.setattr(PatchMatchRemapper, "pairs", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["--guide", str(tmp_path / "guide"), "--keyframes", str(keys), "-o", str(out),
                  "--batch-size", "2", "--num-iter", "1", "--quiet"])
    assert len(calls) == 3  # frames had been written when it crashed
    assert files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["guide", "keys", output])


def test_no_entry_point_sets_a_thread_policy(tmp_path, monkeypatch):
    """Threads are the caller's choice (docs/fastblend.md): no command changes the thread count unless asked, and
    only the `diffstudio` command applies its one documented wait policy (diffstudio/threads.py)."""
    import os
    import runpy
    import sys

    guide, _, style = make_scene(frames=3, size=24)
    video_io.write_frames(str(tmp_path / "guide"), guide)
    video_io.write_frames(str(tmp_path / "style"), style)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads = torch.get_num_threads()
    argv = ["--guide", str(tmp_path / "guide"), "--style", str(tmp_path / "style"), "-o", str(tmp_path / "out"),
            "--window-size", "1", "--num-iter", "1", "--quiet"]
    from diffstudio.cli import main

    assert main(["fastblend", *argv]) == 0
    assert torch.get_num_threads() == threads
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # set by `diffstudio` (threads.py), for its subprocesses
    monkeypatch.setattr(sys, "argv", ["fastblend", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("diffstudio.video.fastblend", run_name="__main__")
    assert done.value.code == 0
    assert "OMP_WAIT_POLICY" not in os.environ and torch.get_num_threads() == threads
