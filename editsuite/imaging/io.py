"""Opening user images and masks the way users expect.

`open_image` turns whatever the user passed (a path or an in-memory PIL image) into an 8-bit RGB
image; `open_mask` turns it into an 8-bit 'L' mask where 255 means "repaint". Both

* apply the EXIF orientation (the same mapping as `PIL.ImageOps.exif_transpose`), so a phone photo
  comes out the way every viewer shows it;
* accept every mode Pillow decodes: '1', 'L', 'P' (with or without transparency), 'LA', 'La', 'PA',
  'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV', 16-bit greyscale ('I;16', 'I;16B',
  'I;16L', 'I;16N'), 32-bit 'I' and float 'F';
* read 16-bit-per-channel colour PNGs (48-bit RGB, 64-bit RGBA, 32-bit grey+alpha) at full
  precision: Pillow 13 opens them as 8-bit 'RGB'/'RGBA' by dropping the low byte, so those files
  are decoded again with OpenCV (`IMREAD_UNCHANGED`) and rounded to 8 bits;
* scale high-bit-depth values by the range of their type, not by the range found in the file:
  16-bit 0..65535 -> 0..255 (v * 255 / 65535, rounded), so a dark 16-bit scan stays dark;
* turn every problem with the file into a one-line `UserError` that names the file: not found, a
  folder, not an image, truncated or corrupt (the image is fully decoded inside the check, so a
  file cut short is caught here and not halfway through a generation), or larger than
  `max_pixels` (checked from the header, before anything is decoded).

`ImageFile.LOAD_TRUNCATED_IMAGES` is left alone: if a caller sets it, Pillow pads truncated images
instead of failing, and they are no longer reported.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from editsuite.errors import UserError

__all__ = ["DEFAULT_MAX_PIXELS", "open_image", "open_mask", "peek_size"]

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest image (width * height) opened without `--max-pixels`: 67,108,864 pixels."""

# EXIF Orientation value -> the transpose that undoes it (as in ImageOps.exif_transpose).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES_FOR_OPENCV = (2, 4, 6)  # RGB, grey+alpha, RGBA (16-bit grey is read fine by Pillow)

# Pillow keeps its own decompression-bomb limit in a module global; see _pillow_limit_at_least.
_PILLOW_LIMIT_LOCK = threading.Lock()


def open_image(
    src: str | Path | Image.Image, *, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open `src` as an 8-bit RGB image (mode 'RGB', values 0..255).

    `src` is a path or an already-open PIL image (which is not modified). Transparent pixels
    (RGBA, LA, PA, palette or greyscale/RGB with a transparency key) are composited over white.
    `what` ("image" or "mask") names the file in error messages. Images with more than
    `max_pixels` pixels (width * height) are refused.

    Raises `UserError` for anything wrong with the file.
    """
    im = _open_normalised(src, what=what, max_pixels=max_pixels)
    if im.mode in ("LA", "RGBA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def open_mask(src: str | Path | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `src` as an inpainting mask: mode 'L', 255 (white) = repaint, 0 (black) = keep.

    How the mask is read:

    * No alpha channel, or an alpha channel that is fully opaque: the grey value (colour images
      are converted with Pillow's ITU-R 601 luma; 16-bit values are scaled to 0..255).
    * An "alpha-only" mask - an alpha channel that is not fully opaque while every colour channel
      holds one constant value (what editors export when you erase a region to transparent):
      transparent means repaint, so the mask is 255 - alpha.
    * An alpha channel that is not fully opaque over colour that varies (e.g. white strokes on a
      transparent background): the colour is what carries the mask, so the alpha is ignored and
      the grey value is used as in the first case.

    Raises `UserError` for anything wrong with the file.
    """
    im = _open_normalised(src, what="mask", max_pixels=max_pixels)
    if im.mode in ("LA", "RGBA"):
        alpha = im.getchannel("A")
        colour = im.convert(im.mode[:-1])  # drops the alpha channel
        colour_is_constant = all(lo == hi for lo, hi in _band_extrema(colour))
        if alpha.getextrema() != (255, 255) and colour_is_constant:
            return ImageOps.invert(alpha)
        im = colour
    return im.convert("L")


# --------------------------------------------------------------------------------------------
# Decoding: path or image -> 8-bit 'L', 'LA', 'RGB' or 'RGBA', orientation applied.


def peek_size(src: str | Path, *, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the file's header alone, with the same checks and messages as `open_image`
    for a missing, unreadable or too large file: a batch refuses such inputs before the model loads."""
    path = Path(src)
    label = f"{what} '{path}'"
    with _open_header(path, label, max_pixels) as im:
        _check_pixels(im.size, label, max_pixels)
        return im.size


def _open_header(path: Path, label: str, max_pixels: int) -> Image.Image:
    try:
        exists, folder, regular = path.exists(), path.is_dir(), path.is_file()
    except OSError as exc:  # a name longer than the file system allows, a loop of links
        raise UserError(f"{label} cannot be read ({_reason(exc)})") from exc
    if not exists:
        raise UserError(f"{label} not found; check the path")
    if folder:
        raise UserError(f"{label} is a folder, not an image file")
    if not regular:  # a FIFO, socket or device: opening one can block forever
        raise UserError(f"{label} is not a regular file (a pipe or device?); save the image to a file first")

    try:
        with _pillow_limit_at_least(max_pixels):
            im = Image.open(path)
    except UnidentifiedImageError as exc:
        raise UserError(f"{label} is not an image Pillow can read (unrecognised file format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(_too_large_message(label, None, _pixels_from_pillow(exc), max_pixels)) from exc
    except PermissionError as exc:
        raise UserError(f"{label} cannot be read (permission denied)") from exc
    except Exception as exc:  # plugins raise SyntaxError, struct.error, EOFError, ... on bad headers
        raise UserError(f"{label} is not an image Pillow can read ({_reason(exc)})") from exc

    return im


def _open_normalised(src: str | Path | Image.Image, *, what: str, max_pixels: int) -> Image.Image:
    if isinstance(src, Image.Image):
        label = f"{what} (in-memory image)"
        _check_pixels(src.size, label, max_pixels)
        try:
            src.load()
            return _apply_orientation(_to_8bit(src, label), _orientation(src))
        except UserError:
            raise
        except Exception as exc:  # a lazily loaded image whose file turned out to be broken
            raise UserError(f"{label} cannot be decoded ({_reason(exc)})") from exc

    path = Path(src)
    label = f"{what} '{path}'"
    im = _open_header(path, label, max_pixels)
    with im:
        _check_pixels(im.size, label, max_pixels)  # header only: nothing decoded yet
        try:
            im.load()  # full decode, so truncation and corruption are caught here
            out = _decode_16bit_colour_png(path, im)
            if out is None:
                out = _to_8bit(im, label)
            return _apply_orientation(out, _orientation(im))
        except UserError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UserError(_too_large_message(label, im.size, None, max_pixels)) from exc
        except MemoryError as exc:
            raise UserError(f"{label} is too large to decode in the available memory") from exc
        except Exception as exc:
            raise UserError(f"{label} is truncated or corrupt ({_reason(exc)}); re-export it or use another file") from exc


def _to_8bit(im: Image.Image, label: str) -> Image.Image:
    """Any Pillow mode -> a new or copied 8-bit 'L', 'LA', 'RGB' or 'RGBA' image."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_GREY or mode in ("I", "F"):
        values = np.asarray(im)
        grey = Image.fromarray(_scale_to_8bit(values, mode))
        key = im.info.get("transparency")
        if isinstance(key, int) and mode != "F":  # a PNG tRNS grey key
            grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        return grey
    if mode in ("L", "LA", "RGB", "RGBA"):
        if mode in ("L", "RGB") and "transparency" in im.info:
            return im.convert(mode + "A")  # applies the tRNS colour key
        return im.copy()
    if mode == "1":
        return im.convert("L")
    if mode in ("La", "RGBa"):
        return im.convert(mode[:-1] + "A")  # un-premultiply
    target = "RGBA" if im.has_transparency_data else "RGB"  # P, PA, RGBX, CMYK, YCbCr, LAB, HSV
    try:
        return im.convert(target)
    except ValueError as exc:
        raise UserError(f"{label} uses colour mode {mode!r}, which cannot be converted to {target}; re-save it as RGB") from exc


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a high-bit-depth mode -> uint8.

    16-bit modes, and 'I' whose values fit 0..65535: 0..65535 -> 0..255. 'I' outside that range:
    its own min..max -> 0..255. 'F': 0..1 -> 0..255 when every value is within 0..1, used as is
    when within 0..255, otherwise its own min..max -> 0..255 (NaN -> 0).
    """
    if mode == "F":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            v = v * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    v = values.astype(np.int64)
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    if mode == "I" and not (lo >= 0 and hi <= 65535):
        return (((v - lo) * 255 + (hi - lo) // 2) // max(hi - lo, 1)).astype(np.uint8)
    return _uint16_to_uint8(v)


def _uint16_to_uint8(v: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v * 255 / 65535 == v / 257)."""
    return ((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _decode_16bit_colour_png(path: Path, im: Image.Image) -> Image.Image | None:
    """Full-precision 8-bit version of a 16-bit RGB / grey+alpha / RGBA PNG, else None.

    Pillow 13 opens these as 8-bit 'RGB'/'RGBA' keeping only the high byte of each sample; OpenCV
    reads the 16-bit samples, which are then rounded. If OpenCV cannot read the file, Pillow's
    (already validated) version is used instead.
    """
    if im.format != "PNG":
        return None
    with open(path, "rb") as f:
        header = f.read(26)
    # IHDR is always the first chunk: signature(8) length(4) "IHDR"(4) width(4) height(4) depth colour
    if len(header) < 26 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    if header[24] != 16 or header[25] not in _PNG_COLOUR_TYPES_FOR_OPENCV:
        return None
    import cv2  # only needed for this rare case

    try:
        raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if raw is None or raw.dtype != np.uint16 or raw.ndim != 3 or raw.shape[:2] != im.size[::-1]:
        return None
    rgb = _uint16_to_uint8(raw[..., 2::-1])  # BGR(A) -> RGB
    if raw.shape[2] == 4:
        alpha = _uint16_to_uint8(raw[..., 3])
    else:
        key = im.info.get("transparency")  # a tRNS colour key, in 16-bit sample values
        if not (isinstance(key, tuple) and len(key) == 3):
            return Image.fromarray(np.ascontiguousarray(rgb))
        alpha = np.where(np.all(raw[..., ::-1] == np.array(key, dtype=np.uint16), axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.dstack([rgb, alpha])))


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF does not make the pixels unusable
        return 1
    return value if isinstance(value, int) else 1


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    """Upright pixels, without the EXIF block: its orientation tag is spent, and passing the image back
    in (the CLI opens inputs once, then hands the images to the task) must not rotate it again."""
    method = _UNDO_ORIENTATION.get(orientation)
    out = im.transpose(method) if method is not None else im
    out.info.pop("exif", None)
    return out


def _band_extrema(im: Image.Image) -> list[tuple[int, int]]:
    extrema = im.getextrema()
    return [extrema] if im.mode == "L" else list(extrema)


# --------------------------------------------------------------------------------------------
# Size limit and messages.


@contextlib.contextmanager
def _pillow_limit_at_least(max_pixels: int) -> Iterator[None]:
    """While opening, make Pillow's own bomb guard no stricter than `max_pixels`.

    Pillow warns above `Image.MAX_IMAGE_PIXELS` (about 89 MP) and refuses above twice that; our
    check (with its clearer message) is the one that should decide, so a user who raises
    --max-pixels can open larger files. The global is raised under a lock and restored after.
    Pillow's warning is silenced meanwhile: it only fires above our limit, and `_check_pixels`
    then refuses the image with its size in the message.
    """
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and saved < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise UserError(_too_large_message(label, size, width * height, max_pixels))


def _too_large_message(label: str, size: tuple[int, int] | None, pixels: int | None, max_pixels: int) -> str:
    if size is not None:
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
        pixels = size[0] * size[1]
    elif pixels is not None:
        what = f"{pixels:,} pixels"
    else:
        what = "too many pixels"
    hint = f"--max-pixels {pixels}" if pixels is not None else "--max-pixels"
    return (
        f"{label} is {what}, over the limit of {max_pixels:,} pixels (a guard against "
        f"decompression bombs); if you trust the file, raise the limit with {hint}"
    )


def _pixels_from_pillow(exc: Exception) -> int | None:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
