"""Tests for editsuite.imaging: opening images and masks, metadata, atomic saving, output names."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageFile

from editsuite.errors import UserError
from editsuite.imaging import output as output_module
from editsuite.imaging.io import DEFAULT_MAX_PIXELS, open_image, open_mask
from editsuite.imaging.metadata import a1111_parameters, png_info, read_settings
from editsuite.imaging.output import output_paths, save_atomic


def px(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(int)


def scaled16(values) -> np.ndarray:
    """What a 16-bit value should become: v * 255 / 65535, rounded."""
    return np.rint(np.asarray(values, dtype=float) / 257).astype(int)


def stored(path: Path) -> Image.Image:
    """The file as Pillow itself reads it (format, mode, size and pixels), file closed."""
    with Image.open(path) as im:
        im.load()
        copy = im.copy()
        copy.format = im.format
    return copy


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def png_bytes_16bit(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (OpenCV cannot write grey+alpha)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# open_image: modes


def test_rgb_png_is_returned_unchanged(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    im = open_image(save(Image.fromarray(arr), tmp_path / "a.png"))
    assert im.mode == "RGB" and im.size == (5, 6)
    assert (px(im) == arr).all()


def test_accepts_str_path_and_in_memory_image(tmp_path):
    p = save(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "a.png")
    assert open_image(str(p)).getpixel((0, 0)) == (1, 2, 3)
    src = Image.new("L", (3, 2), 9)
    out = open_image(src)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (9, 9, 9)
    assert src.mode == "L"  # the caller's image is not modified


def test_greyscale_and_bilevel(tmp_path):
    grey = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert px(open_image(save(grey, tmp_path / "l.png")))[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert px(open_image(save(bilevel, tmp_path / "1.png")))[0].tolist() == [[0] * 3, [255] * 3]


def test_rgba_is_composited_over_white(tmp_path):
    arr = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    im = open_image(save(Image.fromarray(arr), tmp_path / "a.png"))
    got = px(im)[0]
    assert got[0].tolist() == [255, 0, 0]
    assert got[1].tolist() == [255, 255, 255]
    assert abs(got[2] - 127).max() <= 1  # half-transparent black over white


def test_la_is_composited_over_white(tmp_path):
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert px(open_image(save(la, tmp_path / "la.png")))[0].tolist() == [[255] * 3, [0] * 3]


def test_palette_with_and_without_transparency(tmp_path):
    rgb = Image.fromarray(np.array([[[10, 20, 30], [200, 100, 50]]], dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert pal.mode == "P"
    im = open_image(save(pal, tmp_path / "p.png"))
    assert im.mode == "RGB" and px(im)[0].tolist() == [[10, 20, 30], [200, 100, 50]]

    transparent_index = pal.getpixel((0, 0))
    gif = save(pal, tmp_path / "p.gif", transparency=transparent_index)
    assert stored(gif).mode == "P"
    assert px(open_image(gif))[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_greyscale_with_transparency_key(tmp_path):
    grey = Image.fromarray(np.array([[0, 7]], dtype=np.uint8))
    p = save(grey, tmp_path / "t.png", transparency=7)
    assert px(open_image(p))[0].tolist() == [[0] * 3, [255] * 3]


def test_exif_rotated_jpeg(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)  # stored landscape, 80 wide
    arr[:20, :20] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    p = save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95)
    assert stored(p).size == (80, 40)

    im = open_image(p)
    assert im.size == (40, 80)  # dimensions swapped
    shown = px(im)
    assert shown[5, 35, 0] > 200 and shown[5, 35, 1] < 60  # red is now at the top-right
    assert shown[5, 5, 0] < 60


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # full magenta + yellow = red
    p = save(cmyk, tmp_path / "c.jpg", quality=95)
    assert stored(p).mode == "CMYK"
    r, g, b = open_image(p).getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "PA", "CMYK"])
def test_other_modes_in_memory(mode):
    src = Image.new("RGB", (4, 4), (200, 100, 50))
    im = Image.new(mode, (4, 4)) if mode in ("PA", "La") else src.convert(mode)
    out = open_image(im)
    assert out.mode == "RGB" and out.size == (4, 4)
    if mode not in ("PA", "La"):
        assert np.abs(px(out) - [200, 100, 50]).max() <= 3


def test_16bit_greyscale_png_scales_by_type_range(tmp_path):
    values = np.array([[0, 257, 511, 1000, 32896, 65280, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    assert cv2.imwrite(str(p), values)
    assert stored(p).mode == "I;16"
    im = open_image(p)
    assert (px(im)[..., 0] == scaled16(values)).all()
    assert px(im)[0, :, 0].tolist() == [0, 1, 2, 4, 128, 254, 255]
    assert (px(open_mask(p)) == scaled16(values)).all()


def test_16bit_rgb_png_from_opencv_keeps_precision(tmp_path):
    rgb = np.array([[[65535, 0, 511], [257, 32896, 1000], [0, 65535, 128]]], dtype=np.uint16)
    p = tmp_path / "c16.png"
    assert cv2.imwrite(str(p), rgb[..., ::-1])  # OpenCV writes BGR
    im = open_image(p)
    assert im.mode == "RGB"
    assert (px(im) == scaled16(rgb)).all()  # Pillow alone would give 1 for 511 and 3 for 1000


def test_16bit_rgba_png_composited_over_white(tmp_path):
    bgra = np.array([[[0, 0, 65535, 65535], [0, 0, 65535, 0]]], dtype=np.uint16)  # red opaque, red clear
    p = tmp_path / "c16a.png"
    assert cv2.imwrite(str(p), bgra)
    assert px(open_image(p))[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_16bit_grey_alpha_png(tmp_path):
    arr = np.dstack([np.full((1, 3), 511), np.array([[0, 65535, 65535]])]).astype(np.uint16)
    p = tmp_path / "la16.png"
    p.write_bytes(png_bytes_16bit(arr, colour_type=4))
    assert px(open_image(p))[0, :, 0].tolist() == [255, 2, 2]


def test_32bit_int_and_float_images(tmp_path):
    as_int = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert as_int.mode == "I"
    assert px(open_image(as_int))[0, :, 0].tolist() == [0, 1, 255]
    p = save(as_int, tmp_path / "i.tif")
    assert px(open_image(p))[0, :, 0].tolist() == [0, 1, 255]

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert px(open_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))
    assert px(open_image(wide))[0, :, 0].tolist() == [0, 64, 255]


# ---------------------------------------------------------------------------------------------
# open_mask


def test_mask_greyscale_and_colour(tmp_path):
    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    m = open_mask(save(Image.fromarray(grey), tmp_path / "m.png"))
    assert m.mode == "L" and (px(m) == grey).all()
    colour = Image.new("RGB", (2, 2), (255, 255, 255))
    assert open_mask(colour).getextrema() == (255, 255)


def test_alpha_only_mask_means_transparent_is_repaint(tmp_path):
    arr = np.zeros((1, 3, 4), dtype=np.uint8)  # constant black colour
    arr[0, :, 3] = [0, 255, 100]
    m = open_mask(save(Image.fromarray(arr), tmp_path / "alpha.png"))
    assert m.mode == "L" and px(m)[0].tolist() == [255, 0, 155]


def test_opaque_rgba_mask_uses_colour():
    arr = np.full((1, 2, 4), 255, dtype=np.uint8)  # white, fully opaque: repaint everything
    assert px(open_mask(Image.fromarray(arr)))[0].tolist() == [255, 255]


def test_mask_with_varying_colour_ignores_alpha():
    arr = np.array([[[255, 255, 255, 255], [0, 0, 0, 0]]], dtype=np.uint8)  # white stroke on clear
    assert px(open_mask(Image.fromarray(arr)))[0].tolist() == [255, 0]


def test_mask_errors_say_mask(tmp_path):
    with pytest.raises(UserError, match=r"^mask '.*nope\.png' not found"):
        open_mask(tmp_path / "nope.png")


# ---------------------------------------------------------------------------------------------
# open_image: errors


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"image '.*missing\.png' not found"):
        open_image(tmp_path / "missing.png")


def test_directory(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        open_image(tmp_path)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, this is text\n")
    with pytest.raises(UserError, match=r"notes\.png' is not an image Pillow can read \(") as info:
        open_image(p)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_file(tmp_path, fmt, name):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    data = buf.getvalue()
    p = tmp_path / name
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as info:
        open_image(p)
    assert name in str(info.value)


def test_truncated_16bit_png(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    ok, enc = cv2.imencode(".png", rgb)
    p = tmp_path / "cut16.png"
    p.write_bytes(enc.tobytes()[: len(enc) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        open_image(p)


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before size check"))
    with pytest.raises(UserError) as info:
        open_image(p, max_pixels=4999)
    msg = str(info.value)
    assert "100x50 = 5,000 pixels" in msg and "4,999" in msg and "--max-pixels" in msg


def test_pixel_limit_allows_exact_size_and_in_memory(tmp_path):
    p = save(Image.new("RGB", (100, 50)), tmp_path / "ok.png")
    assert open_image(p, max_pixels=5000).size == (100, 50)
    with pytest.raises(UserError, match="in-memory image.*--max-pixels"):
        open_image(Image.new("RGB", (10, 10)), max_pixels=99)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


def test_pillow_bomb_error_becomes_user_error(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (64, 64)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 200 pixels
    with pytest.raises(UserError, match=r"4,096 pixels.*--max-pixels"):
        open_image(p, max_pixels=50)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


def test_raised_limit_overrides_pillows_own(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert open_image(p, max_pixels=10_000).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---------------------------------------------------------------------------------------------
# open_image: fuzzing - an RGB image or a UserError, nothing else


def _valid_files() -> list[bytes]:
    rng = np.random.default_rng(3)
    files = []
    for fmt, im in [
        ("PNG", Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))),
        ("PNG", Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).convert("P")),
        ("JPEG", Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))),
        ("GIF", Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))),
    ]:
        buf = io.BytesIO()
        im.save(buf, fmt)
        files.append(buf.getvalue())
    files.append(cv2.imencode(".png", rng.integers(0, 65536, (16, 16, 3), dtype=np.uint16))[1].tobytes())
    return files


VALID_FILES = _valid_files()
FUZZ_DIR = Path(tempfile.mkdtemp(prefix="editsuite-fuzz-"))


def _check_open(data: bytes) -> None:
    p = FUZZ_DIR / "fuzz.png"
    p.write_bytes(data)
    try:
        im = open_image(p, max_pixels=2048 * 2048)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(im, Image.Image) and im.mode == "RGB"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _check_open(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_FILES).flatmap(lambda b: st.tuples(st.just(b), st.integers(0, len(b)))))
def test_fuzz_prefix_of_valid_file(case):
    data, cut = case
    _check_open(data[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_FILES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_fuzz_corrupted_valid_file(data, edits):
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    _check_open(bytes(buf))


# ---------------------------------------------------------------------------------------------
# metadata

SETTINGS = {
    "task": "img2img",
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "steps": 20,
    "sampler": "DPM++ 2M",
    "guidance_scale": 7.0,
    "seed": 42,
    "width": 512,
    "height": 512,
    "model_hash": "abcd1234",
    "model_name": "name",
    "strength": 0.75,
}


def test_a1111_parameters_format():
    assert a1111_parameters(SETTINGS) == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x512, "
        "Model hash: abcd1234, Model: name, Denoising strength: 0.75"
    )


def test_a1111_parameters_options():
    s = dict(SETTINGS, task="txt2img", negative_prompt="", guidance_scale=7.5, model_name="mix, v2: new")
    s["extra"] = {"Mask blur": 4, "Note": "a: b"}
    s["sampler"], s["schedule_type"] = "Euler a", "Uniform"
    text = a1111_parameters(s)
    lines = text.split("\n")
    assert lines[0] == "a photo of a cat" and len(lines) == 2  # no negative prompt line
    assert "Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5" in lines[1]
    assert "Model: mix_v2_new," in lines[1]  # readers split on "," and ":" even inside quotes
    assert "Denoising strength" not in lines[1]  # txt2img
    assert lines[1].endswith('Mask blur: 4, Note: "a: b"')
    del s["sampler"]
    s["scheduler"] = "DDPMScheduler"
    assert "Sampler" not in a1111_parameters(s)  # no A1111 name: none written (A1111 would run DPM++ 2M)
    assert a1111_parameters(dict(s, prompt="")).startswith("\nSteps: 20,")  # no prompt: an empty first line


def test_png_info_round_trip(tmp_path):
    s = dict(SETTINGS, prompt="un café ☕", extra={"Mask blur": 4})
    p = save_atomic(Image.new("RGB", (4, 4)), tmp_path / "out.png", pnginfo=png_info(s))
    with Image.open(p) as im:
        assert im.info["parameters"] == a1111_parameters(s)
        assert json.loads(im.info["editsuite"]) == s
    assert read_settings(p) == s


def test_png_info_stores_non_json_values_as_strings(tmp_path):
    s = {"seed": np.int64(5), "model_path": tmp_path / "m"}
    p = save_atomic(Image.new("RGB", (2, 2)), tmp_path / "o.png", pnginfo=png_info(s))
    assert read_settings(p) == {"seed": 5, "model_path": str(tmp_path / "m")}


def test_read_settings_errors(tmp_path):
    p = save(Image.new("RGB", (2, 2)), tmp_path / "plain.png")
    with pytest.raises(UserError, match="no editsuite settings"):
        read_settings(p)
    with pytest.raises(UserError, match="not found"):
        read_settings(tmp_path / "nope.png")


# ---------------------------------------------------------------------------------------------
# save_atomic


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_save_atomic_writes_png_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "dir" / "out.png"  # parent folders are created
    assert save_atomic(Image.new("RGB", (3, 3), "red"), target) == target
    assert stored(target).getpixel((0, 0)) == (255, 0, 0)
    assert leftovers(target.parent) == []


def test_save_atomic_permissions_follow_umask(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    p = save_atomic(Image.new("RGB", (2, 2)), tmp_path / "perm.png")
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_atomic_never_overwrites(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"original")
    with pytest.raises(UserError, match=r"exists; pass --overwrite to replace it, or choose another -o"):
        save_atomic(Image.new("RGB", (2, 2)), target)
    assert target.read_bytes() == b"original"
    assert leftovers(tmp_path) == []


def test_save_atomic_overwrite_replaces(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"original")
    save_atomic(Image.new("RGB", (2, 2), "blue"), target, overwrite=True)
    assert stored(target).getpixel((0, 0)) == (0, 0, 255)
    assert leftovers(tmp_path) == []


def test_save_atomic_does_not_clobber_file_created_meanwhile(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    real_save = Image.Image.save

    def save_and_race(self, fp, *args, **kwargs):
        target.write_bytes(b"someone else")  # appears after the up-front check
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_and_race)
    with pytest.raises(UserError, match="exists"):
        save_atomic(Image.new("RGB", (2, 2)), target)
    assert target.read_bytes() == b"someone else"
    assert leftovers(tmp_path) == []


def test_save_atomic_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(output_module.os, "link", no_link)
    target = save_atomic(Image.new("RGB", (2, 2), "green"), tmp_path / "out.png")
    assert stored(target).getpixel((0, 0)) == (0, 128, 0)
    with pytest.raises(UserError, match="exists"):
        save_atomic(Image.new("RGB", (2, 2)), target)
    assert leftovers(tmp_path) == []


def test_save_atomic_unknown_extension(tmp_path):
    with pytest.raises(UserError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
        save_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.tiff")
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_removes_temp_when_save_fails(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_disk_error_is_user_error(tmp_path, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match="No space left"):
        save_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_no_extension_means_png(tmp_path):
    p = save_atomic(Image.new("RGB", (2, 2)), tmp_path / "out")
    assert p == tmp_path / "out.png" and stored(p).format == "PNG"


@pytest.mark.parametrize("name,fmt", [("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")])
def test_save_atomic_jpeg_webp_carry_parameters_in_exif(tmp_path, name, fmt):
    s = dict(SETTINGS, prompt="un café")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # transparent
    p = save_atomic(rgba, tmp_path / name, pnginfo=png_info(s))
    with Image.open(p) as im:
        assert im.format == fmt
        comment = im.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        if fmt == "JPEG":
            assert min(im.convert("RGB").getpixel((1, 1))) > 240  # composited over white
    assert comment.startswith(b"UNICODE\0")
    assert comment[8:].decode("utf-16-be") == a1111_parameters(s)


# ---------------------------------------------------------------------------------------------
# output_paths


def test_output_paths_default_folder_and_counter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = output_paths(None, task="txt2img", seeds=[42, 43], inputs=None, n_per_input=2, overwrite=False)
    assert first == [Path("txt2img-42-0001.png"), Path("txt2img-43-0001.png")]
    Path("txt2img-43-0001.png").touch()  # one name of the set is taken: the whole set moves on
    second = output_paths(None, task="txt2img", seeds=[42, 43], inputs=None, n_per_input=2, overwrite=False)
    assert second == [Path("txt2img-42-0002.png"), Path("txt2img-43-0002.png")]
    again = output_paths(None, task="txt2img", seeds=[42, 43], inputs=None, n_per_input=2, overwrite=True)
    assert again == first


def test_output_paths_single_file(tmp_path):
    out = tmp_path / "result.JPG"
    assert output_paths(out, task="txt2img", seeds=[1], inputs=None, n_per_input=1, overwrite=False) == [out]
    out.write_bytes(b"x")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        output_paths(out, task="txt2img", seeds=[1], inputs=None, n_per_input=1, overwrite=False)
    assert output_paths(out, task="txt2img", seeds=[1], inputs=None, n_per_input=1, overwrite=True) == [out]


def test_output_paths_folder_with_input_stems(tmp_path):
    inputs = [Path("a/cat.png"), Path("b/dog.jpg")]
    got = output_paths(tmp_path / "res", task="inpaint", seeds=[7], inputs=inputs, n_per_input=1, overwrite=False)
    assert got == [tmp_path / "res" / "cat-inpaint-7-0001.png", tmp_path / "res" / "dog-inpaint-7-0001.png"]


def test_output_paths_one_output_in_folder(tmp_path):
    got = output_paths(tmp_path, task="img2img", seeds=[3], inputs=[Path("x.png")], n_per_input=1, overwrite=False)
    assert got == [tmp_path / "x-img2img-3-0001.png"]


def test_output_paths_same_stem_and_seed_get_distinct_names(tmp_path):
    inputs = [Path("a/img.png"), Path("b/img.png")]
    got = output_paths(tmp_path, task="upscale", seeds=[0, 5], inputs=inputs, n_per_input=2, overwrite=False)
    assert [p.name for p in got] == [
        "img-upscale-0-0001.png",
        "img-upscale-5-0001.png",
        "img-upscale-0-0002.png",
        "img-upscale-5-0002.png",
    ]
    assert len(set(got)) == 4


def test_output_paths_one_seed_per_output(tmp_path):
    got = output_paths(tmp_path, task="img2img", seeds=[1, 2, 3, 4], inputs=[Path("a.png"), Path("b.png")],
                       n_per_input=2, overwrite=False)
    assert [p.name for p in got] == ["a-img2img-1-0001.png", "a-img2img-2-0001.png",
                                     "b-img2img-3-0001.png", "b-img2img-4-0001.png"]
    with pytest.raises(ValueError):
        output_paths(tmp_path, task="img2img", seeds=[1, 2, 3], inputs=[Path("a.png")], n_per_input=2, overwrite=False)


def test_output_paths_several_outputs_need_a_folder(tmp_path):
    with pytest.raises(UserError, match="-o must be a folder when there are several outputs"):
        output_paths(tmp_path / "x.png", task="txt2img", seeds=[1, 2], inputs=None, n_per_input=2, overwrite=False)
    existing = tmp_path / "file"
    existing.write_bytes(b"")
    with pytest.raises(UserError, match="-o must be a folder when there are several outputs"):
        output_paths(existing, task="inpaint", seeds=[1], inputs=[Path("a.png"), Path("b.png")], n_per_input=1,
                     overwrite=False)
    # an existing folder whose name looks like an image is still a folder
    odd = tmp_path / "shots.png"
    odd.mkdir()
    got = output_paths(odd, task="txt2img", seeds=[1, 2], inputs=None, n_per_input=2, overwrite=False)
    assert got[0] == odd / "txt2img-1-0001.png"


def test_output_paths_unsupported_extension_and_existing_file(tmp_path):
    with pytest.raises(UserError, match=r"cannot write \.tiff"):
        output_paths(tmp_path / "x.tiff", task="txt2img", seeds=[1], inputs=None, n_per_input=1, overwrite=False)
    existing = tmp_path / "notes"
    existing.write_bytes(b"")
    with pytest.raises(UserError, match="existing file, not a folder"):
        output_paths(existing, task="txt2img", seeds=[1], inputs=None, n_per_input=1, overwrite=False)
