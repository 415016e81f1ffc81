"""The embedded demo model family (base, inpainting, x4 upscaler), shipped inside the package.

`demo_model(kind)` is the folder of one member, or None while the family is not installed.
"""

from __future__ import annotations

from pathlib import Path

from editsuite.bundle.manifest import ModelKind

ROOT = Path(__file__).resolve().parent
FOLDERS = {ModelKind.BASE: "base", ModelKind.INPAINTING: "inpainting", ModelKind.UPSCALER: "upscaler"}


def demo_model(kind: ModelKind) -> Path | None:
    folder = ROOT / FOLDERS[kind]
    return folder if (folder / "model_index.json").is_file() else None
