"""Images written in the format their suffix names, with the recipe where each format keeps text:
PNG text chunks; JPEG / WebP: EXIF UserComment (as A1111 writes it) + XMP. Atomic, ordinary modes."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from diffstudio.errors import UnsupportedFormatError
from diffstudio.io.recipe import a1111_parameters, read_recipe, save_image, save_png

RECIPE = {"prompt": "a red circle, très « rouge »: on the left", "negative_prompt": "blurry", "steps": 3,
          "sampler": "euler_ancestral", "scheduler": "karras", "cfg_scale": 7.5, "seed": 5, "width": 16,
          "height": 8, "extra": {"loras": [{"name": "style.safetensors", "strength": 0.8}]}}


def picture() -> Image.Image:
    return Image.new("RGB", (16, 8), (200, 30, 30))


@pytest.mark.parametrize("name,expected", [("o.png", "PNG"), ("o.jpg", "JPEG"), ("o.jpeg", "JPEG"),
                                           ("o.webp", "WEBP"), ("O.JPG", "JPEG")])
def test_the_suffix_chooses_the_format_and_the_recipe_comes_back(tmp_path, name, expected):
    path = save_image(picture(), tmp_path / name, RECIPE)
    with Image.open(path) as image:
        assert image.format == expected and image.size == (16, 8)
    assert read_recipe(path) == RECIPE


@pytest.mark.parametrize("suffix", ["jpg", "webp"])
def test_jpeg_and_webp_hold_the_a1111_text_where_a1111_reads_it(tmp_path, suffix):
    path = save_image(picture(), tmp_path / f"o.{suffix}", RECIPE)
    with Image.open(path) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]  # Exif IFD, UserComment
    # A1111 reads it with piexif.helper.UserComment.load: an 8-byte "UNICODE\0" code, then UTF-16 big-endian.
    assert comment[:8] == b"UNICODE\x00"
    assert comment[8:].decode("utf_16_be") == a1111_parameters(RECIPE)


def test_an_a1111_jpeg_without_our_json_is_read_from_its_user_comment(tmp_path):
    text = "a blue star\nNegative prompt: ugly\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, " \
           "Seed: 42, Size: 16x8"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf_16_be")
    path = tmp_path / "a1111.jpg"
    picture().save(path, exif=exif.tobytes())
    recipe = read_recipe(path)
    assert (recipe["prompt"], recipe["negative_prompt"], recipe["steps"], recipe["sampler"], recipe["scheduler"],
            recipe["seed"], recipe["width"]) == ("a blue star", "ugly", 12, "dpmpp_2m", "karras", 42, 16)


@pytest.mark.parametrize("name", ["o.gif", "o.bmp", "o.tiff", "o"])
def test_other_suffixes_are_a_named_error_listing_the_formats(tmp_path, name):
    with pytest.raises(UnsupportedFormatError, match=r"\.png \.jpg \.jpeg \.webp"):
        save_image(picture(), tmp_path / name, RECIPE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_image(picture(), tmp_path / "o.png", RECIPE)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "o.jpg"
    path.write_bytes(b"the previous image")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"half an ima")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_image(picture(), path, RECIPE)
    assert path.read_bytes() == b"the previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["o.jpg"]


def test_save_png_writes_png_whatever_the_name(tmp_path):
    path = save_png(picture(), tmp_path / "o.png", RECIPE)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.text["parameters"] == a1111_parameters(RECIPE)
