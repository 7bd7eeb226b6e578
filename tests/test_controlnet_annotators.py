"""Weight-free control-image annotators on synthetic images. The expected edges follow from the Sobel arithmetic
(a step of height c across a straight boundary has an L1 gradient of 4c), not from the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffstudio.control import blur, canny, canny_edges, hint_tensor, inpaint, tile
from diffstudio.errors import InvalidInputError


def step(height: int, size=(32, 32), channel: int | None = None) -> np.ndarray:
    """Black left half, right half `height` (in every channel, or in one)."""
    image = np.zeros((*size, 3), np.uint8)
    if channel is None:
        image[:, size[1] // 2:] = height
    else:
        image[:, size[1] // 2:, channel] = height
    return image


def test_a_flat_image_has_no_edges():
    assert not canny_edges(np.full((16, 16, 3), 128, np.uint8)).any()


def test_a_square_gives_a_thin_closed_outline():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    edges = canny_edges(image)
    ys, xs = np.nonzero(edges)
    # Every edge pixel lies on the square's boundary (within one pixel of it), none inside or far outside.
    assert ys.min() >= 7 and ys.max() <= 24 and xs.min() >= 7 and xs.max() <= 24
    assert not edges[10:22, 10:22].any()
    # Each side is covered along its length, one pixel thick (non-maximum suppression).
    assert edges[10:22, 6:10].sum(axis=1).tolist() == [1] * 12
    assert edges[10:22, 22:26].sum(axis=1).tolist() == [1] * 12
    assert edges[6:10, 10:22].sum(axis=0).tolist() == [1] * 12
    assert edges[22:26, 10:22].sum(axis=0).tolist() == [1] * 12


@pytest.mark.parametrize("height,low,high,found", [
    (40, 100, 200, False),   # 4 * 40 = 160: above low, below high, and no strong pixel to hold on to
    (40, 100, 150, True),    # 160 > high
    (20, 100, 150, False),   # 80 < low
    (60, 200, 100, True),    # thresholds in either order (as OpenCV takes them); 240 > 200
])
def test_thresholds_act_on_the_sobel_l1_magnitude(height, low, high, found):
    edges = canny_edges(step(height), low, high)
    assert edges.any() == found
    if found:
        assert edges[:, 15:17].all(axis=0).sum() == 1 and edges.sum() == 32  # one full column at the boundary


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    image = step(40)
    image[:16, 16:] = 100            # the boundary's top half is strong (400), its bottom half weak (160)
    edges = canny_edges(image, 100, 200)
    boundary = edges[:, 15:17].any(axis=1)
    assert boundary[20:].all()       # weak, but 8-connected to the strong half: kept
    assert not canny_edges(step(40), 100, 200).any()  # the same weak edge alone: dropped


def test_colour_edges_use_the_strongest_channel():
    """A blue-only step: a grey conversion would give 0.114 * 255 = 29 (gradient 116, below 200); OpenCV's colour
    Canny takes each pixel's strongest channel (1020)."""
    assert canny_edges(step(255, channel=2)).any()


def test_canny_image_is_rgb_black_and_white_of_the_input_size():
    out = canny(Image.fromarray(step(255, size=(24, 40))))
    assert out.mode == "RGB" and out.size == (40, 24)
    assert set(np.unique(np.asarray(out)).tolist()) == {0, 255}
    with pytest.raises(InvalidInputError):
        canny(step(255), low=-1)


def test_tile_keeps_layout_and_drops_detail():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=-1)
    image[:, 32:] = 255 - (255 - image[:, 32:]) // 4    # right half brighter on average
    out = np.asarray(tile(image, factor=4), dtype=np.float32)
    assert out.shape == image.shape
    assert out[:, 4:28].std() < 0.1 * image[:, 4:28].std()       # the one-pixel checker is gone
    assert out[:, 36:].mean() > out[:, :28].mean() + 50            # the halves are not
    with pytest.raises(InvalidInputError):
        tile(image, factor=0.5)


def test_blur_smooths_noise():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = np.asarray(blur(noise, radius=2), dtype=np.float32)
    assert out.shape == noise.shape and out.std() < 0.5 * noise.std()


def test_hint_tensor_is_in_unit_range_and_resizes():
    image = step(255, size=(16, 24))
    hint = hint_tensor(image)
    assert hint.shape == (1, 3, 16, 24) and hint.min() == 0 and hint.max() == 1
    assert hint_tensor(image, size=(48, 32)).shape == (1, 3, 32, 48)


def test_inpaint_hint_sets_masked_pixels_to_minus_one():
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 2:12] = 255                                           # white = repaint
    hint = inpaint(image, Image.fromarray(mask))
    assert hint.shape == (1, 3, 16, 16)
    masked = torch.from_numpy(mask > 127)
    assert (hint[0][:, masked] == -1).all()
    expected = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(hint[0][:, ~masked], expected[:, ~masked])
