"""The weight-free line-art and soft-edge annotators, and any callable as a ControlNet unit's annotator."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffstudio.control import annotators
from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.control import ControlNetUnit, control_image


def stroke() -> np.ndarray:
    picture = np.full((48, 48, 3), 255, np.uint8)
    picture[:, 23:25] = 0  # a dark vertical stroke two pixels wide
    return picture


def test_lineart_draws_dark_strokes_white_on_black():
    lines = np.asarray(annotators.lineart(stroke()))[..., 0].astype(float)
    assert lines.shape == (48, 48)
    assert lines[:, 23:25].mean() > 200  # the stroke is a white line
    assert lines[:, :18].max() == 0 and lines[:, 30:].max() == 0  # paper far from it stays black
    # An independent difference of Gaussians on the luminance agrees.
    gray = stroke()[..., 0] / 255.0
    dog = ndimage.gaussian_filter(gray, 1.6, mode="nearest") - ndimage.gaussian_filter(gray, 1.0, mode="nearest")
    assert np.abs(lines - np.round(np.clip(12 * dog, 0, 1) * 255)).max() <= 1


def test_softedge_is_the_normalised_gradient_of_the_blurred_image():
    picture = np.zeros((40, 40, 3), np.uint8)
    picture[:, 20:] = 255  # one vertical edge
    edges = np.asarray(annotators.softedge(picture, sigma=2.0))[..., 0]
    assert edges.max() == 255 and edges[:, 19:21].min() == 255  # strongest on the edge
    assert edges[:, :8].max() == 0 and edges[:, 32:].max() == 0
    assert 0 < edges[:, 16].mean() < 255  # soft: it fades with distance
    assert np.asarray(annotators.softedge(np.full((8, 8, 3), 90, np.uint8))).max() == 0  # flat: black


def test_bad_settings_raise():
    with pytest.raises(InvalidInputError):
        annotators.lineart(stroke(), ratio=1.0)
    with pytest.raises(InvalidInputError):
        annotators.softedge(stroke(), sigma=-1)


def test_a_callable_annotator_and_the_new_names_in_a_controlnet_unit():
    def invert(picture):
        return 255 - np.asarray(picture)

    hint = control_image(stroke(), invert, 48, 48)
    assert hint.shape == (1, 3, 48, 48) and float(hint[0, 0, 0, 0]) == 0.0 and float(hint[0, 0, 0, 23]) == 1.0
    assert ControlNetUnit("net.safetensors", stroke(), preprocess=invert).describe()["preprocess"].endswith("invert")
    named = control_image(stroke(), "lineart", 48, 48)
    assert float(named[0, 0, :, 23].mean()) > 0.8
    assert control_image(stroke(), "softedge", 48, 48).shape == (1, 3, 48, 48)
