"""Core ML backend: the four shared calls of `TorchBackend`, answered by the models of a Core ML bundle in
Apple's layout (editsuite's own conversions and Apple's; see `coreml_layout`).

On macOS each model runs in Core ML (`compute_units`: all, cpu-and-ne, cpu-and-gpu, cpu-only). Elsewhere
the same packages run in editsuite's reference executor (`mil_executor`), for verification, not speed.
Every call feeds a model exactly the inputs its description names, in the dtypes and shapes it states
(Apple's Python pipeline refuses anything else), so what runs here is what Core ML is given on a Mac.
This module is the only place that converts between torch tensors and Core ML's arrays: the loop and the
tasks see torch tensors, as with the PyTorch backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from editsuite.bundle.backend import ModelBackend
from editsuite.bundle.choices import ComputeUnits
from editsuite.bundle.coreml_layout import (META_LATENT_SCALE, META_PREDICTION, META_VAE_FACTOR, Description,
                                            Models, check_manifest, describe, find_models, read_manifest)
from editsuite.errors import UserError

COMPUTE_UNITS = {u.value: u.name for u in ComputeUnits}  # our spelling -> coremltools' ComputeUnit name
OFF_MAC_NOTICE = ("Core ML runs only on macOS: running the converted programs in editsuite's reference executor, "
                  "for verification, not speed")
_NUMPY = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int32": np.int32}
_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def on_macos() -> bool:
    return platform.system() == "Darwin"


class ReferenceModel:
    """The reference executor behind Core ML's `predict(dict) -> dict` interface (fp16 where the program
    computes in fp16)."""

    def __init__(self, path: Path, fp16: bool = True):
        from editsuite.bundle.mil_executor import Program

        self.program = Program(path, fp16=fp16)

    def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.program(**data).items()}


def coreml_runtime(compute_units: str) -> Callable[[Path], Any]:
    """Loads a model into Core ML itself (macOS): packages with MLModel, compiled folders with CompiledMLModel."""

    def load(path: Path):
        from editsuite.bundle.mil_executor import import_coremltools

        ct = import_coremltools()
        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
        if path.suffix == ".mlmodelc":
            return ct.models.CompiledMLModel(str(path), compute_units=units)
        return ct.models.MLModel(str(path), compute_units=units)

    return load


class _Model:
    """One model of the bundle, loaded on first use; `run(**arrays)` feeds it the inputs its description
    names, cast to the description's dtypes, after checking their shapes."""

    def __init__(self, component: str, path: Path, description: Description, load: Callable[[Path], Any]):
        self.component, self.path, self.desc, self._load = component, path, description, load
        self._model = None

    def output(self, *preferred: str) -> str:
        """The first of `preferred` the model gives, else its first output (what Apple's Swift code reads)."""
        return next((n for n in preferred if n in self.desc.outputs), next(iter(self.desc.outputs)))

    def run(self, **arrays) -> dict[str, np.ndarray]:
        feed = {}
        for name, spec in self.desc.inputs.items():
            if name not in arrays:
                raise UserError(f"{self.path.name} takes an input {name!r} that editsuite does not provide; "
                                "this model is not a Stable Diffusion (1.x, 2.x, XL) module editsuite can run")
            a = np.ascontiguousarray(np.asarray(arrays[name]), dtype=_NUMPY.get(spec.dtype, np.float32))
            if spec.shapes and a.shape not in spec.shapes:
                allowed = " or ".join(str(list(s)) for s in spec.shapes)
                raise UserError(f"{self.path.name} takes {name} of shape {allowed}, not {list(a.shape)}")
            feed[name] = a
        if self._model is None:
            self._model = self._load(self.path)
        return {k: np.asarray(v) for k, v in self._model.predict(feed).items()}


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _first(desc: Description) -> str:
    return next(iter(desc.inputs))


class CoreMLBackend(ModelBackend):
    name = "coreml"
    notice: str | None = None

    def __init__(self, models: Models, descriptions: dict[str, Description], *, vae_factor: int,
                 resolutions: list[tuple[int, int]] | None = None, compute_units: str = "all",
                 use_coreml: bool | None = None, runtime: Callable[[Path], Any] | None = None):
        self.folder = models.root
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # of the tensors crossing the interface
        self.compute_dtype = torch.float16
        self.compute_units = compute_units
        self.use_coreml = on_macos() if use_coreml is None else use_coreml
        load = runtime or (coreml_runtime(compute_units) if self.use_coreml else ReferenceModel)
        self.unet_parts = models.unet_parts
        used = ["text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder", *self.unet_parts]
        self.models = {c: _Model(c, models.paths[c], descriptions[c], load) for c in used if c in models.paths}
        self.vae_factor = vae_factor
        self.resolutions = resolutions or []
        if self.unet_parts:  # a bundle converted with --components may have none: its other models still run
            head = descriptions[self.unet_parts[0]].inputs
            self.batch = head["sample"].shape[0]
            self.context_rank = len(head["encoder_hidden_states"].shape)  # 4: Apple's (B, D, 1, 77)
            self.class_labels = "class_labels" in head
            self.xl = "time_ids" in head  # SDXL: time_ids and text_embeds beside the context
            self.resolutions = [(s[3] * vae_factor, s[2] * vae_factor) for s in head["sample"].shapes]

    def _model(self, component: str) -> _Model:
        if component not in self.models:
            what = {"vae_encoder": "VAE encoder (VAEEncoder), which img2img, inpaint, outpaint and upscale need",
                    "vae_decoder": "VAE decoder (VAEDecoder)", "text_encoder": "text encoder (TextEncoder)",
                    "text_encoder_2": "second text encoder (TextEncoder2)"}
            raise UserError(f"{self.folder} has no {what.get(component, component)}; convert it with "
                            f"`editsuite convert MODEL -o {self.folder}` (or Apple's converter with "
                            f"--convert-{component.replace('_', '-')})")
        return self.models[component]

    def _check_pixels(self, height: int, width: int) -> None:
        if (width, height) not in self.resolutions:
            sizes = ", ".join(f"{w}x{h}" for w, h in self.resolutions)
            raise UserError(f"this Core ML bundle was converted for {sizes}, not {width}x{height}; pick one of "
                            f"those sizes or convert again with --resolution {width}x{height}")

    def _encode(self, component: str, input_ids: torch.Tensor, *outputs: str) -> list[torch.Tensor]:
        """Each row of token ids through one text encoder (Apple's take one prompt a call): the first of
        `outputs` it gives, then the pooled output if asked for."""
        te = self._model(component)
        name, hidden = _first(te.desc), te.output(*outputs)
        wanted = [hidden] + (["pooled_outputs"] if "pooled_outputs" in outputs else [])
        rows = [te.run(**{name: row[None].numpy()}) for row in input_ids]
        return [_tensor(np.concatenate([r[k] for r in rows])) for k in wanted]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._encode("text_encoder", input_ids, "last_hidden_state", "hidden_embeds")[0]

    def encode_text_xl(self, input_ids: torch.Tensor | None,
                       input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `TorchBackend.encode_text_xl`, from Apple's `--xl-version` encoders: `hidden_embeds` are the
        penultimate layer, TextEncoder2's `pooled_outputs` the projected pooled embedding."""
        hidden, pooled = self._encode("text_encoder_2", input_ids_2, "hidden_embeds", "pooled_outputs")
        if input_ids is not None:  # the refiner has the second encoder only
            hidden = torch.cat([self._encode("text_encoder", input_ids, "hidden_embeds")[0], hidden], dim=-1)
        return hidden, pooled

    def feature_cache(self) -> None:
        return None  # a converted UNet runs whole: no deep features to reuse

    def unet(self, sample, timestep, context, class_labels=None, cache=None, added=None) -> torch.Tensor:
        n = sample.shape[0]
        self._check_pixels(sample.shape[2] * self.vae_factor, sample.shape[3] * self.vae_factor)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if self.context_rank == 4:  # Apple's layout: (B, 77, D) -> (B, D, 1, 77)
            context = context.transpose(1, 2).unsqueeze(2)
        labels = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1).expand(n)
        outs = []
        for i in range(0, n, self.batch):  # the model takes a fixed batch: pad the last group by repeating
            idx = list(range(i, min(i + self.batch, n)))
            idx += [idx[-1]] * (self.batch - len(idx))
            arrays = {"sample": sample[idx].numpy(), "timestep": t[idx].numpy(),
                      "encoder_hidden_states": context[idx].float().numpy()}
            if self.class_labels:
                arrays["class_labels"] = labels[idx].numpy()
            if self.xl:
                arrays |= {k: added[k][idx].float().numpy() for k in ("time_ids", "text_embeds")}
            outs.append(_tensor(self._run_unet(arrays))[: min(self.batch, n - i)])
        return torch.cat(outs)

    def _run_unet(self, arrays: dict) -> np.ndarray:
        for part in self.unet_parts or ["unet"]:  # a chunk takes what it names from the inputs and the chunk before
            model = self._model(part)
            result = model.run(**arrays)
            arrays = {**arrays, **result}
        return result[model.output("noise_pred")]

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        self._check_pixels(image.shape[2], image.shape[3])
        enc = self._model("vae_encoder")
        name, out = _first(enc.desc), enc.output("latent", "moments")
        return _tensor(np.concatenate([enc.run(**{name: x[None].numpy()})[out] for x in image]))

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_pixels(latents.shape[2] * self.vae_factor, latents.shape[3] * self.vae_factor)
        dec = self._model("vae_decoder")
        name, out = _first(dec.desc), dec.output("image")
        return _tensor(np.concatenate([dec.run(**{name: z[None].numpy()})[out] for z in latents]))


# -- what the bundle is ------------------------------------------------------------------------------------

def _vae_factor(descs: dict[str, Description], meta: dict[str, str]) -> int:
    """Pixels per latent cell: recorded by editsuite, else the VAE's own shapes, else Stable Diffusion's 8."""
    if META_VAE_FACTOR in meta:
        return int(meta[META_VAE_FACTOR])
    for d, latents_in in ((descs.get("vae_decoder"), True), (descs.get("vae_encoder"), False)):
        if d is None:
            continue
        first_in, first_out = next(iter(d.inputs.values())).shape, next(iter(d.outputs.values())).shape
        lat, pix = (first_in, first_out) if latents_in else (first_out, first_in)
        if len(lat) == 4 and len(pix) == 4 and lat[2]:
            return pix[2] // lat[2]
    return 8


class _Config:
    """What a diffusers folder given as `config` says that Core ML models cannot: scheduler, prediction
    type, latent scale, tokenizer, and the x4 upscaler's noise settings."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not (self.folder / "scheduler" / "scheduler_config.json").is_file():
            raise UserError(f"--config {folder} is not a diffusers model folder (no scheduler/scheduler_config.json); "
                            "pass the diffusers folder the Core ML model was converted from")
        self.scheduler = _read_json(self.folder / "scheduler" / "scheduler_config.json")
        vae = self.folder / "vae" / "config.json"
        self.latent_scale = _read_json(vae).get("scaling_factor") if vae.is_file() else None
        index = self.folder / "model_index.json"
        self.index = _read_json(index) if index.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _tokenizer(root: Path, models: Models, cfg: _Config | None, *, v2: bool = False, xl: int = 0):
    """editsuite's tokenizer/ (SDXL's second: tokenizer_2/) > the config folder's > vocab.json and merges.txt
    beside the models (what Apple's Swift pipeline reads, for both SDXL encoders) > the CLIP tokenizer
    editsuite ships (SD 1.x, SD 2.x or SDXL's)."""
    from transformers import CLIPTokenizer

    # OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!", as diffusers' do
    pad = "!" if v2 or xl == 2 else "<|endoftext|>"
    sub = "tokenizer_2" if xl == 2 else "tokenizer"
    for folder in (root / sub, cfg.folder / sub if cfg else None):
        if folder is not None and folder.is_dir():
            return CLIPTokenizer.from_pretrained(folder)
    for folder in dict.fromkeys((root, models.folder)):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad)
    return CLIPTokenizer.from_pretrained(_CONFIGS / ("sdxl-base" if xl else "sd-v2" if v2 else "sd-v1") / sub)


def _weights(path: Path) -> Path | None:
    for w in (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin", path / "weights" / "weight.bin"):
        if w.is_file():
            return w
    return None


def load_coreml_bundle(folder: str | Path, *, compute_units: str = "all", config: str | Path | None = None,
                       prediction_type: str | None = None, use_coreml: bool | None = None,
                       runtime: Callable[[Path], Any] | None = None):
    """A `ModelBundle` over a Core ML bundle: one editsuite converted, or Apple's (packages or, on macOS,
    compiled models). `config` (a diffusers folder) and `prediction_type` say what the models cannot."""
    from diffusers import DDPMScheduler

    from editsuite.bundle.loader import ModelBundle, file_hash
    from editsuite.bundle.manifest import Family, Manifest, ModelKind, manifest_from_configs

    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"unknown compute units {compute_units!r}; use one of: {', '.join(COMPUTE_UNITS)}")
    root = Path(folder).expanduser()
    data = read_manifest(root)
    if data is not None:
        check_manifest(data, root)
    models = find_models(root)
    if models is None:
        raise UserError(f"{root} holds no Core ML models named as Apple's tools name them "
                        "(Stable_Diffusion_version_*_unet.mlpackage, or Unet.mlmodelc); make a bundle with "
                        "`editsuite convert MODEL -o OUT`")
    use = on_macos() if use_coreml is None else use_coreml
    if models.compiled and not use and runtime is None:
        raise UserError(f"{models.folder} holds compiled Core ML models (.mlmodelc), which run only on macOS; "
                        "here, use the same model's .mlpackage files (the packages/ folder Apple publishes beside "
                        "compiled/) or convert the model with `editsuite convert`")
    if not models.unet_parts and data is None:
        raise UserError(f"{models.folder} has no UNet (Unet, or UnetChunk1 and UnetChunk2); convert it again "
                        "with the UNet")
    descs = {c: describe(p) for c, p in models.paths.items()}
    head = descs[models.unet_parts[0]] if models.unet_parts else next(iter(descs.values()))
    for name in ("sample", "timestep", "encoder_hidden_states") if models.unet_parts else ():
        if name not in head.inputs or (name != "timestep" and len(head.inputs[name].shape) not in (3, 4)):
            raise UserError(f"{models.paths[models.unet_parts[0]].name} has no {name} input of the shape a Stable "
                            "Diffusion UNet takes; editsuite runs SD 1.x, 2.x and XL UNets")
    meta = head.metadata
    cfg = _Config(config) if config is not None else None
    vae_factor = _vae_factor(descs, meta)

    pred = prediction_type or (cfg.scheduler.get("prediction_type") if cfg else None)
    if data is not None:  # editsuite's conversion: the identity recorded from the source model
        fields = dict(data["model"])
        fields["kind"] = ModelKind(fields["kind"])
        fields["family"] = Family(fields.get("family", Family.SD.value))
        manifest = Manifest(**fields)
        if pred:
            manifest = dataclasses.replace(manifest, prediction_type=pred)
        scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    else:  # Apple's: what the models' shapes say, the rest from the config folder or SD's defaults
        pred = pred or meta.get(META_PREDICTION) or "epsilon"
        sample, ctx = head.inputs["sample"].shape, head.inputs["encoder_hidden_states"].shape
        decoder = descs.get("vae_decoder")
        latent = decoder.inputs[_first(decoder)].shape[1] if decoder else 4
        xl = "time_ids" in head.inputs  # Apple's --xl-version UNet; a refiner's time ids hold 5 numbers, not 6
        refiner = xl and head.inputs["time_ids"].shape[-1:] == (5,)
        defaults = _CONFIGS / ("sdxl-base" if xl else "sd-v2" if pred == "v_prediction" else "sd-v1")
        scheduler = cfg.scheduler if cfg else _read_json(defaults / "scheduler" / "scheduler_config.json")
        scale = (cfg.latent_scale if cfg else None) or float(meta.get(META_LATENT_SCALE, 0.13025 if xl else 0.18215))
        upscaler = "class_labels" in head.inputs
        unet_config = {"in_channels": sample[1], "sample_size": max(sample[2], sample[3]),
                       "cross_attention_dim": ctx[1] if len(ctx) == 4 else ctx[-1],
                       "num_class_embeds": 1000 if upscaler else None,
                       "addition_embed_type": "text_time" if xl else None}
        vae_config = {"latent_channels": latent, "scaling_factor": scale,
                      "block_out_channels": [0] * (int(math.log2(vae_factor)) + 1)}
        weights = _weights(models.paths[models.unet_parts[0]])
        manifest = manifest_from_configs(
            unet_config, vae_config, {**scheduler, "prediction_type": pred},
            name=models.model_version or root.name, model_hash=file_hash(weights) if weights else "",
            source=str(root.resolve()),
            max_noise_level=int((cfg.index if cfg else {}).get("max_noise_level", 350)) if upscaler else None,
            force_zeros_for_empty_prompt=bool((cfg.index if cfg else {}).get("force_zeros_for_empty_prompt", True)),
            requires_aesthetics_score=refiner)
    scheduler = {**scheduler, "prediction_type": manifest.prediction_type}

    low_res = None
    if manifest.kind is ModelKind.UPSCALER:
        for sub in (root / "low_res_scheduler", cfg.folder / "low_res_scheduler" if cfg else None):
            if sub is not None and (sub / "scheduler_config.json").is_file():
                low_res = DDPMScheduler.from_config(_read_json(sub / "scheduler_config.json"))
                break
        low_res = low_res or DDPMScheduler(num_train_timesteps=1000)
    resolutions = [tuple(r) for r in data["settings"]["resolutions"]] if data is not None else None
    backend = CoreMLBackend(models, descs, vae_factor=vae_factor, resolutions=resolutions,
                            compute_units=compute_units, use_coreml=use_coreml, runtime=runtime)
    if manifest.xl:
        tokenizers = {"tokenizer": None if manifest.refiner else _tokenizer(root, models, cfg, xl=1),
                      "tokenizer_2": _tokenizer(root, models, cfg, xl=2)}
    else:
        tokenizers = {"tokenizer": _tokenizer(root, models, cfg, v2=manifest.cross_attention_dim == 1024)}
    bundle = ModelBundle(manifest=manifest, backend=backend, scheduler_config=scheduler, low_res_scheduler=low_res,
                         **tokenizers)
    bundle.notice = None if backend.use_coreml or runtime is not None else OFF_MAC_NOTICE
    return bundle
