"""`editsuite convert`: a model bundle -> a self-contained Core ML bundle (build time; needs coremltools).

OUT/
  coreml-manifest.json    what the bundle is: the model's manifest, resolutions, attention, compression,
                          the packages and their inputs/outputs, the source weights' hash
  TextEncoder.mlpackage   input_ids (1, 77) int32 -> last_hidden_state
  Unet.mlpackage          or UnetChunk1/UnetChunk2.mlpackage with --chunk-unet
  VAEEncoder.mlpackage, VAEDecoder.mlpackage
  tokenizer/, scheduler/ (and low_res_scheduler/ for the x4 upscaler)

Each package is written under a temporary name and renamed when complete, and the manifest records it, so
running the same command again skips what is finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from editsuite.bundle.mil_executor import import_coremltools
from editsuite.errors import UserError

MANIFEST = "coreml-manifest.json"
FORMAT = 1
UNET_BATCH = 2  # the UNet runs the unconditional and conditional halves of guidance together
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PACKAGES = {"text_encoder": "TextEncoder", "vae_encoder": "VAEEncoder", "vae_decoder": "VAEDecoder"}
QUANTIZE_BITS = (8, 6, 4)
WEIGHT_THRESHOLD = 2048  # smaller constants (norms, biases) stay fp16, as coremltools does by default

DESCRIPTIONS = {
    "input_ids": "CLIP token ids, padded to 77",
    "last_hidden_state": "text encoder hidden states (the UNet's context)",
    "sample": "noisy latents, with the model's extra channels (mask, masked-image latents or low-res image)",
    "timestep": "diffusion timestep, one per batch item",
    "encoder_hidden_states": "text encoder hidden states: unconditional then conditional",
    "class_labels": "noise level of the low-resolution image (x4 upscaler)",
    "noise_pred": "the UNet's prediction (noise or v, as the model's prediction type)",
    "hidden_states": "UNet activations between the two chunks",
    "temb": "time embedding, passed from chunk 1 to chunk 2",
    "image": "pixels in [-1, 1], RGB",
    "moments": "VAE posterior: mean and log-variance on the channel axis",
    "z": "unscaled latents (divide scaled latents by the scaling factor first)",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    resolutions: tuple[tuple[int, int], ...]  # (width, height) in pixels
    attention: str = "split-einsum"
    quantize_bits: int | None = None
    chunk_unet: bool = False

    def to_dict(self) -> dict:
        return {"resolutions": [list(r) for r in self.resolutions], "attention": self.attention,
                "quantize_bits": self.quantize_bits, "chunk_unet": self.chunk_unet}


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


def package_names(chunk_unet: bool) -> dict[str, list[str]]:
    unet = ["UnetChunk1", "UnetChunk2"] if chunk_unet else ["Unet"]
    return {"text_encoder": [PACKAGES["text_encoder"]], "unet": unet,
            "vae_encoder": [PACKAGES["vae_encoder"]], "vae_decoder": [PACKAGES["vae_decoder"]]}


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); remove it or convert into another folder") from None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# -- the modules and their example inputs ------------------------------------------------------------------

def _spec(bundle, name: str, settings: Settings):
    """(torch module, example inputs, per-resolution shapes of the varying inputs) for one package."""
    from editsuite.convert.modules import TextEncoder, Unet, VAEDecoder, VAEEncoder

    b, m = bundle.backend, bundle.manifest
    f = m.vae_scale_factor
    lat = [(h // f, w // f) for w, h in settings.resolutions]
    pix = [(h, w) for w, h in settings.resolutions]
    g = torch.Generator().manual_seed(0)
    if name == "TextEncoder":
        return TextEncoder(b.text_encoder), {"input_ids": torch.zeros(1, 77, dtype=torch.int32)}, None
    if name == "VAEEncoder":
        return VAEEncoder(b.vae), {"image": torch.zeros(1, 3, *pix[0])}, {"image": [(1, 3, *p) for p in pix]}
    if name == "VAEDecoder":
        return (VAEDecoder(b.vae), {"z": torch.zeros(1, m.latent_channels, *lat[0])},
                {"z": [(1, m.latent_channels, *s) for s in lat]})
    part = {"Unet": None, "UnetChunk1": 1, "UnetChunk2": 2}[name]
    module = Unet(b.unet_model, settings.attention, part=part)
    n = UNET_BATCH
    head = {"sample": torch.randn(n, m.unet_in_channels, *lat[0], generator=g),
            "timestep": torch.full((n,), 500.0),
            "encoder_hidden_states": torch.randn(n, 77, m.cross_attention_dim, generator=g)}
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


def _convert_one(ct, module, inputs: dict, varying: dict | None, outputs: tuple[str, ...], bits: int | None,
                 description: str):
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants: intended here
        traced = torch.jit.trace(module, tuple(inputs.values()), check_trace=False)
    ct_inputs = []
    n_varying = sum(1 for shapes in (varying or {}).values() if len(set(shapes)) > 1)
    for name, value in inputs.items():
        dtype = np.int32 if value.dtype in (torch.int32, torch.int64) else np.float16
        shapes = (varying or {}).get(name)
        if shapes and len(set(shapes)) > 1:
            shape = ct.EnumeratedShapes(shapes=[list(s) for s in shapes], default=list(value.shape))
        else:
            shape = tuple(value.shape)
        ct_inputs.append(ct.TensorType(name=name, shape=shape, dtype=dtype))
    mlmodel = ct.convert(
        traced, inputs=ct_inputs, outputs=[ct.TensorType(name=o, dtype=np.float16) for o in outputs],
        convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
        # Core ML allows enumerated shapes on several inputs (chunk 2 at several sizes) from macOS 15 on
        minimum_deployment_target=ct.target.macOS15 if n_varying > 1 else ct.target.macOS13, skip_model_load=True)
    if bits:
        mlmodel = compress(mlmodel, bits)
    for name in inputs:
        mlmodel.input_description[name] = DESCRIPTIONS.get(name.split("_")[0] if name.startswith("res_") else name,
                                                           "skip connection passed from chunk 1 to chunk 2")
    for name in outputs:
        mlmodel.output_description[name] = DESCRIPTIONS.get(name, "skip connection passed from chunk 1 to chunk 2")
    mlmodel.short_description = description
    mlmodel.author = "editsuite"
    return mlmodel


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
            overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert `source` (anything `load_bundle` reads) into the Core ML bundle `out`; returns `out`."""
    from editsuite.bundle.loader import load_bundle
    from editsuite.convert.ane import AttentionVariant

    say = progress or (lambda msg: None)
    ct = import_coremltools()
    if attention not in {v.value for v in AttentionVariant}:
        raise UserError(f"unknown attention {attention!r}; use one of: "
                        f"{', '.join(v.value for v in AttentionVariant)}")
    if quantize_bits is not None and quantize_bits not in QUANTIZE_BITS:
        raise UserError(f"--quantize-bits {quantize_bits} is not supported; use 8, 6 or 4 (or leave it out for fp16)")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component {unknown[0]!r}; use any of: {', '.join(COMPONENTS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pass another -o")
    bundle = load_bundle(source, backend="torch", device="cpu", dtype="float32", allow_pickle=allow_pickle)
    m = bundle.manifest
    native = (m.native_resolution, m.native_resolution)
    settings = Settings(tuple(dict.fromkeys(resolutions or [native])), attention, quantize_bits, chunk_unet)
    down = sum(1 for blk in bundle.backend.unet_model.down_blocks if blk.downsamplers)
    check_resolutions(settings.resolutions, m.vae_scale_factor, down)
    identity = bundle.identity()

    old = read_manifest(out)
    if old is not None and not overwrite:
        if old.get("settings") != settings.to_dict() or old.get("model", {}).get("model_hash") != identity["model_hash"]:
            raise UserError(f"{out} holds a conversion with other settings or another model; pass --overwrite to "
                            "replace it or choose another -o")
    if old is not None and overwrite:
        shutil.rmtree(out)
        old = None
    out.mkdir(parents=True, exist_ok=True)
    names = package_names(chunk_unet)
    wanted = [p for c in (components or COMPONENTS) for p in names[c]]
    manifest = old or {
        "format": FORMAT, "model": identity, "settings": settings.to_dict(), "unet_batch": UNET_BATCH,
        "packages": {},
    }
    _write_support_files(bundle, out)
    for name in wanted:
        path = out / f"{name}.mlpackage"
        if name in manifest["packages"] and path.is_dir():
            say(f"{name}: already converted, skipped")
            continue
        t0 = time.time()
        say(f"{name}: tracing and converting")
        module, inputs, varying = _spec(bundle, name, settings)
        outputs = module.outputs
        mlmodel = _convert_one(ct, module, inputs, varying, outputs, quantize_bits,
                               f"{m.name or 'model'} {name} ({m.kind.value}), converted by editsuite")
        tmp = out / f".partial-{name}.mlpackage"
        shutil.rmtree(tmp, ignore_errors=True)
        mlmodel.save(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        manifest["packages"][name] = {
            "inputs": {k: {"shape": list(v.shape), "dtype": "int32" if v.dtype in (torch.int32, torch.int64) else "float16",
                           "shapes": [list(s) for s in (varying or {}).get(k, [])]} for k, v in inputs.items()},
            "outputs": list(outputs),
            "size_bytes": _size(path),
            "seconds": round(time.time() - t0, 1),
        }
        if name.startswith("UnetChunk"):
            manifest["packages"][name]["split"] = module.split
        _write_json(out / MANIFEST, manifest)
        say(f"{name}: done in {time.time() - t0:.0f} s, {_size(path) / 2**20:.1f} MiB")
    _write_json(out / MANIFEST, manifest)
    return out


def _write_support_files(bundle, out: Path) -> None:
    if not (out / "tokenizer").is_dir():
        bundle.tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    _write_json(out / "scheduler" / "scheduler_config.json", dict(bundle.scheduler_config))
    if bundle.low_res_scheduler is not None:
        (out / "low_res_scheduler").mkdir(exist_ok=True)
        _write_json(out / "low_res_scheduler" / "scheduler_config.json", dict(bundle.low_res_scheduler.config))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
