"""Core ML backend: the four shared calls of `TorchBackend`, answered by the packages of a converted bundle.

On macOS each package runs in Core ML (`compute_units`: all, cpu-and-ne, cpu-and-gpu, cpu-only). Elsewhere
the same packages run in editsuite's reference executor (`mil_executor`), for verification, not speed.
This module is the only place that converts between torch tensors and the fp16 arrays Core ML takes: the
loop and the tasks see torch tensors, as with the PyTorch backend.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from editsuite.errors import UserError

COMPUTE_UNITS = {"all": "ALL", "cpu-and-ne": "CPU_AND_NE", "cpu-and-gpu": "CPU_AND_GPU", "cpu-only": "CPU_ONLY"}
OFF_MAC_NOTICE = ("Core ML runs only on macOS: running the converted programs in editsuite's reference executor, "
                  "for verification, not speed")


def on_macos() -> bool:
    return platform.system() == "Darwin"


class _Package:
    """One .mlpackage, loaded on first use; `run(**arrays) -> {name: np.ndarray}`."""

    def __init__(self, path: Path, compute_units: str, use_coreml: bool):
        self.path, self.compute_units, self.use_coreml = path, compute_units, use_coreml
        self._model = None

    def run(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        if self._model is None:
            if self.use_coreml:
                from editsuite.bundle.mil_executor import import_coremltools

                ct = import_coremltools()
                self._model = ct.models.MLModel(str(self.path),
                                                compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units]))
            else:
                from editsuite.bundle.mil_executor import Program

                self._model = Program(self.path, fp16=True)
        if self.use_coreml:
            return {k: np.asarray(v) for k, v in self._model.predict(arrays).items()}
        return {k: v.numpy() for k, v in self._model(**arrays).items()}


def _half(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().astype(np.float16)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


class CoreMLBackend:
    name = "coreml"

    def __init__(self, folder: Path, manifest: dict, *, compute_units: str = "all", use_coreml: bool | None = None):
        self.folder = folder
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # of the tensors crossing the interface
        self.compute_dtype = torch.float16
        self.compute_units = compute_units
        self.use_coreml = on_macos() if use_coreml is None else use_coreml
        self.batch = int(manifest.get("unet_batch", 2))
        self.resolutions = [tuple(r) for r in manifest["settings"]["resolutions"]]
        self.vae_factor = int(manifest["model"]["vae_scale_factor"])
        self.class_labels = manifest["model"]["kind"] == "x4-upscaler"
        chunked = manifest["settings"]["chunk_unet"]
        names = ["TextEncoder", "VAEEncoder", "VAEDecoder"] + (["UnetChunk1", "UnetChunk2"] if chunked else ["Unet"])
        self.packages = {n: _Package(folder / f"{n}.mlpackage", compute_units, self.use_coreml) for n in names
                         if n in manifest["packages"]}
        self.chunk2_inputs = manifest["packages"].get("UnetChunk2", {}).get("inputs", {})

    def _package(self, name: str) -> _Package:
        if name not in self.packages:
            raise UserError(f"{self.folder} has no {name}.mlpackage (converted with --components?); convert it "
                            f"with `editsuite convert MODEL -o {self.folder}`")
        return self.packages[name]

    def _check_pixels(self, height: int, width: int) -> None:
        if (width, height) not in self.resolutions:
            sizes = ", ".join(f"{w}x{h}" for w, h in self.resolutions)
            raise UserError(f"this Core ML bundle was converted for {sizes}, not {width}x{height}; pick one of "
                            f"those sizes or convert again with --resolution {width}x{height}")

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        te = self._package("TextEncoder")
        rows = [te.run(input_ids=row[None].numpy().astype(np.int32))["last_hidden_state"] for row in input_ids]
        return _tensor(np.concatenate(rows))

    def unet(self, sample, timestep, context, class_labels=None) -> torch.Tensor:
        n = sample.shape[0]
        self._check_pixels(sample.shape[2] * self.vae_factor, sample.shape[3] * self.vae_factor)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        outs = []
        for i in range(0, n, self.batch):  # the package takes a fixed batch: pad the last group by repeating
            idx = list(range(i, min(i + self.batch, n)))
            idx += [idx[-1]] * (self.batch - len(idx))
            arrays = {"sample": _half(sample[idx]), "timestep": _half(t[idx]),
                      "encoder_hidden_states": _half(context[idx])}
            if self.class_labels:
                arrays["class_labels"] = torch.as_tensor(class_labels).reshape(-1).expand(n)[idx].numpy().astype(np.int32)
            pred = self._run_unet(arrays)
            outs.append(_tensor(pred)[: min(self.batch, n - i)])
        return torch.cat(outs)

    def _run_unet(self, arrays: dict) -> np.ndarray:
        if "Unet" in self.packages:
            return self._package("Unet").run(**arrays)["noise_pred"]
        mid = self._package("UnetChunk1").run(**arrays)
        second = {k: mid[k] for k in self.chunk2_inputs if k in mid}
        second["encoder_hidden_states"] = arrays["encoder_hidden_states"]
        return self._package("UnetChunk2").run(**second)["noise_pred"]

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        self._check_pixels(image.shape[2], image.shape[3])
        enc = self._package("VAEEncoder")
        return _tensor(np.concatenate([enc.run(image=_half(x[None]))["moments"] for x in image]))

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_pixels(latents.shape[2] * self.vae_factor, latents.shape[3] * self.vae_factor)
        dec = self._package("VAEDecoder")
        return _tensor(np.concatenate([dec.run(z=_half(z[None]))["image"] for z in latents]))


def load_coreml_bundle(folder: Path, *, compute_units: str = "all", use_coreml: bool | None = None):
    """A `ModelBundle` over a converted Core ML bundle (see `editsuite.convert.coreml`)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from editsuite.bundle.loader import ModelBundle
    from editsuite.bundle.manifest import Manifest, ModelKind
    from editsuite.convert.coreml import FORMAT, MANIFEST, read_manifest

    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"unknown compute units {compute_units!r}; use one of: {', '.join(COMPUTE_UNITS)}")
    folder = Path(folder)
    data = read_manifest(folder)
    if data is None or data.get("format") != FORMAT:
        raise UserError(f"{folder / MANIFEST} is missing or of another format; convert again with `editsuite convert`")
    fields = dict(data["model"])
    fields["kind"] = ModelKind(fields["kind"])
    manifest = Manifest(**fields)
    backend = CoreMLBackend(folder, data, compute_units=compute_units, use_coreml=use_coreml)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    low_res = None
    if (folder / "low_res_scheduler").is_dir():
        low_res = DDPMScheduler.from_config(
            json.loads((folder / "low_res_scheduler" / "scheduler_config.json").read_text()))
    bundle = ModelBundle(manifest=manifest, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                         backend=backend, scheduler_config=scheduler_config, low_res_scheduler=low_res)
    bundle.notice = None if backend.use_coreml else OFF_MAC_NOTICE
    return bundle
