"""`load_bundle`: from a diffusers folder, a single-file checkpoint or a hub id to a `ModelBundle`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from editsuite.bundle.backend import ModelBackend
from editsuite.bundle.choices import Backend, Device, PredictionType, values_of
from editsuite.bundle.manifest import Manifest, ModelKind, manifest_from_configs
from editsuite.errors import UserError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = values_of(Backend)
DEVICES = values_of(Device)
PREDICTION_TYPES = values_of(PredictionType)


@dataclasses.dataclass
class ModelBundle:
    """The shared modules of one model, on one backend, plus what the loop needs to drive them."""

    manifest: Manifest
    tokenizer: Any  # transformers CLIPTokenizer
    backend: ModelBackend  # TorchBackend or CoreMLBackend
    scheduler_config: dict  # the model's own scheduler config (diffusers format)
    low_res_scheduler: Any = None  # x4 upscaler only: DDPMScheduler that noises the low-res input
    weights_path: Path | None = None  # file hashed for the "Model hash" shown in PNG metadata
    notice: str | None = None  # a line the CLI shows once (e.g. the Core ML backend running off macOS)
    cache_interval: int = 1  # > 1: run the whole UNet every N-th step only (DeepCache); changes the picture
    tokenizer_2: Any = None  # SDXL: the second text encoder's tokenizer (OpenCLIP's, padding with "!")

    @property
    def kind(self) -> ModelKind:
        return self.manifest.kind

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the tensors the loop works in (float32: latents, scheduler, guidance)."""
        return self.backend.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the modules compute in (what `--dtype` chose)."""
        return self.backend.compute_dtype

    def identity(self) -> dict:
        """What the model is, for metadata: the manifest plus the weights' hash (computed once)."""
        if not self.manifest.model_hash and self.weights_path is not None:
            self.manifest = dataclasses.replace(self.manifest, model_hash=file_hash(self.weights_path))
        return self.manifest.to_dict()

    @classmethod
    def from_components(
        cls,
        *,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
        requires_aesthetics_score: bool = False,
        low_res_scheduler=None,
        max_noise_level: int | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        name: str = "",
        source: str = "",
        weights_path: Path | None = None,
    ) -> "ModelBundle":
        """Build a bundle from diffusers/transformers modules already in memory."""
        dev = resolve_device(device)
        return _assemble(
            unet, vae, text_encoder, tokenizer, {**scheduler.config, "_class_name": type(scheduler).__name__},
            low_res_scheduler, max_noise_level,
            dev, resolve_dtype(dtype, dev), name=name, source=source, weights_path=weights_path,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            requires_aesthetics_score=requires_aesthetics_score,
        )


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; use one of: {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but Metal is not available here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from editsuite.bundle.speed import fast_dtype

        return fast_dtype(device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def file_hash(path: Path) -> str:
    """First 10 hex digits of the file's SHA-256: the "Model hash" AUTOMATIC1111 and civitai show."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def load_bundle(
    source: str | os.PathLike,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    *,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    compute_units: str = "all",
    prediction_type: str | None = None,
    modules: frozenset[str] | None = None,
    vae: str | os.PathLike | None = None,
) -> ModelBundle:
    """Load a model from a diffusers folder, a single-file checkpoint, a Core ML bundle or a hub id.

    `config` names a diffusers config folder: for a single-file checkpoint whose architecture differs from
    the shipped SD 1.x/2.x configs, or for a Core ML bundle converted by Apple's tools (scheduler, prediction
    type, latent scale, tokenizer). `prediction_type` (epsilon or v_prediction) overrides the model's.
    `compute_units` picks where Core ML runs a Core ML bundle on macOS. `modules` (a set of text_encoder, unet,
    vae) loads only those weights from a diffusers folder; the others are built empty from their configs, for
    tools that need one module (`convert` holds only the module it converts). `vae` replaces the model's VAE
    (a VAE folder or weights file, see editsuite.bundle.vae).
    """
    from editsuite.bundle.coreml_layout import is_coreml_folder

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction type {prediction_type!r}; use {' or '.join(PREDICTION_TYPES)}")
    path = Path(source).expanduser()
    if is_coreml_folder(path):
        if backend == "torch":
            raise UserError(f"{path} is a Core ML bundle; load it with --backend coreml or auto")
        if vae is not None:
            raise UserError("--vae replaces a PyTorch model's VAE; a Core ML bundle holds its own (convert the model "
                            "with the VAE you want)")
        from editsuite.bundle.coreml_backend import load_coreml_bundle  # optional extra

        return load_coreml_bundle(path, compute_units=compute_units, config=config, prediction_type=prediction_type)
    if backend == "coreml":
        raise UserError(f"{path} is not a Core ML bundle; make one with `editsuite convert {path} -o OUT`")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    other_vae = dict(vae_source=vae, allow_pickle=allow_pickle)
    if path.is_dir():
        bundle = _load_diffusers(path, str(path), dev, dt, local=True, modules=modules, **other_vae)
    elif path.is_file():
        bundle = _load_single_file(path, dev, dt, config=config, **other_vae)
    elif _looks_like_hub_id(str(source)) and not path.suffix:
        bundle = _load_diffusers(str(source), str(source), dev, dt, local=False, modules=modules, **other_vae)
    else:
        raise UserError(f"model {source} not found; pass a diffusers folder, a .safetensors file or a hub id")
    if prediction_type is not None:
        bundle.manifest = dataclasses.replace(bundle.manifest, prediction_type=prediction_type)
        bundle.scheduler_config = {**bundle.scheduler_config, "prediction_type": prediction_type}
    return bundle


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _refuse_pickles(location: Path, allow_pickle: bool) -> None:
    """A diffusers folder whose weights are pickles (diffusion_pytorch_model.bin, pytorch_model.bin) is
    refused as a .ckpt is: loading a pickle can run code. With allow_pickle, diffusers loads them (it reads
    .bin files with torch.load(weights_only=True))."""
    from editsuite.bundle.single_file import PICKLE_SUFFIXES

    for sub in ("unet", "vae", "text_encoder"):
        folder = location / sub
        if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{folder / pickles[0]} is a pickle, and loading a pickle file can run arbitrary code; "
                            "convert the model to .safetensors, or pass --allow-pickle if you trust where it came from")


def _load_diffusers(location, source: str, device, dtype, *, local: bool, modules=None,
                    allow_pickle: bool = False, vae_source=None) -> ModelBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if local:
        index_path = Path(location) / "model_index.json"
        if not index_path.is_file():
            raise UserError(
                f"{location} is not a Stable Diffusion model folder (no model_index.json); pass a diffusers folder, "
                "a .safetensors checkpoint or a hub id"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{index_path} cannot be read as JSON ({e})") from None
        if not isinstance(index, dict):
            raise UserError(f"{index_path} is not a model index (a JSON object)")
        # a refiner lists its missing parts as null
        absent = lambda c: index.get(c) in (None, [None, None])  # noqa: E731
        # SDXL's refiner has the second text encoder only
        needed = ("text_encoder_2", "tokenizer_2") if not absent("text_encoder_2") and absent("text_encoder") \
            else ("text_encoder", "tokenizer")
        missing = [c for c in ("unet", "vae", *needed, "scheduler") if absent(c)]
        if missing:
            raise UserError(
                f"{location} is not a Stable Diffusion model folder: model_index.json has no {', '.join(missing)}"
            )
        _refuse_pickles(Path(location), allow_pickle)
    else:
        index = {}
        absent = lambda c: False  # noqa: E731
    kw = dict(local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1")
    try:
        wanted = {"text_encoder", "unet", "vae"} if modules is None else set(modules)
        text_encoder = tokenizer = None
        if not absent("text_encoder") or not local:
            text_encoder = _empty(CLIPTextModel, location, "text_encoder", kw) if "text_encoder" not in wanted else \
                _text_encoder(CLIPTextModel, location, "text_encoder", dtype, local, kw)
            tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kw)
        text_encoder_2 = tokenizer_2 = None
        if not absent("text_encoder_2"):  # SDXL (a hub id is read as SD 1.x/2.x)
            text_encoder_2 = _empty(CLIPTextModelWithProjection, location, "text_encoder_2", kw) \
                if "text_encoder" not in wanted else \
                _text_encoder(CLIPTextModelWithProjection, location, "text_encoder_2", dtype, local, kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer_2", **kw)
        # the text encoders first: transformers holds a module's file and its cast copy at once while loading
        # (SDXL's second encoder: 1.3 GiB twice), which costs least before the UNet is in memory
        unet = _empty(UNet2DConditionModel, location, "unet", kw) if "unet" not in wanted else \
            _low_memory(UNet2DConditionModel, location, "unet", dtype, local) or \
            UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=dtype, **kw)
        vae = _empty(AutoencoderKL, location, "vae", kw) if "vae" not in wanted else \
            _low_memory(AutoencoderKL, location, "vae", dtype, local) or \
            AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype, **kw)
        scheduler_config = _scheduler_config(location, "scheduler", kw)
        low_res = None
        max_noise_level = None
        if local and "low_res_scheduler" in index:
            low_res = DDPMScheduler.from_pretrained(location, subfolder="low_res_scheduler", **kw)
            max_noise_level = int(index.get("max_noise_level", 350))
        elif not local:
            try:
                low_res = DDPMScheduler.from_pretrained(location, subfolder="low_res_scheduler", **kw)
                max_noise_level = 350
            except Exception:  # most models have none
                low_res = None
    except UserError:
        raise
    except Exception as e:  # diffusers/transformers raise many types for missing or broken files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the model from {source}: {msg}") from None
    weights = None
    if local:
        cands = sorted((Path(location) / "unet").glob("*.safetensors")) + sorted((Path(location) / "unet").glob("*.bin"))
        weights = cands[0] if cands else None
    def reload_text_encoders():
        first = None if absent("text_encoder") else _text_encoder(CLIPTextModel, location, "text_encoder", dtype,
                                                                   local, kw)
        return first, _text_encoder(CLIPTextModelWithProjection, location, "text_encoder_2", dtype, local, kw)

    bundle = _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, low_res, max_noise_level, device, dtype,
                       name=Path(str(location)).name, source=source, weights_path=weights,
                       reload_text_encoders=reload_text_encoders if local and text_encoder_2 is not None else None,
                       text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                       force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                       requires_aesthetics_score=index.get("requires_aesthetics_score", False),
                       vae_source=vae_source, allow_pickle=allow_pickle)
    return bundle


def _empty(cls, location, subfolder: str, kw):
    """The module built from its config alone, its weights on the meta device: no memory, no reading."""
    import accelerate
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with accelerate.init_empty_weights():
        if cls in (CLIPTextModel, CLIPTextModelWithProjection):
            return cls(CLIPTextConfig.from_pretrained(location, subfolder=subfolder, **kw))
        return cls.from_config(cls.load_config(location, subfolder=subfolder, **kw))


SLICE_BYTES = 256 << 20


def _text_encoder(cls, location, subfolder: str, dtype, local: bool, kw):
    return _low_memory(cls, location, subfolder, dtype, local) or \
        cls.from_pretrained(location, subfolder=subfolder, dtype=dtype, **kw)


def _low_memory(cls, location, subfolder: str, dtype, local: bool):
    """Load a diffusers module from its safetensors file a slice of tensors at a time, or None to leave it
    to `from_pretrained`. diffusers reads the whole file and then casts it, so loading a 1.7 GB UNet peaks at
    twice its size (measured: 3.6 GiB for SD 1.5 in bf16); slice by slice, with the file unmapped after each
    slice, the peak is the module plus one slice (2.1 GiB). Used only when the file's keys are exactly the
    module's, so diffusers' key conversions for older layouts still apply to everything else. Text encoders
    (transformers' CLIP models, `model.safetensors`) load the same way: transformers too holds the file and
    its cast copy at once (SDXL's second encoder: 1.3 GiB twice)."""
    transformers_model = hasattr(cls, "config_class")
    file = Path(location) / subfolder / ("model.safetensors" if transformers_model else
                                         "diffusion_pytorch_model.safetensors")
    if not local or not file.is_file():
        return None
    import accelerate
    from safetensors import safe_open

    try:
        with accelerate.init_empty_weights(include_buffers=False):
            if transformers_model:
                model = cls(cls.config_class.from_pretrained(Path(location) / subfolder))
            else:
                model = cls.from_config(cls.load_config(location, subfolder=subfolder))
        with safe_open(file, "pt") as f:
            sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # an unusual config or file: from_pretrained will load it or say what is wrong
        return None
    if set(sizes) != set(model.state_dict()):
        return None
    slices, current, used = [], [], 0
    for key, n in sizes.items():
        if current and used + n * 4 > SLICE_BYTES:
            slices.append(current)
            current, used = [], 0
        current.append(key)
        used += n * 4
    slices.append(current)
    for keys in slices:
        with safe_open(file, "pt") as f:
            model.load_state_dict({k: f.get_tensor(k).to(dtype) for k in keys}, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):
        return None
    return model.eval()


def _scheduler_config(location, subfolder, kw) -> dict:
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(location, subfolder=subfolder, **kw))


def _load_single_file(path: Path, device, dtype, *, allow_pickle: bool, config, vae_source=None) -> ModelBundle:
    from editsuite.bundle.single_file import load_single_file, load_text_encoders_xl

    parts = load_single_file(path, allow_pickle=allow_pickle, config=config, torch_dtype=dtype)
    return _assemble(
        parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
        {**parts["scheduler"].config, "_class_name": type(parts["scheduler"]).__name__},
        None, None, device, dtype, name=path.stem, source=str(path), weights_path=path,
        reload_text_encoders=(lambda: load_text_encoders_xl(path, allow_pickle=allow_pickle, config=config,
                                                            torch_dtype=dtype)) if "text_encoder_2" in parts else None,
        text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
        vae_source=vae_source, allow_pickle=allow_pickle,
    )


def _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, low_res, max_noise_level, device, dtype, *,
              name, source, weights_path, text_encoder_2=None, tokenizer_2=None,
              force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False, vae_source=None,
              allow_pickle: bool = False, reload_text_encoders=None) -> ModelBundle:
    """`reload_text_encoders` (SDXL from disk): reads both text encoders again, so the backend can let them go
    between prompts."""
    from editsuite.bundle.torch_backend import TorchBackend

    if vae_source is not None:
        from editsuite.bundle.vae import load_vae, vae_name

        vae = load_vae(vae_source, vae.config, dtype, allow_pickle=allow_pickle)
    manifest = manifest_from_configs(
        unet.config, vae.config, scheduler_config, name=name, source=source, max_noise_level=max_noise_level,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        vae_name=vae_name(vae_source) if vae_source is not None else "",
        requires_aesthetics_score=requires_aesthetics_score,
    )
    if manifest.xl and (text_encoder_2 is None or tokenizer_2 is None):
        raise UserError(f"{source or name} has an SDXL UNet but no second text encoder and tokenizer "
                        "(text_encoder_2/, tokenizer_2/); pass the whole SDXL model folder")
    if (text_encoder is None or tokenizer is None) and not manifest.refiner:
        raise UserError(f"{source or name} has no text encoder and tokenizer (text_encoder/, tokenizer/); pass the "
                        "whole model folder")
    if manifest.kind is ModelKind.UPSCALER and low_res is None:
        from diffusers import DDPMScheduler

        low_res = DDPMScheduler(num_train_timesteps=1000)
    if manifest.kind is ModelKind.UPSCALER and max_noise_level is None:
        manifest = dataclasses.replace(manifest, max_noise_level=350)
    backend = TorchBackend(text_encoder, unet, vae, device=device, dtype=dtype, text_encoder_2=text_encoder_2)
    if manifest.xl:
        backend.reload_text_encoders = reload_text_encoders
    return ModelBundle(
        manifest=manifest,
        tokenizer=tokenizer,
        backend=backend,
        scheduler_config=scheduler_config,
        low_res_scheduler=low_res,
        weights_path=weights_path,
        tokenizer_2=tokenizer_2,
    )
