"""Loading user image folders: formats, conversion, captions, skipped files, errors, auxiliary sets, tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from b4m import data
from b4m.data import ImageSet, load_aux_sets, load_image_set, to_tensor
from b4m.errors import B4MError

RES = 32
RED, BLUE = (255, 0, 0), (0, 0, 255)


def close(pixel: tuple, want: tuple, tol: int = 4) -> bool:
    """A (lossy) pixel is within ``tol`` of ``want`` in every channel."""
    return all(abs(a - b) <= tol for a, b in zip(pixel, want, strict=True))


def save_rgb(path: Path, size: tuple[int, int] = (40, 36), color: tuple = (90, 120, 150)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def load(folder: Path, prompt: str | None = "a photo of sks dog", **kwargs) -> tuple[ImageSet, list[str]]:
    """Load with the warnings collected instead of emitted."""
    warned: list[str] = []
    return load_image_set(folder, prompt, RES, warn=warned.append, **kwargs), warned


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(B4MError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Formats and conversion


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """One image of each awkward kind, plus a fake and a truncated file, in one folder."""
    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(d / "a_rgb.jpg", quality=95)
    Image.new("L", (40, 32), 77).save(d / "b_gray.png")
    rgba = Image.new("RGBA", (RES, RES), (0, 128, 0, 255))
    rgba.putpixel((3, 3), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 0, 128))
    rgba.save(d / "c_rgba.png")
    sixteen = np.zeros((RES, RES), np.uint16)
    sixteen[:, :10], sixteen[:, 10:20] = 65535, 32896
    Image.fromarray(sixteen).save(d / "d_16bit.png")
    gif = Image.new("P", (RES, RES), 1)
    gif.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    gif.putpixel((0, 0), 0)
    gif.save(d / "e_palette.gif", transparency=0)
    Image.new("CMYK", (RES, RES), (0, 255, 255, 0)).save(d / "f_cmyk.jpg", quality=95)
    # Stored 64x32 with red left, blue right; orientation 6 shows it rotated 90 degrees clockwise: red on top.
    rotated = Image.new("RGB", (64, 32), RED)
    rotated.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(d / "g_exif.jpg", exif=exif, quality=95)
    (d / "h_fake.png").write_text("not a picture")
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(d / "i_truncated.jpg")
    whole = (d / "i_truncated.jpg").read_bytes()
    (d / "i_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / ".DS_Store").write_bytes(b"\x00\x01junk")
    (d / "notes.txt").write_text("not a caption of anything")
    return d


def test_every_kind_loads_as_rgb_square(mixed: Path):
    s, _ = load(mixed)
    names = [f.name for f in s.files]
    assert names == [
        "a_rgb.jpg",
        "b_gray.png",
        "c_rgba.png",
        "d_16bit.png",
        "e_palette.gif",
        "f_cmyk.jpg",
        "g_exif.jpg",
    ]
    assert s.name == "mixed" and s.folder == mixed and len(s) == 7
    assert all(im.mode == "RGB" and im.size == (RES, RES) for im in s.images)
    px = {name: im.getpixel for name, im in zip(names, s.images, strict=True)}

    assert close(px["a_rgb.jpg"]((16, 16)), (200, 30, 30))
    assert px["b_gray.png"]((0, 0)) == px["b_gray.png"]((31, 31)) == (77, 77, 77)
    assert px["c_rgba.png"]((3, 3)) == (255, 255, 255)  # transparent -> white
    assert close(px["c_rgba.png"]((5, 5)), (127, 127, 127), tol=1)  # black at half alpha over white
    assert px["c_rgba.png"]((10, 10)) == (0, 128, 0)
    assert px["d_16bit.png"]((0, 0)) == (255, 255, 255)  # 65535 -> 255, scaled not clipped
    assert px["d_16bit.png"]((15, 0)) == (128, 128, 128)  # 32896 -> 128
    assert px["d_16bit.png"]((25, 0)) == (0, 0, 0)
    assert px["e_palette.gif"]((0, 0)) == (255, 255, 255)  # transparent palette index -> white
    assert px["e_palette.gif"]((9, 9)) == (40, 50, 60)
    assert close(px["f_cmyk.jpg"]((16, 16)), RED)
    # EXIF applied: red on top, blue below, across the whole width (unrotated, the right side would be blue on top).
    for x in (2, 29):
        assert close(px["g_exif.jpg"]((x, 2)), RED, tol=8)
        assert close(px["g_exif.jpg"]((x, 29)), BLUE, tol=8)


def test_bad_files_are_skipped_with_a_warning_naming_them(mixed: Path):
    _, warned = load(mixed)
    assert len(warned) == 2, warned  # hidden files and .txt files pass silently
    fake, truncated = warned
    assert str(mixed / "h_fake.png") in fake and "not an image" in fake
    assert str(mixed / "i_truncated.jpg") in truncated and "truncated" in truncated


def test_default_warn_is_a_python_warning(tmp_path: Path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "fake.png").write_text("not a picture")
    with pytest.warns(UserWarning, match="fake.png"):
        load_image_set(tmp_path, "a dog", RES)


def test_huge_jpeg_is_decoded_reduced_and_centre_cropped(tmp_path: Path, monkeypatch):
    d = tmp_path / "huge"
    d.mkdir()
    big = Image.new("L", (9000, 6000), 0)  # cheap to build; L keeps it at 54 MB
    big.paste(255, (4500, 0, 9000, 6000))
    big.save(d / "huge.jpg", quality=90)
    del big
    loads = []
    original_load = Image.Image.load

    def spy(self):
        loads.append(self.size)
        return original_load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    s, warned = load(d)
    assert warned == []
    assert loads[0][0] <= 9000 // 8 + 1  # decoded at 1/8 scale (draft), not at 54 Mpx
    im = s.images[0]
    assert im.size == (RES, RES) and im.mode == "RGB"
    # The centre 6000x6000 square: left half dark, right half light.
    assert close(im.getpixel((2, 16)), (0, 0, 0)) and close(im.getpixel((29, 16)), (255, 255, 255))


def test_pillow_bomb_limit_does_not_refuse_big_images_and_is_restored(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would raise DecompressionBombError at 2x this
    save_rgb(tmp_path / "a.png", (64, 48))
    s, warned = load(tmp_path)
    assert s.images[0].getpixel((0, 0)) == (90, 120, 150) and warned == []
    assert Image.MAX_IMAGE_PIXELS == 100


def test_images_over_our_limit_are_skipped(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 2000)
    save_rgb(tmp_path / "big.png", (64, 48))
    save_rgb(tmp_path / "small.png", (RES, RES))
    s, warned = load(tmp_path)
    assert [f.name for f in s.files] == ["small.png"]
    assert len(warned) == 1 and "big.png" in warned[0] and "too large" in warned[0]


def test_small_images_are_upscaled_with_a_warning(tmp_path: Path):
    save_rgb(tmp_path / "tiny.png", (16, 20))
    s, warned = load(tmp_path)
    assert s.images[0].size == (RES, RES) and s.images[0].getpixel((5, 5)) == (90, 120, 150)
    assert len(warned) == 1 and "tiny.png" in warned[0] and "upscaled" in warned[0]


def test_centre_crop_of_a_wide_image(tmp_path: Path):
    wide = Image.new("RGB", (96, 32), RED)  # the centre third is blue
    wide.paste(BLUE, (32, 0, 64, 32))
    wide.save(tmp_path / "wide.png")
    s, _ = load(tmp_path)
    assert s.images[0].getpixel((0, 0)) == BLUE and s.images[0].getpixel((31, 31)) == BLUE


def test_loading_is_deterministic(mixed: Path):
    first, _ = load(mixed)
    second, _ = load(mixed)
    assert [im.tobytes() for im in first.images] == [im.tobytes() for im in second.images]
    assert first.captions == second.captions


# ---------------------------------------------------------------------------------------------------------------
# Captions


def test_caption_file_wins_over_prompt(tmp_path: Path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo of\n  sks dog on grass  \n")
    save_rgb(tmp_path / "b.png")
    save_rgb(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("  \n")  # empty: falls back to the prompt
    s, warned = load(tmp_path, prompt=" a photo of sks dog ")
    assert s.captions == ["a photo of sks dog on grass", "a photo of sks dog", "a photo of sks dog"]
    assert s.own_captions == 1  # the empty c.txt does not count
    assert warned == []


def test_missing_caption_is_an_error_naming_the_image(tmp_path: Path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks dog")
    save_rgb(tmp_path / "b.png")
    message = one_line_error(load_image_set, tmp_path, None, RES)
    assert str(tmp_path / "b.png") in message and "b.txt" in message


def test_placeholder_warning_once_per_set(tmp_path: Path):
    for name, caption in [("a", "a sks dog"), ("b", "a sksy dog"), ("c", "a dog"), ("d", "(sks) dog")]:
        save_rgb(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    _, warned = load(tmp_path, name="my dog", placeholder="sks")
    assert len(warned) == 1
    assert "'my dog'" in warned[0] and "'sks'" in warned[0] and "2 of 4" in warned[0] and "b.png" in warned[0]
    _, warned = load(tmp_path, placeholder=None)
    assert warned == []


# ---------------------------------------------------------------------------------------------------------------
# Folder errors


def test_folder_errors_name_the_folder(tmp_path: Path):
    missing = tmp_path / "nope"
    assert str(missing) in one_line_error(load_image_set, missing, "p", RES)
    a_file = save_rgb(tmp_path / "file.png")
    assert str(a_file) in one_line_error(load_image_set, a_file, "p", RES)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden.png").write_bytes(b"x")
    (empty / "caption.txt").write_text("x")
    assert "no images" in one_line_error(load_image_set, empty, "p", RES)

    nested = tmp_path / "nested"
    (nested / "inner").mkdir(parents=True)
    message = one_line_error(load_image_set, nested, "p", RES)
    assert str(nested) in message and "subfolders" in message

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("text")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    warned: list[str] = []
    with pytest.raises(B4MError, match="no usable images") as info:
        load_image_set(bad, "p", RES, warn=warned.append)
    assert str(bad) in str(info.value) and len(warned) == 2


def test_bad_resolution(tmp_path: Path):
    save_rgb(tmp_path / "a.png")
    with pytest.raises(B4MError, match="resolution"):
        load_image_set(tmp_path, "p", 0)


# ---------------------------------------------------------------------------------------------------------------
# Auxiliary sets


def make_set(folder: Path, captions: dict[str, str | None], prompt: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for stem, caption in captions.items():
        save_rgb(folder / f"{stem}.png")
        if caption is not None:
            (folder / f"{stem}.txt").write_text(caption)
    if prompt is not None:
        (folder / "prompt.txt").write_text(prompt + "\n")
    return folder


def test_aux_folder_of_folders(tmp_path: Path):
    root = tmp_path / "aux"
    make_set(root / "b_style", {"x": "a cat, watercolor", "y": None}, prompt="a watercolor painting")
    make_set(root / "a_cats", {"p": "a cat", "q": "two cats"})
    (root / ".ipynb_checkpoints").mkdir()
    warned: list[str] = []
    sets = load_aux_sets(root, RES, warn=warned.append)
    assert [s.name for s in sets] == ["a_cats", "b_style"]
    assert sets[0].captions == ["a cat", "two cats"]
    assert sets[1].captions == ["a cat, watercolor", "a watercolor painting"]
    assert [f.name for f in sets[1].files] == ["x.png", "y.png"]
    assert all(im.size == (RES, RES) for s in sets for im in s.images)
    assert warned == []


def test_aux_list_of_folders_and_placeholder(tmp_path: Path):
    one = make_set(tmp_path / "one", {"a": None}, prompt="sks dog")
    two = make_set(tmp_path / "two", {"a": None}, prompt="a dog")
    warned: list[str] = []
    sets = load_aux_sets([two, one], RES, placeholder="sks", warn=warned.append)
    assert [s.name for s in sets] == ["two", "one"]  # the order given
    assert len(warned) == 1 and "'two'" in warned[0]


def test_aux_errors(tmp_path: Path):
    flat = tmp_path / "flat"
    flat.mkdir()
    save_rgb(flat / "a.png")
    message = one_line_error(load_aux_sets, flat, RES)
    assert message == f"{flat}: --aux must be a folder of folders (one per auxiliary set)"

    no_prompt = tmp_path / "no_prompt"
    make_set(no_prompt / "style", {"a": "has one", "b": None})
    message = one_line_error(load_aux_sets, no_prompt, RES)
    assert str(no_prompt / "style" / "b.png") in message and str(no_prompt / "style" / "prompt.txt") in message

    empty_set = tmp_path / "empty_set"
    (empty_set / "style").mkdir(parents=True)
    assert str(empty_set / "style") in one_line_error(load_aux_sets, empty_set, RES)

    assert str(tmp_path / "missing") in one_line_error(load_aux_sets, tmp_path / "missing", RES)

    same = [make_set(tmp_path / f"{i}" / "style", {"a": "x"}) for i in (1, 2)]
    assert "'style'" in one_line_error(load_aux_sets, same, RES)


def test_aux_loose_files_are_reported(tmp_path: Path):
    root = tmp_path / "aux"
    make_set(root / "style", {"a": "x"})
    save_rgb(root / "stray.png")
    warned: list[str] = []
    assert len(load_aux_sets(root, RES, warn=warned.append)) == 1
    assert len(warned) == 1 and "stray.png" in warned[0]


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def test_to_tensor_shape_range_and_values():
    a = Image.new("RGB", (4, 3), (0, 128, 255))
    b = Image.new("RGB", (4, 3), (255, 255, 255))
    b.putpixel((1, 2), (10, 20, 30))
    t = to_tensor([a, b])
    assert t.shape == (2, 3, 3, 4) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert t[1, :, 2, 1].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], abs=1e-6)


def test_to_tensor_refuses_mixed_input():
    with pytest.raises(ValueError, match="one size"):
        to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])
    with pytest.raises(ValueError, match="RGB"):
        to_tensor([Image.new("L", (4, 4))])
    with pytest.raises(ValueError):
        to_tensor([])
