"""diffstudio.video.video_io: reading frames, and writers that never destroy an existing output.

Every writer works on a hidden name in the output's folder and renames it into place only when the
last frame is written, so a run that fails midway leaves the old video or frame folder as it was.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from diffstudio.errors import InputFileNotFoundError, InvalidInputError
from diffstudio.video import video_io


def frames(count: int, seed: int, size: tuple[int, int] = (16, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def failing(source: np.ndarray, after: int):
    """Yields ``after`` frames of ``source``, then fails as a crashing renderer would."""
    yield from source[:after]
    raise RuntimeError("renderer crashed")


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_failed_video_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.mp4"
    video_io.write_frames(str(path), frames(10, seed=0), fps=10)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="crashed"):
        video_io.write_frames(str(path), failing(frames(10, seed=1), after=8), fps=10)
    assert snapshot(tmp_path) == before  # the same bytes, and no partial file left beside it


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    video_io.write_frames(str(out), frames(5, seed=0))
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="crashed"):
        video_io.write_frames(str(out), failing(frames(5, seed=1), after=3))
    assert snapshot(tmp_path) == before


def test_finished_write_replaces_the_old_output_whole(tmp_path):
    out, video = tmp_path / "out", tmp_path / "out.mp4"
    video_io.write_frames(str(out), frames(5, seed=0))
    video_io.write_frames(str(video), frames(5, seed=0))
    new = frames(3, seed=1)
    video_io.write_frames(str(out), new)
    video_io.write_frames(str(video), new)
    assert np.array_equal(np.stack(video_io.read_frames(str(out))), new)  # no stale frames 3 and 4
    assert len(video_io.read_frames(str(video))) == 3
    assert sorted(os.listdir(tmp_path)) == ["out", "out.mp4"]


def test_outputs_get_the_usual_modes(tmp_path, umask_022):
    video_io.write_frames(str(tmp_path / "out.mp4"), frames(2, seed=0))
    video_io.write_frames(str(tmp_path / "out"), frames(2, seed=0))
    assert os.stat(tmp_path / "out.mp4").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "out" / "00000.png").st_mode & 0o777 == 0o644


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        video_io.write_frames(str(tmp_path / "out.mp4"), frames(2, seed=0))
        video_io.write_frames(str(tmp_path / "out"), frames(2, seed=0))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.mp4").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750


def test_a_folder_holding_other_files_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="notes.txt"):
        video_io.VideoWriter(str(out))
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_an_output_of_the_wrong_kind_is_refused(tmp_path):
    (tmp_path / "clip.mp4").mkdir()
    (tmp_path / "frames").write_bytes(b"a file")
    with pytest.raises(InvalidInputError, match="is a folder"):
        video_io.VideoWriter(str(tmp_path / "clip.mp4"))
    with pytest.raises(InvalidInputError, match="is a file"):
        video_io.VideoWriter(str(tmp_path / "frames"))


def test_writer_with_no_frames_changes_nothing(tmp_path):
    path = tmp_path / "out.mp4"
    video_io.write_frames(str(path), frames(2, seed=0))
    before = snapshot(tmp_path)
    with pytest.raises(InvalidInputError, match="no frames"):
        video_io.write_frames(str(path), [])
    assert snapshot(tmp_path) == before



def test_missing_inputs_name_what_is_missing(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="guide video"):
        video_io.check_source(str(tmp_path / "nope.mp4"), "guide video")
    with pytest.raises(InputFileNotFoundError, match="video"):
        next(video_io.iter_frames(str(tmp_path / "nope.mp4")))
    with pytest.raises(InvalidInputError, match="00042.png"):
        video_io.frame_index("keyframe.png")


def _moving_blocks(seed: int) -> list[np.ndarray]:
    """9 frames of 64x48: coloured blocks drifting right over a moving wave, with grain."""
    rng = np.random.default_rng(seed)
    x = np.arange(64)[None, :, None]
    blocks = np.kron(rng.random((6, 8, 3)), np.ones((8, 8, 1)))
    return [np.clip(np.roll(blocks, 2 * i, axis=1) * 200 + 30 * np.sin((x + 3 * i) / 5)
                    + rng.normal(0, 6, (48, 64, 3)), 0, 255).astype(np.uint8) for i in range(9)]


def test_the_same_frames_encode_to_the_same_video(tmp_path):
    # x264's AVX-512 kernels gave 2-4 different streams in 10 encodes of these clips.
    for seed in range(3):
        clip = _moving_blocks(seed)
        written = set()
        for run in range(8):
            path = tmp_path / f"{seed}-{run}.mp4"
            video_io.write_frames(str(path), clip)
            written.add(path.read_bytes())
        assert len(written) == 1, f"clip {seed}: {len(written)} different videos from the same frames"
