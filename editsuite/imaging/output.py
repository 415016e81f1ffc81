"""Writing results: choosing output names, and saving without ever leaving a half-written file.

* `output_paths` decides every output name before the model runs, so a bad `-o` or a file that
  would be overwritten is reported before minutes of generation, not after.
* `save_atomic` writes to a hidden temporary file in the target folder, fsyncs it and then moves
  it into place in one step: readers (and a crash) see either no file or the whole file. Without
  `overwrite` it never replaces an existing file, even one created while it was writing.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from PIL import ExifTags, Image, PngImagePlugin

from editsuite.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "output_paths", "plan_outputs", "save_atomic"]

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output extensions (lower case) and the Pillow format each one is written in."""

# Image extensions we recognise but cannot write: `-o out.tiff` is a mistake, not a folder name.
_OTHER_IMAGE_EXTENSIONS = {".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".exr", ".psd"}

_MODES_KEPT = {"PNG": {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}, "JPEG": {"L", "RGB"}, "WEBP": {"RGB", "RGBA"}}
_JPEG_QUALITY = 95
_WEBP_QUALITY = 95
_EXIF_LIMIT = 65000  # a JPEG APP1 segment holds at most 65533 bytes


def save_atomic(
    image: Image.Image,
    path: str | Path,
    *,
    pnginfo: PngImagePlugin.PngInfo | None = None,
    overwrite: bool = False,
    temp_prefix: str = ".",
) -> Path:
    """Save `image` to `path` atomically and return the path written.

    The format follows the extension: .png (also used, and appended, when `path` has no
    extension), .jpg/.jpeg (quality 95) or .webp (quality 95); any other extension is a
    `UserError`. `pnginfo` is written as is into a PNG; for JPEG and WebP its `parameters` text
    goes into the EXIF UserComment (skipped if it does not fit in EXIF). Transparency is
    composited over white for JPEG. Missing parent folders are created.

    Without `overwrite`, an existing `path` is a `UserError` raised before anything is written,
    and the final step (a hard link, which fails if the name exists) cannot replace a file that
    appeared meanwhile. With `overwrite`, the file is replaced in one step (`os.replace`). The
    temporary file is removed whatever fails. `temp_prefix` names it, so that a caller can later tell its
    own leftovers (after a kill) from anyone else's files.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    fmt = _format_for(path)
    _check_name_length(path)
    if path.is_dir():
        raise UserError(f"output '{path}' is a folder; give a file name ending in {_allowed()}")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise _exists_error(path)

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder '{folder}' ({_reason(exc)})") from exc
    image = _prepare_mode(image, fmt)
    params = _save_params(fmt, pnginfo)

    try:
        tmp = tempfile.NamedTemporaryFile(dir=folder, delete=False, prefix=temp_prefix, suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write to folder '{folder}' ({_reason(exc)})") from exc
    tmp_path = Path(tmp.name)
    try:
        with tmp:
            image.save(tmp, format=fmt, **params)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # NamedTemporaryFile creates 0600 files
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _move_no_clobber(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, permissions, ...
            raise UserError(f"cannot write '{path}' ({_reason(exc)})") from exc
        raise
    _fsync_folder(folder)
    return path


DEFAULT_MAX_OUTPUT_PIXELS = 4096 * 4096  # a run's pictures, all together: 64 of 512x512, one of 4096x4096
MAX_SIDE = 16384


def check_writable(folder: str | Path) -> None:
    """Refuse, before anything loads, an output folder that cannot be written: on a read-only file system,
    without write permission, or under a file. Writes nothing (the folder is made when the first file is
    saved); the nearest existing folder up the path is the one asked."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"cannot write to '{folder}': '{existing}' is a file, not a folder; choose another -o")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        read_only = False
    why = "it is on a read-only file system" if read_only else "permission denied"
    raise UserError(f"cannot write to '{folder}' ({why}); choose another output folder with -o")


def check_output_size(sizes: list[tuple[int, int]], n: int, limit: int) -> None:
    """Refuse, before anything loads, a run whose pictures would not fit: each side at most MAX_SIDE, and
    `n` images of each size at most `limit` pixels in all (the loop holds a run's images at once)."""
    for w, h in sizes:
        if max(w, h) > MAX_SIDE:
            raise UserError(f"the output would be {w}x{h} pixels; at most {MAX_SIDE} a side")
        if w * h * n > limit:
            raise UserError(f"the output would be {n} x {w}x{h} = {w * h * n:,} pixels, over the bound of {limit:,}; "
                            "ask for fewer or smaller pictures, or raise the bound (--max-output-pixels; "
                            "max_output_pixels in a recipe or a task)")


def output_paths(
    out: str | Path | None,
    *,
    task: str,
    seeds: list[int],
    inputs: list[Path] | None,
    n_per_input: int,
    overwrite: bool,
) -> list[Path]:
    """The output path of every image a run will write, in order.

    The run writes `n_per_input` images for each of `inputs` (input-major order), or
    `n_per_input` images when `inputs` is None or empty (txt2img). `seeds` gives the seed of each
    image: either one per image (len == total) or one per image of an input, reused for every
    input (len == n_per_input).

    Where they go:

    * `out` None: the current folder.
    * One output and `out` ending in .png/.jpg/.jpeg/.webp (and not an existing folder): exactly
      `out`; if it exists and `overwrite` is False, a `UserError` now, before the model runs.
    * Otherwise `out` is a folder (created when saving). With several outputs, an `out` that is an
      existing file or ends in an image extension is a `UserError`.

    Names in a folder are `{input stem}-{task}-{seed}-{counter:04d}.png` (no input stem without
    inputs), with one counter for the whole run: the first number from 1 up for which none of
    the run's names exists, so nothing is overwritten and a run's files share a counter. Two
    outputs that would share a name (same input stem and seed) take consecutive counters. With
    `overwrite` the counter is always 1, so re-running replaces the previous run's files.
    """
    if n_per_input < 1:
        raise ValueError(f"n_per_input must be at least 1, got {n_per_input}")
    stems: list[str | None] = [Path(p).stem for p in inputs] if inputs else [None]
    total = len(stems) * n_per_input
    if len(seeds) == total:
        run_seeds = list(seeds)
    elif len(seeds) == n_per_input:
        run_seeds = list(seeds) * len(stems)
    else:
        raise ValueError(f"got {len(seeds)} seeds for {total} outputs ({len(stems)} input(s) x {n_per_input})")
    several = total > 1

    folder = Path(".") if out is None else Path(out)
    _check_name_length(folder)
    if out is not None and not folder.is_dir():
        suffix = folder.suffix.lower()
        if several and (suffix in IMAGE_EXTENSIONS or folder.exists()):
            raise UserError(f"-o must be a folder when there are several outputs ({total}); got '{folder}'")
        if suffix in IMAGE_EXTENSIONS:
            if not overwrite and (folder.exists() or folder.is_symlink()):
                raise _exists_error(folder)
            return [folder]
        if suffix in _OTHER_IMAGE_EXTENSIONS:
            raise UserError(f"-o '{folder}': cannot write {suffix} files; use {_allowed()}")
        if folder.exists():
            raise UserError(f"-o '{folder}' is an existing file, not a folder; give a folder or a file name ending in {_allowed()}")

    # Each output's name without the counter; repeats get consecutive counters.
    run_stems = [stem for stem in stems for _ in range(n_per_input)]
    bases = [f"{task}-{seed}" if stem is None else f"{stem}-{task}-{seed}" for stem, seed in zip(run_stems, run_seeds)]
    seen: Counter[str] = Counter()
    offsets = []
    for base in bases:
        offsets.append(seen[base])
        seen[base] += 1

    def names(counter: int) -> list[Path]:
        return [folder / f"{base}-{counter + offset:04d}.png" for base, offset in zip(bases, offsets)]

    for p in names(1):  # long input names make long output names
        _check_name_length(p)
    counter = 1
    while not overwrite and any(p.exists() or p.is_symlink() for p in names(counter)):
        counter += 1
    return names(counter)


plan_outputs = output_paths  # the same helper, under the name used in the design notes


# --------------------------------------------------------------------------------------------


def _check_name_length(path: Path) -> None:
    size = len(path.name.encode("utf-8", "surrogateescape"))
    if size > 255:  # asking the file system about it would raise ENAMETOOLONG
        raise UserError(f"output name '{path.name[:40]}...' is {size} bytes long; file systems allow 255: give a "
                        "shorter -o")


def _format_for(path: Path) -> str:
    fmt = IMAGE_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write '{path}': unknown extension '{path.suffix}'; use {_allowed()}")
    return fmt


def _allowed() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def _exists_error(path: Path) -> UserError:
    return UserError(f"'{path}' exists; pass --overwrite to replace it, or choose another -o")


def _prepare_mode(image: Image.Image, fmt: str) -> Image.Image:
    """Convert `image` to a mode `fmt` can store (alpha composited over white for JPEG)."""
    if image.mode in _MODES_KEPT[fmt]:
        return image
    has_alpha = image.has_transparency_data
    if fmt == "JPEG" and has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGBA" if has_alpha else "RGB")


def _save_params(fmt: str, pnginfo: PngImagePlugin.PngInfo | None) -> dict:
    if fmt == "PNG":
        return {"pnginfo": pnginfo} if pnginfo is not None else {}
    params: dict = {"quality": _JPEG_QUALITY if fmt == "JPEG" else _WEBP_QUALITY}
    text = _png_text(pnginfo, "parameters") if pnginfo is not None else None
    if text:
        exif = _exif_with_user_comment(text)
        if exif is not None:
            params["exif"] = exif
    return params


def _png_text(pnginfo: PngImagePlugin.PngInfo, key: str) -> str | None:
    """The value of the tEXt/zTXt/iTXt chunk named `key` in `pnginfo`, or None."""
    for cid, data, _after_idat in pnginfo.chunks:
        name, _, rest = data.partition(b"\0")
        if name != key.encode("latin-1"):
            continue
        try:
            if cid == b"tEXt":
                return rest.decode("latin-1")
            if cid == b"zTXt":
                return zlib.decompress(rest[1:]).decode("latin-1")
            if cid == b"iTXt":
                compressed, _method, rest = rest[0], rest[1], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                return (zlib.decompress(text) if compressed else text).decode("utf-8")
        except (IndexError, zlib.error, UnicodeDecodeError):
            return None
    return None


def _exif_with_user_comment(text: str) -> bytes | None:
    """EXIF bytes whose UserComment holds `text` (ASCII, or UCS-2 big-endian as A1111 writes
    it; Pillow writes big-endian EXIF), or None when it would not fit in a JPEG's EXIF segment."""
    if text.isascii():
        comment = b"ASCII\0\0\0" + text.encode("ascii")
    else:
        comment = b"UNICODE\0" + text.encode("utf-16-be")
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    data = exif.tobytes()
    return data if len(data) <= _EXIF_LIMIT else None


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`, failing with UserError if `path` exists (even if created just now)."""
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    except FileExistsError as exc:
        raise _exists_error(path) from exc
    except OSError:
        # No hard links here (FAT, some network drives): reserve the name exclusively, then
        # replace our own empty placeholder in one step.
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError as exc:
            raise _exists_error(path) from exc
        os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    os.unlink(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
