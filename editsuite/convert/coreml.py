"""`editsuite convert`: a model bundle -> a Core ML bundle in Apple's layout (build time; needs coremltools).

OUT/
  Stable_Diffusion_version_<V>_text_encoder.mlpackage   input_ids (1, 77) float32 -> last_hidden_state,
                                                         pooled_outputs (SDXL: hidden_embeds, pooled_outputs)
  Stable_Diffusion_version_<V>_text_encoder_2.mlpackage SDXL's second text encoder (OpenCLIP), the same I/O
  Stable_Diffusion_version_<V>_unet.mlpackage           or _unet_chunk1/_unet_chunk2 with --chunk-unet
  Stable_Diffusion_version_<V>_vae_encoder.mlpackage    x -> latent
  Stable_Diffusion_version_<V>_vae_decoder.mlpackage    z -> image
  vocab.json, merges.txt     the CLIP tokenizer as Apple's Swift pipeline reads it
  coreml-manifest.json       what the bundle is: the model's identity, the settings, the packages
  tokenizer/ (SDXL: and tokenizer_2/), scheduler/ (and low_res_scheduler/ for the x4 upscaler)
  Resources/*.mlmodelc       with --compile (macOS): what Apple's Swift CLI and Mochi Diffusion open

<V> is the model version (`--model-version`, default the model's name), as Apple's converter and Python
pipeline name their files; names, dtypes and shapes are Apple's (see `bundle.coreml_layout`). Each package
is written under a temporary name and renamed when complete, and the manifest records it, so running the
same command again skips what is finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from editsuite.bundle.coreml_layout import (FORMAT, MANIFEST, META_KIND, META_LATENT_SCALE, META_PREDICTION,
                                            META_VAE_FACTOR, SWIFT_NAMES, model_version_of, package_name,
                                            check_manifest, read_manifest)
from editsuite.bundle.coreml_backend import on_macos
from editsuite.bundle.mil_executor import import_coremltools
from editsuite.errors import UserError

UNET_BATCH = 2  # the UNet runs the unconditional and conditional halves of guidance together
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
QUANTIZE_BITS = (8, 6, 4)
WEIGHT_THRESHOLD = 2048  # smaller constants (norms, biases) stay fp16, as coremltools does by default

DESCRIPTIONS = {
    "input_ids": "CLIP token ids as float32, padded to 77",
    "last_hidden_state": "text encoder hidden states (the UNet's context)",
    "hidden_embeds": "the text encoder's penultimate hidden states (SDXL's UNet context)",
    "time_ids": "SDXL size conditioning: original size, crop top-left, target size (refiner: aesthetic score)",
    "text_embeds": "the second text encoder's pooled, projected embedding (SDXL)",
    "pooled_outputs": "text encoder output pooled at the end-of-text token",
    "sample": "noisy latents, with the model's extra channels (mask, masked-image latents or low-res image)",
    "timestep": "diffusion timestep, one per batch item",
    "encoder_hidden_states": "text encoder hidden states (B, D, 1, 77): unconditional then conditional",
    "class_labels": "noise level of the low-resolution image (x4 upscaler)",
    "noise_pred": "the UNet's prediction (noise or v, as the model's prediction type)",
    "hidden_states": "UNet activations between the two chunks",
    "temb": "time embedding, passed from chunk 1 to chunk 2",
    "image": "pixels in [-1, 1], RGB",
    "latent": "VAE posterior: mean and log-variance on the channel axis, unscaled",
    "x": "pixels in [-1, 1], RGB",
    "z": "unscaled latents (divide scaled latents by the scaling factor first)",
}
# inputs Apple's pipelines pass as fp16 (its Python pipeline refuses any other dtype); the rest are float32,
# as are the VAE's inputs for SDXL, whose VAE overflows fp16 (Apple converts it so, computing in float32)
HALF_INPUTS = {"sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds", "x", "z"}


@dataclasses.dataclass(frozen=True)
class Settings:
    resolutions: tuple[tuple[int, int], ...]  # (width, height) in pixels
    attention: str = "split-einsum"
    quantize_bits: int | None = None
    chunk_unet: bool = False

    model_version: str = ""

    def to_dict(self) -> dict:
        return {"resolutions": [list(r) for r in self.resolutions], "attention": self.attention,
                "quantize_bits": self.quantize_bits, "chunk_unet": self.chunk_unet,
                "model_version": self.model_version}


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--resolution {text!r} is not WIDTHxHEIGHT; write it like 512x512") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--resolution {text!r} must be positive; write it like 512x512")
    return w, h


def check_resolutions(resolutions, vae_factor: int, down: int) -> None:
    """Pixel sizes must give latents the UNet can halve `down` times."""
    step = vae_factor * 2**down
    for w, h in resolutions:
        if w % step or h % step:
            raise UserError(f"resolution {w}x{h} is not a multiple of {step} (VAE factor {vae_factor} x UNet "
                            f"downsampling {2**down}); use e.g. {w // step * step or step}x{h // step * step or step}")


def parts(chunk_unet: bool, xl: bool = False) -> dict[str, list[str]]:
    """The packages of each component, by Apple's component names (SDXL's text encoder component is both of
    its encoders; a refiner has the second alone, `_spec` skips what the model lacks)."""
    return {"text_encoder": ["text_encoder", "text_encoder_2"] if xl else ["text_encoder"], "unet": ["unet_chunk1", "unet_chunk2"] if chunk_unet else ["unet"],
            "vae_encoder": ["vae_encoder"], "vae_decoder": ["vae_decoder"]}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))


# -- the modules and their example inputs ------------------------------------------------------------------

def _spec(bundle, name: str, settings: Settings):
    """(torch module, example inputs, per-resolution shapes of the varying inputs) for one package."""
    from editsuite.convert.modules import TextEncoder, TextEncoderXL, Unet, VAEDecoder, VAEEncoder

    b, m = bundle.backend, bundle.manifest
    f = m.vae_scale_factor
    lat = [(h // f, w // f) for w, h in settings.resolutions]
    pix = [(h, w) for w, h in settings.resolutions]
    g = torch.Generator().manual_seed(0)
    if name == "text_encoder":
        module = TextEncoderXL(b.text_encoder) if m.xl else TextEncoder(b.text_encoder)
        return module, {"input_ids": torch.zeros(1, 77)}, None
    if name == "text_encoder_2":
        return TextEncoderXL(b.text_encoder_2), {"input_ids": torch.zeros(1, 77)}, None
    if name == "vae_encoder":
        return VAEEncoder(b.vae), {"x": torch.zeros(1, 3, *pix[0])}, {"x": [(1, 3, *p) for p in pix]}
    if name == "vae_decoder":
        return (VAEDecoder(b.vae), {"z": torch.zeros(1, m.latent_channels, *lat[0])},
                {"z": [(1, m.latent_channels, *s) for s in lat]})
    part = {"unet": None, "unet_chunk1": 1, "unet_chunk2": 2}[name]
    module = Unet(b.unet_model, settings.attention, part=part)
    n = UNET_BATCH
    head = {"sample": torch.randn(n, m.unet_in_channels, *lat[0], generator=g),
            "timestep": torch.full((n,), 500.0),
            "encoder_hidden_states": torch.randn(n, m.cross_attention_dim, 1, 77, generator=g)}
    if module.xl:
        config = b.unet_model.config
        time_ids = example_time_ids(m)
        head["time_ids"] = torch.tensor([time_ids] * n)
        pooled = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim * len(time_ids)
        head["text_embeds"] = torch.randn(n, pooled, generator=g)
    if "class_labels" in module.inputs:
        head["class_labels"] = torch.full((n,), 20, dtype=torch.int32)
    if part != 2:
        return module, head, {"sample": [(n, m.unet_in_channels, *s) for s in lat]}
    first = Unet(b.unet_model, settings.attention, part=1)
    shapes_by_res = []
    for i, s in enumerate(lat):  # chunk 1 at every size: its outputs' shapes, and the example inputs
        probe = head if i == 0 else dict(head, sample=torch.zeros(n, m.unet_in_channels, *s))
        with torch.no_grad():
            out = first(*probe.values())
        mids = out if i == 0 else mids
        shapes_by_res.append([tuple(t.shape) for t in out])
    names = list(first.outputs)
    inputs = {"hidden_states": mids[0], "temb": mids[1], "encoder_hidden_states": head["encoder_hidden_states"]}
    inputs |= {k: t for k, t in zip(names[2:], mids[2:])}
    varying = {k: [shapes[i] for shapes in shapes_by_res] for i, k in enumerate(names)}
    return module, inputs, varying


def example_time_ids(manifest) -> list[float]:
    """SDXL's size conditioning for a picture of the native size, uncropped (the refiner: score 6): what
    conversion traces with and verify feeds."""
    side = float(manifest.native_resolution)  # original size, crop top-left, target size (refiner: a score)
    return [side, side, 0.0, 0.0] + ([6.0] if manifest.refiner else [side, side])


def _convert_one(ct, module, inputs: dict, varying: dict | None, outputs: tuple[str, ...], bits: int | None,
                 description: str, metadata: dict[str, str], model_version: str, float32: bool = False):
    """`float32`: inputs and compute in float32 (SDXL's VAE, which overflows fp16, as Apple converts it)."""
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants: intended here
        traced = torch.jit.trace(module, tuple(inputs.values()), check_trace=False)
    ct_inputs = []
    n_varying = sum(1 for shapes in (varying or {}).values() if len(set(shapes)) > 1)
    for name, value in inputs.items():
        shapes = (varying or {}).get(name)
        if shapes and len(set(shapes)) > 1:
            shape = ct.EnumeratedShapes(shapes=[list(s) for s in shapes], default=list(value.shape))
        else:
            shape = tuple(value.shape)
        ct_inputs.append(ct.TensorType(name=name, shape=shape, dtype=_input_dtype(name, value, float32)))
    with _fast_fp16_overflow_check():
        mlmodel = ct.convert(
            # outputs float32, as Apple's packages give them (Swift and Python read them as Float32)
            traced, inputs=ct_inputs, outputs=[ct.TensorType(name=o, dtype=np.float32) for o in outputs],
            convert_to="mlprogram", compute_precision=ct.precision.FLOAT32 if float32 else ct.precision.FLOAT16,
            # Core ML allows enumerated shapes on several inputs (chunk 2 at several sizes) from macOS 15 on
            minimum_deployment_target=ct.target.macOS15 if n_varying > 1 else ct.target.macOS13,
            skip_model_load=True)
    del traced
    if bits:
        mlmodel = compress(mlmodel, bits)
    for name in inputs:
        mlmodel.input_description[name] = DESCRIPTIONS.get(name, "skip connection passed from chunk 1 to chunk 2")
    for name in outputs:
        mlmodel.output_description[name] = DESCRIPTIONS.get(name, "skip connection passed from chunk 1 to chunk 2")
    mlmodel.short_description = description
    mlmodel.author = "editsuite"
    mlmodel.version = model_version
    mlmodel.user_defined_metadata.update(metadata)
    return mlmodel


@contextlib.contextmanager
def _fast_fp16_overflow_check():
    """coremltools' fp16 pass (add_fp16_cast) asks of every fp32 weight whether fp16 can hold its finite
    values, with np.where over all its elements: int64 index arrays, four per element of a 4-D kernel.
    On SD 1.5's UNet that took 59 of the conversion's 148 s and about 1 GB at the peak (measured). This
    asks the same question (is any |value| < 1e38 above 65504?) with two masked reductions instead."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    v = np.asarray(var.op.val.val).reshape(-1)
                    high = np.max(v, where=v < 1e38, initial=0.0)
                    low = np.min(v, where=v > -1e38, initial=0.0)
                    if max(high, -low) > 65504:
                        return True
        return False

    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


def _input_dtype(name: str, value: torch.Tensor, float32: bool = False):
    if value.dtype in (torch.int32, torch.int64):
        return np.int32
    return np.float16 if name in HALF_INPUTS and not float32 else np.float32


def _float32(bundle, name: str) -> bool:
    """SDXL's VAE runs in float32 (its fp16 decode overflows, as diffusers' `force_upcast` says)."""
    return bundle.manifest.xl and name.startswith("vae_")


def compress(mlmodel, bits: int):
    """int8 linear quantization or k-means palettization (6 or 4 bits) of the weights; the token
    embedding table, read by a gather, stays fp16 (its rows are looked up, not multiplied)."""
    import coremltools.optimize.coreml as cto

    if bits == 8:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=WEIGHT_THRESHOLD)
        config = cto.OptimizationConfig(global_config=op, op_type_configs={"gather": None})
        return cto.linear_quantize_weights(mlmodel, config)
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=bits, weight_threshold=WEIGHT_THRESHOLD)
    config = cto.OptimizationConfig(global_config=op, op_type_configs={"gather": None})
    return cto.palettize_weights(mlmodel, config)


# -- the command ---------------------------------------------------------------------------------------------

def convert(source, out: str | os.PathLike, *, resolutions=(), attention: str = "split-einsum",
            quantize_bits: int | None = None, chunk_unet: bool = False, components=(), allow_pickle: bool = False,
            overwrite: bool = False, model_version: str | None = None, compile: bool = False,
            progress: Callable[[str], None] | None = None) -> Path:
    """Convert `source` (anything `load_bundle` reads) into the Core ML bundle `out`; returns `out`.
    `compile` (macOS only) also writes `Resources/*.mlmodelc` for Apple's Swift pipeline and Mochi Diffusion."""
    from editsuite.bundle.loader import _looks_like_hub_id, load_bundle
    from editsuite.convert.ane import AttentionVariant

    say = progress or (lambda msg: None)
    if compile and not on_macos():
        raise UserError("--compile needs macOS (it runs Xcode's coremlcompiler); convert here without it and run "
                        "the same command with --compile on a Mac, or compile there with `xcrun coremlcompiler`")
    ct = import_coremltools()
    if attention not in {v.value for v in AttentionVariant}:
        raise UserError(f"unknown attention {attention!r}; use one of: "
                        f"{', '.join(v.value for v in AttentionVariant)}")
    if quantize_bits is not None and quantize_bits not in QUANTIZE_BITS:
        raise UserError(f"--quantize-bits {quantize_bits} is not supported; use 8, 6 or 4 (or leave it out for fp16)")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component {unknown[0]!r}; use any of: {', '.join(COMPONENTS)}")
    if attention == "split-einsum-v2" and len(set(resolutions)) > 1 and "unet" in (components or COMPONENTS):
        raise UserError("split-einsum-v2 cuts attention into chunks that depend on the size, so its UNet holds one "
                        "resolution; convert each --resolution into a bundle of its own, or use split-einsum")
    if model_version is not None and not re.fullmatch(r"[A-Za-z0-9._/-]+", model_version):
        raise UserError(f"--model-version {model_version!r} may hold only letters, digits, '.', '-', '_' and '/'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pass another -o")
    old = read_manifest(out)
    if old is not None and overwrite:  # the new bundle beside the old, then swapped in: nothing else is touched
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
        try:
            convert(source, staging, resolutions=resolutions, attention=attention, quantize_bits=quantize_bits,
                    chunk_unet=chunk_unet, components=components, allow_pickle=allow_pickle,
                    model_version=model_version,
                    compile=compile, progress=progress)
            _swap_in(staging, out, old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out
    # float32: coremltools' TorchScript frontend converts fp32 graphs only (fp16 weights meet fp32 casts of
    # the inputs); memory is kept down by holding only the module being converted, once (`_drop_unneeded`,
    # `rewrite_unet` sharing the weights)
    wanted = [p for c in (components or COMPONENTS) for p in parts(chunk_unet)[c]]
    bundle = load_bundle(source, backend="torch", device="cpu", dtype="float32", allow_pickle=allow_pickle,
                         modules=frozenset(_MODULE_OF[p] for p in wanted))
    m = bundle.manifest
    if m.xl:  # both text encoders; the refiner has the second only
        wanted = [p for c in (components or COMPONENTS) for p in parts(chunk_unet, xl=True)[c]
                  if not (p == "text_encoder" and bundle.backend.text_encoder is None)]
    native = (m.native_resolution, m.native_resolution)
    # Apple's Python pipeline finds packages by the hub id or folder it loads the tokenizer from: a hub id
    # is kept as the model version, anything else gives its name
    hub = _looks_like_hub_id(str(source)) and not Path(str(source)).exists()
    version = model_version or (str(source) if hub else model_version_of(m.name or out.name))
    settings = Settings(tuple(dict.fromkeys(resolutions or [native])), attention, quantize_bits, chunk_unet, version)
    down = sum(1 for blk in bundle.backend.unet_model.down_blocks if blk.downsamplers)
    check_resolutions(settings.resolutions, m.vae_scale_factor, down)
    identity = bundle.identity()
    if Path(str(source)).exists():  # verify and reruns find the source from any folder
        identity["source"] = str(Path(source).resolve())

    if old is not None:
        check_manifest(old, out, complete=False)  # a damaged manifest is one line, not a traceback mid-way
        if old.get("settings") != settings.to_dict() or old.get("model", {}).get("model_hash") != identity["model_hash"]:
            raise UserError(f"{out} holds a conversion with other settings or another model; pass --overwrite to "
                            "replace it or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    manifest = old or {
        "format": FORMAT, "model": identity, "settings": settings.to_dict(), "unet_batch": UNET_BATCH,
        "packages": {},
    }
    metadata = {META_KIND: m.kind.value, META_PREDICTION: m.prediction_type, META_LATENT_SCALE: str(m.scaling_factor),
                META_VAE_FACTOR: str(m.vae_scale_factor)}
    _write_support_files(bundle, out)
    for i, name in enumerate(wanted):
        _drop_unneeded(bundle, wanted[i:])
        file = package_name(version, name)
        path = out / file
        if name in manifest["packages"] and package_complete(path):
            say(f"{SWIFT_NAMES[name]}: already converted, skipped")
            continue
        t0 = time.time()
        say(f"{SWIFT_NAMES[name]}: tracing and converting")
        module, inputs, varying = _spec(bundle, name, settings)
        outputs = module.outputs
        float32 = _float32(bundle, name)
        mlmodel = _convert_one(ct, module, inputs, varying, outputs, quantize_bits,
                               f"{m.name or 'model'} {SWIFT_NAMES[name]} ({m.kind.value}), converted by editsuite",
                               metadata, version, float32)
        split = getattr(module, "split", None)
        del module
        _drop_unneeded(bundle, wanted[i + 1:])  # before saving: the save need not hold the torch weights too
        tmp = out / f".partial-{file}"
        shutil.rmtree(tmp, ignore_errors=True)
        mlmodel.save(str(tmp))
        del mlmodel
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        manifest["packages"][name] = {
            "file": file,
            "inputs": {k: {"shape": list(v.shape), "dtype": np.dtype(_input_dtype(k, v, float32)).name,
                           "shapes": [list(s) for s in (varying or {}).get(k, [])]} for k, v in inputs.items()},
            "outputs": list(outputs),
            "size_bytes": _size(path),
            "seconds": round(time.time() - t0, 1),
        }
        if name.startswith("unet_chunk"):
            manifest["packages"][name]["split"] = split
        _write_json(out / MANIFEST, manifest)
        say(f"{SWIFT_NAMES[name]}: done in {time.time() - t0:.0f} s, {_size(path) / 2**20:.1f} MiB")
    _write_json(out / MANIFEST, manifest)
    if compile:
        compile_for_swift(out, {c: out / p["file"] for c, p in manifest["packages"].items()}, say)
    return out


def package_complete(path: Path) -> bool:
    """Whether an .mlpackage holds every file its Manifest.json lists (a rerun skips only complete ones)."""
    try:
        items = json.loads((path / "Manifest.json").read_text())["itemInfoEntries"].values()
        found = [path / "Data" / item["path"] for item in items]
        return bool(found) and all(f.is_file() or (f.is_dir() and any(f.iterdir())) for f in found)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def owned_names(manifest: dict) -> list[str]:
    """What editsuite wrote in a bundle folder, by its manifest: the packages it lists and the support files
    (paths relative to the folder). Anything else there is the user's."""
    names = [MANIFEST, "tokenizer", "tokenizer_2", "scheduler", "low_res_scheduler", "vocab.json", "merges.txt"]
    packages = manifest.get("packages") if isinstance(manifest.get("packages"), dict) else {}
    for key, entry in packages.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        names.append(file if isinstance(file, str) else f"{key}.mlpackage")  # format 1 named packages by key
    names += [f"Resources/{n}.mlmodelc" for n in SWIFT_NAMES.values()] + ["Resources/vocab.json",
                                                                           "Resources/merges.txt"]
    # a tampered manifest must not name anything outside the folder
    return [n for n in dict.fromkeys(names) if ".." not in Path(n).parts and not Path(n).is_absolute()]


def _swap_in(staging: Path, out: Path, old: dict) -> None:
    """Replace what editsuite wrote in `out` (per its old manifest) by the finished bundle in `staging`."""
    new = [p.name for p in staging.iterdir()]
    if (staging / "Resources").is_dir():
        new += [f"Resources/{p.name}" for p in (staging / "Resources").iterdir()]
    mine = set(owned_names(old)) | {"Resources"}
    foreign = [n for n in new if (out / n).exists() and n not in mine]
    if foreign:
        raise UserError(f"{out / foreign[0]} is not part of the bundle editsuite wrote there; move it or choose "
                        "another -o")
    for name in owned_names(old):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for name in sorted(new, key=lambda n: n.count("/")):  # top level first; Resources/ items after it
        if name == "Resources" and (out / name).is_dir():
            continue  # the user's files in Resources/ stay; its compiled models move in one by one
        if (staging / name).exists():
            os.replace(staging / name, out / name)


_MODULE_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "unet", "unet_chunk1": "unet", "unet_chunk2": "unet",
              "vae_encoder": "vae", "vae_decoder": "vae"}
_ATTRIBUTES = {"text_encoder": ("text_encoder", "text_encoder_2"), "unet": ("unet_model",), "vae": ("vae",)}


def _drop_unneeded(bundle, remaining: list[str]) -> None:
    """Let go of the source modules no remaining package needs: each conversion holds only its own."""
    import gc

    needed = {_MODULE_OF[p] for p in remaining}
    for module in set(_ATTRIBUTES) - needed:
        for attribute in _ATTRIBUTES[module]:  # on the torch backend
            setattr(bundle.backend, attribute, None)
    gc.collect()


def compile_for_swift(out: Path, packages: dict[str, Path], say: Callable[[str], None]) -> Path:
    """`Resources/` as Apple's converter writes it for its Swift CLI (`--bundle-resources-for-swift-cli`):
    each package compiled by Xcode's coremlcompiler into `<SwiftName>.mlmodelc`, beside vocab.json and
    merges.txt. Mochi Diffusion opens the same folder. macOS only."""
    import subprocess

    resources = out / "Resources"
    resources.mkdir(exist_ok=True)
    for component, package in packages.items():
        target = resources / f"{SWIFT_NAMES[component]}.mlmodelc"
        if target.is_dir():
            say(f"{target.name}: already compiled, skipped")
            continue
        with tempfile.TemporaryDirectory(dir=resources, prefix=".compiling-") as tmp:
            done = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), tmp], capture_output=True,
                                  text=True)
            compiled = Path(tmp) / f"{package.stem}.mlmodelc"
            if done.returncode or not compiled.is_dir():
                last = (done.stderr or done.stdout or "no output").strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"coremlcompiler could not compile {package.name}: {last[0]}; check that Xcode's "
                                "command line tools are installed (xcode-select --install)")
            os.replace(compiled, target)
        say(f"{target.name}: compiled")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(out / name, resources / name)
    return resources


def write_vocab_and_merges(tokenizer, folder: Path) -> None:
    """The CLIP tokenizer as `vocab.json` and `merges.txt`, the two files Apple's Swift BPE tokenizer reads
    (transformers 5 saves only tokenizer.json, so they are taken from the tokenizer's own model)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    _write_json(folder / "vocab.json", vocab)
    _write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def _write_support_files(bundle, out: Path) -> None:
    """Written anew on every run (they are small), each folder complete before it replaces the old one."""
    for folder, tokenizer in (("tokenizer", bundle.tokenizer), ("tokenizer_2", bundle.tokenizer_2)):
        if tokenizer is None:  # SD 1.x/2.x have no second tokenizer; SDXL's refiner no first
            continue
        staging = out / f".{folder}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out / folder, ignore_errors=True)
        os.replace(staging, out / folder)
    # Apple's Swift pipeline reads one vocabulary for both SDXL encoders (theirs are the same)
    write_vocab_and_merges(bundle.tokenizer or bundle.tokenizer_2, out)
    (out / "scheduler").mkdir(exist_ok=True)
    _write_json(out / "scheduler" / "scheduler_config.json", dict(bundle.scheduler_config))
    if bundle.low_res_scheduler is not None:
        (out / "low_res_scheduler").mkdir(exist_ok=True)
        _write_json(out / "low_res_scheduler" / "scheduler_config.json", dict(bundle.low_res_scheduler.config))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
