"""Generation settings stored in output images.

Every PNG editsuite writes carries two text chunks:

* `parameters`: the AUTOMATIC1111 text, so the image's settings show up in the WebUI's "PNG Info"
  tab, in ComfyUI/InvokeAI importers and in online galleries:

      a photo of a cat
      Negative prompt: blurry
      Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: abcd1234, Model: sd15, Denoising strength: 0.75

* `editsuite`: `json.dumps(settings, sort_keys=True)`, every setting and the model identity, read
  back exactly by `read_settings`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from editsuite.errors import UserError

__all__ = ["SETTINGS_KEY", "a1111_parameters", "png_info", "png_settings", "read_settings"]

SETTINGS_KEY = "editsuite"
PARAMETERS_KEY = "parameters"


def a1111_parameters(settings: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text for `settings`.

    Keys read (all optional; missing or None values are left out, as A1111 does):
    `prompt`, `negative_prompt` (line omitted when empty), `steps`, `sampler` and `schedule_type`
    (A1111's labels, e.g. "DPM++ 2M" and "Karras"; a sampler A1111 does not know is left out, never
    replaced by a class name), `guidance_scale`, `seed`, `width` and `height` (written as "Size: WxH";
    `a1111_size` takes its place when given), `model_hash`, `model_name` (",", ":" and line breaks become "_": readers split on them even when
    quoted), `strength` (written as "Denoising strength", and only when `task` is not "txt2img"), and
    `extra`, a dict of further "Key: value" pairs appended in order (e.g. {"Mask blur": 4}).

    Values containing a comma, colon or newline are JSON-quoted, as A1111 does. Floats that are
    whole numbers are written without ".0" (7.0 -> "7").
    """
    fields: list[tuple[str, Any]] = [
        ("Steps", settings.get("steps")),
        ("Sampler", settings.get("sampler")),
        ("Schedule type", settings.get("schedule_type")),
        ("CFG scale", settings.get("guidance_scale")),
        ("Seed", settings.get("seed")),
    ]
    width, height = settings.get("width"), settings.get("height")
    size = f"{width}x{height}" if width is not None and height is not None else None
    fields.append(("Size", settings.get("a1111_size") or size))
    fields += [("Model hash", settings.get("model_hash")), ("Model", _plain(settings.get("model_name")))]
    if settings.get("task") != "txt2img":
        fields.append(("Denoising strength", settings.get("strength")))
    fields += list((settings.get("extra") or {}).items())

    params = ", ".join(
        key if key == value else f"{key}: {_quote(_format(value))}" for key, value in fields if value is not None
    )
    lines = [str(settings.get("prompt") or "")]
    negative = settings.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(params)
    # An empty prompt keeps its (empty) first line: A1111 strips it, and sd-prompt-reader then reads the
    # settings line as the prompt; A1111 and sd-parsers read the text either way.
    return "\n".join(lines).rstrip()


def png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """A PngInfo with the `parameters` chunk (A1111 text) and the `editsuite` chunk (JSON).

    Text that is not Latin-1 goes into an iTXt chunk (UTF-8), the rest into tEXt. Settings values
    JSON cannot represent (paths, numpy scalars, ...) are stored as strings.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(settings))
    info.add_text(SETTINGS_KEY, settings_json(settings))
    return info


def settings_json(settings: dict[str, Any]) -> str:
    """`json.dumps(settings, sort_keys=True)`, with non-JSON values written as strings."""
    return json.dumps(settings, sort_keys=True, default=_json_default)


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings dict stored by `png_info` in the image at `path`.

    Raises `UserError` if the file cannot be opened or carries no editsuite settings.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            text = im.info.get(SETTINGS_KEY)
            if text is None and hasattr(im, "text"):
                text = im.text.get(SETTINGS_KEY)  # chunks written after the image data
    except FileNotFoundError as exc:
        raise UserError(f"image '{path}' not found; check the path") from exc
    except Exception as exc:
        raise UserError(f"cannot read settings from '{path}' ({' '.join(str(exc).split())})") from exc
    if text is None:
        raise UserError(f"'{path}' has no editsuite settings (only PNGs written by editsuite carry them)")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the editsuite settings in '{path}' are not valid JSON ({exc})") from exc
    if not isinstance(settings, dict):
        raise UserError(f"the editsuite settings in '{path}' are not a JSON object")
    return settings


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _plain(name: Any) -> Any:
    """A name without the characters infotext readers split on (sd-parsers drops a quoted "a:b" value)."""
    return re.sub(r"\s*[,:\r\n]+\s*", "_", name) if isinstance(name, str) else name


def _quote(text: str) -> str:
    """A1111's infotext quoting: JSON-quote a value containing ',', ':' or a newline."""
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)


# Extra settings written into the A1111 `parameters` text under the keys AUTOMATIC1111 itself writes; the
# rest (outpaint sides, feather, the x4 upscaler's noise level, scale and tile size) has no A1111 key and
# stays in the JSON chunk only.
A1111_EXTRA = {"mask_blur": "Mask blur"}


def png_settings(settings: dict) -> dict:
    """Settings plus the keys the A1111 `parameters` text reads (model name and hash, extras)."""
    model = settings.get("model", {})
    extra = {label: settings[k] for k, label in A1111_EXTRA.items() if settings.get(k) not in (None, False, 0)}
    if model.get("vae"):
        extra["VAE"] = _plain(model["vae"])
    if settings.get("refiner"):  # A1111's own keys for a refiner run
        extra["Refiner"] = _plain(settings["refiner"].get("name") or "refiner")
        extra["Refiner switch at"] = settings.get("refiner_switch")
    if settings.get("invert_mask"):
        extra["Mask mode"] = "Inpaint not masked"
    if settings.get("only_masked"):
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = settings.get("padding")
    out = {**settings, "model_name": model.get("name"), "model_hash": model.get("model_hash"), "extra": extra}
    if settings.get("tile_size"):  # A1111's "SD upscale" script: Size is the tile's, the picture is Lanczos'
        extra.update({"SD upscale overlap": settings.get("overlap"), "SD upscale upscaler": "Lanczos"})
        out["a1111_size"] = "x".join(map(str, settings["tile_size"]))
    return out
