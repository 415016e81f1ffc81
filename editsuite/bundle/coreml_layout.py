"""The Core ML bundle format: Apple's layout (ml-stable-diffusion), with editsuite's extras beside it.

A bundle is a folder of Core ML models named as Apple's tools name them:

- `.mlpackage`s as Apple's converter and Python pipeline name them:
  `Stable_Diffusion_version_<model version, / as _>_<component>.mlpackage`, component one of
  text_encoder, text_encoder_2, unet, unet_chunk1, unet_chunk2, vae_encoder, vae_decoder;
- or compiled `.mlmodelc` folders as Apple's Swift pipeline and Mochi Diffusion open them
  (`TextEncoder.mlmodelc`, `Unet.mlmodelc`, `UnetChunk1.mlmodelc`, ..., usually in `Resources/`).

What the models take and give is read from each model's own description (names, dtypes, shapes,
enumerated shapes): Apple's contract is TextEncoder `input_ids` float32 (1, 77) -> `last_hidden_state`,
`pooled_outputs`; Unet `sample`, `timestep`, `encoder_hidden_states` (2, D, 1, 77) fp16 -> `noise_pred`;
VAEEncoder `x` -> `latent` (mean and log-variance); VAEDecoder `z` -> `image`. editsuite adds, beside the
models, `coreml-manifest.json` (the model's identity and the conversion settings), `tokenizer/`,
`scheduler/` and `vocab.json`/`merges.txt` (what Apple's Swift tokenizer reads), and writes the model kind,
prediction type, latent scale and VAE factor into each package's user-defined metadata.

This module only names and describes; `coreml_backend` runs the models and `convert.coreml` writes them.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

from editsuite.errors import UserError

MANIFEST = "coreml-manifest.json"
FORMAT = 2  # 1: editsuite's own names and layout (before Apple's); not read any more

# component (Apple's Python file-name suffix) -> the compiled resource name Apple's Swift pipeline opens
SWIFT_NAMES = {
    "text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "unet": "Unet", "unet_chunk1": "UnetChunk1",
    "unet_chunk2": "UnetChunk2", "vae_encoder": "VAEEncoder", "vae_decoder": "VAEDecoder",
}
PREFIX = "Stable_Diffusion_version_"
_PACKAGE = re.compile(rf"^{PREFIX}(?P<version>.+)_(?P<part>{'|'.join(sorted(SWIFT_NAMES, key=len, reverse=True))})"
                      r"\.mlpackage$")
# where Apple's folders keep their models: the folder itself, the converter's Swift resources, or the
# `packages/` and `compiled/` folders of Apple's published repositories
SUBFOLDERS = ("", "Resources", "packages", "compiled")

# user-defined metadata keys editsuite writes into every package (values are strings)
META_KIND = "com.github.editsuite.model_kind"
META_PREDICTION = "com.github.editsuite.prediction_type"
META_LATENT_SCALE = "com.github.editsuite.latent_scale"
META_VAE_FACTOR = "com.github.editsuite.vae_scale_factor"

_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32"}  # ArrayFeatureType codes


def package_name(model_version: str, component: str) -> str:
    """Apple's file name for a package: what its Python pipeline looks for given `--model-version`."""
    return f"{PREFIX}{model_version}_{component}.mlpackage".replace("/", "_")


def model_version_of(name: str) -> str:
    """A model version string for file names: letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # float16, float32, int32
    shapes: tuple[tuple[int, ...], ...]  # the allowed shapes, the default first; () when not stated

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0] if self.shapes else ()


@dataclasses.dataclass(frozen=True)
class Description:
    """What one Core ML model takes and gives, as its own description says."""

    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    metadata: dict[str, str]  # user-defined metadata
    version: str = ""


@dataclasses.dataclass(frozen=True)
class Models:
    """The Core ML models found in a folder: component -> path, all `.mlpackage` or all `.mlmodelc`."""

    root: Path  # the folder the user named (where editsuite's manifest and support files are)
    folder: Path  # where the models are
    paths: dict[str, Path]
    compiled: bool
    model_version: str = ""

    @property
    def unet_parts(self) -> list[str]:
        # chunks first, as Apple's Swift pipeline does: a folder with both runs the chunks
        if "unet_chunk1" in self.paths and "unet_chunk2" in self.paths:
            return ["unet_chunk1", "unet_chunk2"]
        return ["unet"] if "unet" in self.paths else []


def _packages_in(folder: Path) -> dict[str, dict[str, Path]]:
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.glob(f"{PREFIX}*.mlpackage")):
        m = _PACKAGE.match(p.name)
        if m and p.is_dir():
            found.setdefault(m["version"], {})[m["part"]] = p
    return found


def find_models(root: str | Path) -> Models | None:
    """The Core ML models in `root` (or its Resources/, packages/ or compiled/ folder), or None if none."""
    root = Path(root)
    for sub in SUBFOLDERS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        versions = _packages_in(folder)
        if len(versions) > 1:
            raise UserError(f"{folder} holds the packages of several models ({', '.join(sorted(versions))}); "
                            "keep one model's packages per folder")
        if versions:
            version, paths = next(iter(versions.items()))
            return Models(root, folder, paths, compiled=False, model_version=version)
        compiled = {c: folder / f"{n}.mlmodelc" for c, n in SWIFT_NAMES.items() if (folder / f"{n}.mlmodelc").is_dir()}
        if compiled:
            return Models(root, folder, compiled, compiled=True)
    return None


def is_coreml_folder(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or find_models(path) is not None)


def describe(path: Path) -> Description:
    """The description of one model: from the package's spec, or a compiled model's metadata.json."""
    if path.suffix == ".mlmodelc":
        return _describe_compiled(path)
    from editsuite.bundle.mil_executor import import_coremltools

    ct = import_coremltools()
    if not (path / "Manifest.json").is_file():
        raise UserError(f"{path} is not a complete Core ML package (no Manifest.json); convert it again")
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:  # protobuf raises several types for a damaged file
        raise UserError(f"{path} cannot be read as a Core ML package ({type(e).__name__}); convert it again") from None
    d = spec.description

    def tensor(feature) -> Tensor:
        t = feature.type.multiArrayType
        shapes = [tuple(int(v) for v in s.shape) for s in t.enumeratedShapes.shapes]
        default = tuple(int(v) for v in t.shape)
        if default and default in shapes:
            shapes.remove(default)
        ordered = ([default] if default else []) + shapes
        return Tensor(feature.name, _DTYPES.get(t.dataType, str(t.dataType)), tuple(ordered))

    return Description({f.name: tensor(f) for f in d.input}, {f.name: tensor(f) for f in d.output},
                       dict(d.metadata.userDefined), d.metadata.versionString)


def _describe_compiled(path: Path) -> Description:
    """A compiled model's `metadata.json` (written by Apple's compiler; Mochi Diffusion reads the same
    file): a one-element list whose inputSchema/outputSchema entries give name, dataType and shape."""
    meta = path / "metadata.json"
    try:
        data = json.loads(meta.read_text())
        entry = data[0] if isinstance(data, list) else data

        def tensor(item: dict) -> Tensor:
            shape = tuple(int(v) for v in ast.literal_eval(item.get("shape", "[]")))
            return Tensor(item["name"], str(item.get("dataType", "Float32")).lower(), (shape,) if shape else ())

        return Description({i["name"]: tensor(i) for i in entry.get("inputSchema", [])},
                           {o["name"]: tensor(o) for o in entry.get("outputSchema", [])},
                           {str(k): str(v) for k, v in (entry.get("userDefinedMetadata") or {}).items()},
                           str(entry.get("version", "")))
    except (OSError, ValueError, KeyError, TypeError, IndexError, SyntaxError) as e:
        raise UserError(f"{meta} cannot be read ({type(e).__name__}); is {path.name} a complete compiled model?") \
            from None


def read_manifest(root: Path) -> dict | None:
    """editsuite's manifest of a bundle it converted (a JSON object, not yet checked: `check_manifest`), or
    None (Apple's bundles have none)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); remove it or convert into another folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not an editsuite manifest; remove it or convert into another folder")
    return data


_MODEL_FIELDS = {  # editsuite's manifest "model": field -> (types, required)
    "kind": (str, True), "unet_in_channels": (int, True), "latent_channels": (int, True),
    "prediction_type": (str, True), "scaling_factor": ((int, float), True), "vae_scale_factor": (int, True),
    "native_resolution": (int, True), "cross_attention_dim": (int, True), "scheduler": (str, True),
    "name": (str, False), "model_hash": (str, False), "source": (str, False), "max_noise_level": ((int, type(None)), False),
    "family": (str, False), "force_zeros_for_empty_prompt": (bool, False), "vae": (str, False),
    "requires_aesthetics_score": (bool, False),
}


def check_manifest(data: dict, root: Path, *, complete: bool = True) -> dict:
    """editsuite's manifest, every field checked (a damaged or hand-edited one is a one-line error, never a
    traceback); returns it. With `complete` (a bundle to open) also checks that the packages it lists and
    scheduler/ are there; a conversion that resumes checks only the fields, and redoes what is missing."""
    import math

    from editsuite.imaging.output import MAX_SIDE

    path = Path(root) / MANIFEST

    def bad(what: str):
        raise UserError(f"{path}: {what}; convert the model again into a new folder (or with --overwrite)")

    if data.get("format") != FORMAT:
        if isinstance(data.get("format"), int) and data["format"] < FORMAT:
            raise UserError(f"{root} was converted by an older editsuite, before bundles took Apple's layout; "
                            f"convert it again with `editsuite convert MODEL -o {root} --overwrite`")
        bad(f"format {data.get('format')!r} is not {FORMAT}")
    model, settings, packages = data.get("model"), data.get("settings"), data.get("packages")
    if not isinstance(model, dict) or not isinstance(settings, dict) or not isinstance(packages, dict):
        bad("'model', 'settings' and 'packages' must be JSON objects")
    extra = sorted(set(model) - set(_MODEL_FIELDS))
    if extra:
        bad(f"unknown field model.{extra[0]}")
    for key, (types, required) in _MODEL_FIELDS.items():
        if key not in model:
            if required:
                bad(f"model.{key} is missing")
            continue
        if not isinstance(model[key], types) or (isinstance(model[key], bool) and types is not bool):
            bad(f"model.{key} has the wrong type ({type(model[key]).__name__})")
    if model["kind"] not in ("base", "inpainting", "x4-upscaler"):
        bad(f"model.kind {model['kind']!r} is not base, inpainting or x4-upscaler")
    if model.get("family", "sd") not in ("sd", "sdxl"):
        bad(f"model.family {model['family']!r} is not sd or sdxl")
    if model["prediction_type"] not in ("epsilon", "v_prediction"):
        bad(f"model.prediction_type {model['prediction_type']!r} is not epsilon or v_prediction")
    if not (math.isfinite(model["scaling_factor"]) and 0 < model["scaling_factor"] < 100):
        bad(f"model.scaling_factor {model['scaling_factor']!r} is out of range")
    for key in ("unet_in_channels", "latent_channels", "cross_attention_dim", "native_resolution"):
        if not 0 < model[key] <= 1 << 16:
            bad(f"model.{key} {model[key]} is out of range")
    if model["vae_scale_factor"] not in (1, 2, 4, 8, 16, 32):
        bad(f"model.vae_scale_factor {model['vae_scale_factor']} is not a power of two up to 32")
    sizes = settings.get("resolutions")
    if not isinstance(sizes, list) or not sizes or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            for r in sizes):
        bad("settings.resolutions must be a list of [width, height] pairs")
    for w, h in sizes:
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            bad(f"resolution {w}x{h} is out of range (1 to {MAX_SIDE} pixels a side)")
    if not isinstance(settings.get("chunk_unet", False), bool):
        bad("settings.chunk_unet must be true or false")
    for key, entry in packages.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file:
            bad(f"the package {key} has no plain file name ({file!r})")
        if complete and not (Path(root) / file).is_dir():
            bad(f"the package {key} it lists ({file}) is missing")
    if complete and not (Path(root) / "scheduler" / "scheduler_config.json").is_file():
        bad("scheduler/scheduler_config.json is missing")
    return data
