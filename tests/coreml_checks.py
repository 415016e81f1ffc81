"""Shared by the Core ML tests: the edits run on both backends, Apple's bundle contract checked straight from
each package's spec (independently of editsuite's own reading of it), and a stand-in for Core ML's MLModel.

The contract is what Apple's pipelines require (ml-stable-diffusion at e12202c: torch2coreml.py, the Python
pipeline's `_verify_inputs`, the Swift pipeline's resource names and input names); `apple_contract_problems`
must find nothing on the bundles Apple's own converter made (tests/fixtures/apple), which keeps it honest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import PIL.Image

from editsuite import Img2Img, Inpaint, Outpaint, Txt2Img, Upscale

F16, F32, I32 = 65552, 65568, 131104  # Core ML ArrayFeatureType data types
_NUMPY = {F16: np.float16, F32: np.float32, I32: np.int32}
_FILE = re.compile(r"^Stable_Diffusion_version_(.+)_(text_encoder_2|text_encoder|unet_chunk1|unet_chunk2|unet|vae_encoder|"
                   r"vae_decoder)\.mlpackage$")


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))


def photo_and_mask(size: int = 64):
    rng = np.random.default_rng(0)
    photo = PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return photo, PIL.Image.fromarray(mask)


# each edit as the tests run it on either backend: (bundle, photo, mask) -> result
EDITS = {
    "txt2img": lambda b, photo, mask: Txt2Img(b).run("a red circle", steps=4, seed=3),
    "txt2img 64x96": lambda b, photo, mask: Txt2Img(b).run("a red circle", steps=4, seed=3, width=64, height=96),
    "img2img": lambda b, photo, mask: Img2Img(b).run(photo, "a red circle", steps=4, seed=3, strength=0.6),
    "outpaint": lambda b, photo, mask: Outpaint(b).run(photo.crop((0, 0, 64, 32)), "a red circle", steps=4, seed=3,
                                                        bottom=32),
    "inpaint": lambda b, photo, mask: Inpaint(b).run(photo, mask, "a red circle", steps=4, seed=3),
    # x4 upscaler: 16 -> 64 px; any other model: the tiled "SD upscale", 32 -> 64 px
    "upscale": lambda b, photo, mask: Upscale(b).run(photo.resize((16, 16) if b.kind.value == "x4-upscaler"
                                                                  else (32, 32)), steps=4, seed=3),
}


def _spec(path: Path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def _io(features) -> dict[str, tuple[int, list[int]]]:
    return {f.name: (f.type.multiArrayType.dataType, list(f.type.multiArrayType.shape)) for f in features}


def apple_contract_problems(folder: Path, *, upscaler: bool = False) -> list[str]:
    """Everything in `folder` that Apple's pipelines would not accept (an empty list: all well)."""
    problems: list[str] = []
    found: dict[str, Path] = {}
    versions = set()
    for p in folder.glob("*.mlpackage"):
        m = _FILE.match(p.name)
        if m:
            versions.add(m[1])
            found[m[2]] = p
    if len(versions) != 1:
        return [f"expected the packages of one model version, found {sorted(versions)}"]
    unet_parts = ["unet_chunk1", "unet_chunk2"] if "unet_chunk1" in found else ["unet"]
    xl = "text_encoder_2" in found  # SDXL (--xl-version); its refiner has the second text encoder only
    encoders = [c for c in ("text_encoder", "text_encoder_2") if c in found] if xl else ["text_encoder"]
    for c in (*encoders, "vae_encoder", "vae_decoder", *unet_parts):
        if c not in found:
            problems.append(f"no {c} package")
    if problems:
        return problems

    def expect(what, io, name, dtypes, shape_rule):
        if name not in io:
            problems.append(f"{what}: no {name!r} (has {sorted(io)})")
            return None
        dtype, shape = io[name]
        if dtype not in dtypes:
            problems.append(f"{what}: {name} has data type {dtype}, not one of {dtypes}")
        if shape and not shape_rule(shape):
            problems.append(f"{what}: {name} has shape {shape}")
        return shape

    width, pooled = 0, None
    for c in encoders:
        te = _spec(found[c]).description
        ins, outs = _io(te.input), _io(te.output)
        if set(ins) != {"input_ids"}:
            problems.append(f"{c}: inputs {sorted(ins)}, not ['input_ids']")
        expect(c, ins, "input_ids", (F32,), lambda s: s == [1, 77])
        hidden = expect(c, outs, "hidden_embeds" if xl else "last_hidden_state", (F32,),
                        lambda s: len(s) == 3 and s[:2] == [1, 77])
        pooled = expect(c, outs, "pooled_outputs", (F32,), lambda s: len(s) == 2 and s[0] == 1)
        width += hidden[2] if hidden else 0  # SDXL's UNet reads both encoders' hidden states side by side

    first, last = (_spec(found[p]).description for p in (unet_parts[0], unet_parts[-1]))
    ins = _io(first.input)
    allowed = {"sample", "timestep", "encoder_hidden_states"} | ({"class_labels"} if upscaler else set()) \
        | ({"time_ids", "text_embeds"} if xl else set())
    if set(ins) != allowed:
        problems.append(f"{unet_parts[0]}: inputs {sorted(ins)}, not {sorted(allowed)}")
    sample = expect(unet_parts[0], ins, "sample", (F16,), lambda s: len(s) == 4 and s[0] == 2) or [2, 4, 0, 0]
    expect(unet_parts[0], ins, "timestep", (F16,), lambda s: s == [2])
    expect(unet_parts[0], ins, "encoder_hidden_states", (F16,), lambda s: s == [2, width, 1, 77])
    if xl:  # the base: (original size, crop, target size); the refiner: an aesthetic score for the target
        expect(unet_parts[0], ins, "time_ids", (F16,), lambda s: s in ([2, 6], [2, 5]))
        expect(unet_parts[0], ins, "text_embeds", (F16,), lambda s: pooled is not None and s == [2, pooled[1]])
    expect(unet_parts[-1], _io(last.output), "noise_pred", (F16, F32), lambda s: s == [2, 4, *sample[2:]])
    if len(unet_parts) == 2:
        given = set(_io(first.output)) | set(ins)
        missing = set(_io(last.input)) - given
        if missing:
            problems.append(f"unet_chunk2 takes {sorted(missing)}, which neither chunk 1 nor the UNet inputs give")

    dec = _spec(found["vae_decoder"]).description
    if list(_io(dec.input)) != ["z"]:
        problems.append(f"vae_decoder: inputs {list(_io(dec.input))}, not ['z']")
    z = expect("vae_decoder", _io(dec.input), "z", (F16, F32), lambda s: len(s) == 4 and s[:2] == [1, 4])
    expect("vae_decoder", _io(dec.output), "image", (F16, F32),
           lambda s: len(s) == 4 and s[:2] == [1, 3] and (z is None or s[2] * z[3] == s[3] * z[2]))
    enc = _spec(found["vae_encoder"]).description
    if list(_io(enc.input)) != ["x"]:
        problems.append(f"vae_encoder: inputs {list(_io(enc.input))}, not ['x']")
    expect("vae_encoder", _io(enc.input), "x", (F16, F32), lambda s: len(s) == 4 and s[:2] == [1, 3])
    expect("vae_encoder", _io(enc.output), "latent", (F16, F32), lambda s: len(s) == 4 and s[:2] == [1, 8])
    return problems


class StandIn:
    """Core ML's model object as far as editsuite uses it, `predict(dict) -> dict`: it checks that every
    array is exactly what the package's spec (read here by coremltools) asks for (names, numpy dtype, one of
    the allowed shapes) and computes with the reference executor."""

    fed: list[tuple[str, dict]] = []

    def __init__(self, path: Path):
        from editsuite.bundle.coreml_backend import ReferenceModel

        d = _spec(path).description
        self.name = path.name
        self.inputs = {}
        for f in d.input:
            t = f.type.multiArrayType
            shapes = [list(t.shape)] + [list(s.shape) for s in t.enumeratedShapes.shapes]
            self.inputs[f.name] = (_NUMPY[t.dataType], shapes)
        self.outputs = [f.name for f in d.output]
        self.reference = ReferenceModel(path)

    def predict(self, data: dict) -> dict:
        assert set(data) == set(self.inputs), (self.name, sorted(data), sorted(self.inputs))
        for name, a in data.items():
            dtype, shapes = self.inputs[name]
            assert isinstance(a, np.ndarray) and a.dtype == dtype, (self.name, name, type(a), a.dtype, dtype)
            assert list(a.shape) in shapes, (self.name, name, a.shape, shapes)
        StandIn.fed.append((self.name, {k: (v.dtype, v.shape) for k, v in data.items()}))
        out = self.reference.predict(data)
        assert list(out) == self.outputs
        return out
