"""The embedded demo model family (base, inpainting, x4 upscaler), shipped inside the package.

`demo_model(kind)` is the folder of one member, or None while the family is not installed.
"""

from __future__ import annotations

from pathlib import Path

from editsuite.bundle.manifest import ModelKind

ROOT = Path(__file__).resolve().parent
FOLDERS = {ModelKind.BASE: "base", ModelKind.INPAINTING: "inpainting", ModelKind.UPSCALER: "upscaler"}
# the member each task uses when no model is given
TASK_KIND = {"txt2img": ModelKind.BASE, "img2img": ModelKind.BASE, "inpaint": ModelKind.INPAINTING,
             "outpaint": ModelKind.BASE, "upscale": ModelKind.UPSCALER}
NOT_INSTALLED = ("no --model given and the built-in demo model is not installed; pass --model with a diffusers "
                 "folder, a .safetensors checkpoint or a hub id")
NOTICE = ("using the built-in demo model ({kind}): it only knows simple shapes and colours; pass --model for a real "
          "Stable Diffusion checkpoint")


def demo_model(kind: ModelKind) -> Path | None:
    folder = ROOT / FOLDERS[kind]
    return folder if (folder / "model_index.json").is_file() else None
