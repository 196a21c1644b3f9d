"""load_rgb over every image mode the training sets contain, broken files, and SkipReport."""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from apl.images import ImageError, SkipReport, load_rgb

S = 16


def _check(x: torch.Tensor, size: int = S) -> torch.Tensor:
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    return x


def _uniform(x: torch.Tensor, rgb: tuple[float, float, float], atol: float = 1e-3) -> None:
    expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand_as(x)
    torch.testing.assert_close(x, expected, atol=atol, rtol=0)


def _v(byte: float, full: float = 255.0) -> float:
    """Expected [-1, 1] value of a sample."""
    return byte / full * 2 - 1


def _png16(path, array: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (PIL cannot write 16-bit RGB): rows of big-endian samples, filter byte 0."""
    h, w = array.shape[:2]
    data = array.astype(">u2")
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_rgb_noise_shape_and_range(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    _check(load_rgb(path, S))
    _check(load_rgb(path, 64), 64)  # upscaling works too


def test_rgb_solid_colour(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (255, 0, 128)).save(path)
    _uniform(_check(load_rgb(path, S)), (1.0, -1.0, _v(128)))


def test_grey_modes(tmp_path):
    Image.new("L", (20, 20), 128).save(tmp_path / "l.png")
    _uniform(_check(load_rgb(tmp_path / "l.png", S)), (_v(128),) * 3)
    Image.new("1", (20, 20), 1).save(tmp_path / "one.png")
    _uniform(_check(load_rgb(tmp_path / "one.png", S)), (1.0, 1.0, 1.0))


def test_la_transparent_is_white(tmp_path):
    img = Image.new("LA", (20, 20), (0, 0))  # black, fully transparent
    img.save(tmp_path / "la.png")
    _uniform(_check(load_rgb(tmp_path / "la.png", S)), (1.0, 1.0, 1.0))
    Image.new("LA", (20, 20), (64, 255)).save(tmp_path / "la_opaque.png")
    _uniform(_check(load_rgb(tmp_path / "la_opaque.png", S)), (_v(64),) * 3)


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    img.save(tmp_path / "p.png")
    _uniform(_check(load_rgb(tmp_path / "p.png", S)), (-1.0, _v(200), -1.0))
    img.save(tmp_path / "p_t.png", transparency=1)  # palette entry 1 (green) is transparent
    assert Image.open(tmp_path / "p_t.png").info.get("transparency") == 1
    _uniform(_check(load_rgb(tmp_path / "p_t.png", S)), (1.0, 1.0, 1.0))


def test_rgba_composited_on_white_and_centre_crop(tmp_path):
    # 64x32: the centre square is x in [16, 48); its left half is transparent *red*, its right half opaque blue.
    arr = np.zeros((32, 64, 4), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0, 0)
    arr[:, 32:] = (0, 0, 255, 255)
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "rgba.png")
    x = _check(load_rgb(tmp_path / "rgba.png", S))
    _uniform(x[:, :, :5], (1.0, 1.0, 1.0))  # white, not red: the alpha was honoured
    _uniform(x[:, :, 11:], (-1.0, -1.0, 1.0))


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red
    img.save(tmp_path / "cmyk.tif")
    _uniform(_check(load_rgb(tmp_path / "cmyk.tif", S)), (1.0, -1.0, -1.0))
    img.save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    _uniform(_check(load_rgb(tmp_path / "cmyk.jpg", S)), (1.0, -1.0, -1.0), atol=0.05)


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16B", ".tif")])
def test_16bit_grey_scales_full_range(tmp_path, mode, suffix):
    path = tmp_path / f"g16{suffix}"
    dtype = "<u2" if mode == "I;16" else ">u2"
    # 16384 is only a quarter of the 16-bit range; clipping to 8 bits would make it white.
    Image.frombytes(mode, (20, 20), np.full((20, 20), 16384, dtype=dtype).tobytes()).save(path)
    assert Image.open(path).mode.startswith("I;16")
    _uniform(_check(load_rgb(path, S)), (_v(16384, 65535),) * 3)


def test_16bit_grey_png_written_by_hand(tmp_path):
    _png16(tmp_path / "g16.png", np.full((20, 20), 49151), color_type=0)
    _uniform(_check(load_rgb(tmp_path / "g16.png", S)), (_v(49151, 65535),) * 3)


def test_32bit_int_mode_I(tmp_path):
    path = tmp_path / "i.tif"
    Image.fromarray(np.full((20, 20), 49151, dtype=np.int32)).save(path)
    assert Image.open(path).mode == "I"
    _uniform(_check(load_rgb(path, S)), (_v(49151, 65535),) * 3)


def test_16bit_rgb_png(tmp_path):
    arr = np.zeros((20, 20, 3), dtype=np.uint16)
    arr[...] = (65535, 32768, 257)
    _png16(tmp_path / "rgb16.png", arr, color_type=2)
    _uniform(_check(load_rgb(tmp_path / "rgb16.png", S)), (1.0, _v(128), _v(1)))


def test_exif_orientation(tmp_path):
    # Stored 40x20 with red left / blue right; orientation 6 = rotate 90 deg clockwise to display, so the displayed
    # 20x40 image is red on top and blue at the bottom.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    x = _check(load_rgb(tmp_path / "rot.jpg", S))
    _uniform(x[:, :6, :], (1.0, -1.0, -1.0), atol=0.1)
    _uniform(x[:, 10:, :], (-1.0, -1.0, 1.0), atol=0.1)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises(tmp_path, suffix):
    rng = np.random.default_rng(1)
    full = tmp_path / f"full{suffix}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ImageError, match=r"cut\.(png|jpg)"):
        load_rgb(cut, S)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing global was switched on
    _check(load_rgb(full, S))


def test_broken_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: the file is empty"):
        load_rgb(empty, S)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.jpg: cannot decode"):
        load_rgb(text, S)
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        load_rgb(tmp_path / "missing.png", S)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_rgb(tmp_path / "ok.png", 0)


def test_lab_is_refused_not_miscoloured(tmp_path):
    Image.new("LAB", (8, 8), (50, 0, 0)).save(tmp_path / "lab.tif")
    with pytest.raises(ImageError, match=r"lab\.tif: LAB colour images are not supported"):
        load_rgb(tmp_path / "lab.tif", S)


def test_image_error_pickles():
    e = pickle.loads(pickle.dumps(ImageError("/x/a.png", "truncated")))
    assert isinstance(e, ImageError) and str(e) == "/x/a.png: truncated" and e.reason == "truncated"


def test_skip_report():
    report = SkipReport()
    assert not report and report.count == 0 and report.summary() == "nothing skipped"
    for i in range(5):
        report.add("unreadable image", f"/d/{i}.png", "truncated")
    report.add("empty caption", "/d/x.jpg")
    assert report and report.count == 6 and len(report) == 6
    assert report.by_reason() == {"unreadable image": 5, "empty caption": 1}
    text = report.summary()
    assert "5 x unreadable image" in text and "1 x empty caption" in text
    assert "/d/0.png (truncated)" in text and "/d/2.png" in text and "/d/3.png" not in text
    assert "and 2 more" in text and "/d/x.jpg" in text
    assert report.examples("empty caption") == ["/d/x.jpg"]
