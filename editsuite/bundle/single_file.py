"""Single-file checkpoints: original Stable Diffusion (LDM layout) files to diffusers components, offline.

Supports SD 1.x and SD 2.x checkpoints, and the 9-channel inpainting variants of both. The model type is
detected from the checkpoint's keys and tensor shapes (never from the file name):

    v1             CLIP ViT-L text encoder (``cond_stage_model.transformer.*``), 4-channel UNet
    v2             OpenCLIP ViT-H text encoder (``cond_stage_model.model.*``), 4-channel UNet
    inpainting     as v1, 9-channel UNet (latents + mask + masked-image latents)
    inpainting_v2  as v2, 9-channel UNet

Weights are converted with diffusers' own conversion functions (``diffusers.loaders.single_file_utils``)
and put into models built from the config folders shipped in ``editsuite/configs/<type>/`` (or the folder
a caller passes as ``config=``). Nothing touches the network: every config and tokenizer file is local, and
every ``from_pretrained`` call gets ``local_files_only=True``.

``.safetensors`` files are read as they are. Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can
run arbitrary code when loaded, so they are refused unless the caller opts in (``allow_pickle=True``, the
CLI's ``--allow-pickle``); even then they are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from editsuite.errors import UserError

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# diffusers' model-type name -> shipped config folder
CONFIG_FOLDERS = {
    "v1": "sd-v1",
    "v2": "sd-v2",
    "inpainting": "sd-v1-inpainting",
    "inpainting_v2": "sd-v2-inpainting",
    "xl_base": "sdxl-base",
    "xl_inpaint": "sdxl-base",  # SDXL base's configs with a 9-channel UNet (taken from the checkpoint)
}
DESCRIPTIONS = {
    "v1": "Stable Diffusion 1.x",
    "v2": "Stable Diffusion 2.x",
    "inpainting": "Stable Diffusion 1.x inpainting",
    "inpainting_v2": "Stable Diffusion 2.x inpainting",
    "xl_base": "Stable Diffusion XL",
    "xl_inpaint": "Stable Diffusion XL inpainting",
}
SUPPORTED = (
    "supported: Stable Diffusion 1.x, 2.x and XL base checkpoints in the original (LDM) layout, "
    "and the 9-channel inpainting variants of 1.x, 2.x and XL"
)
# names for the model types diffusers can detect but this loader does not handle (prefix match, first wins)
_OTHER_NAMES = (
    ("xl_inpaint", "Stable Diffusion XL inpainting"),
    ("xl_refiner", "Stable Diffusion XL refiner"),
    ("xl_", "Stable Diffusion XL"),
    ("playground", "Playground v2.5 (SDXL-based)"),
    ("upscale", "Stable Diffusion x4 upscaler"),
    ("controlnet", "ControlNet"),
    ("instruct-pix2pix", "InstructPix2Pix"),
    ("sd3", "Stable Diffusion 3"),
    ("sd35", "Stable Diffusion 3.5"),
    ("stable_cascade", "Stable Cascade"),
    ("animatediff", "AnimateDiff motion module"),
    ("flux", "FLUX"),
    ("chroma", "Chroma (FLUX-based)"),
    ("ltx", "LTX-Video"),
    ("autoencoder-dc", "DC-AE autoencoder"),
    ("mochi", "Mochi video"),
    ("hunyuan", "HunyuanVideo"),
    ("auraflow", "AuraFlow"),
    ("lumina", "Lumina"),
    ("sana", "Sana"),
    ("wan", "Wan video"),
    ("hidream", "HiDream"),
    ("cosmos", "Cosmos"),
    ("z-image", "Z-Image"),
    ("qwen", "Qwen-Image"),
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP text tower
_CLIP_TOKEN_EMB = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
_OPEN_CLIP_TOKEN_EMB = OPEN_CLIP_PREFIX + "token_embedding.weight"
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L, as transformers lays it out
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG, with its text_projection
XL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner has OpenCLIP bigG alone


def load_single_file(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> dict:
    """Return {'tokenizer', 'text_encoder', 'unet', 'vae', 'scheduler', 'model_type'} for an original-layout checkpoint.

    `model_type` is one of "v1", "v2", "inpainting", "inpainting_v2" (diffusers' names), detected from the
    checkpoint's keys and shapes. `config` names a diffusers config folder (unet/, vae/, text_encoder/
    config files; tokenizer/ and scheduler/ are optional and fall back to the shipped ones for the detected
    type) to use instead of the shipped `editsuite/configs/<type>/`. The models come back on the CPU, in
    `torch_dtype`, in eval mode. Raises `UserError` for anything the user can fix.
    """
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise UserError(f"torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
    path = Path(path).expanduser()
    custom = _check_config_folder(config) if config is not None else None  # fail fast, before reading GBs
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    model_type = detect_model_type(checkpoint, name=path.name)
    folder = custom or CONFIG_ROOT / CONFIG_FOLDERS[model_type]
    log.info("%s: %s checkpoint, configs from %s", path.name, DESCRIPTIONS[model_type], folder)

    unet = _build_unet(checkpoint, folder, torch_dtype, path.name, model_type)
    _drop_prefix(checkpoint, UNET_PREFIX)  # free what is no longer needed as we go
    vae = _build_vae(checkpoint, folder, torch_dtype, path.name)
    _drop_prefix(checkpoint, VAE_PREFIX)
    xl = model_type.startswith("xl_")
    text_encoder = _build_text_encoder(checkpoint, folder, model_type, torch_dtype, path.name)
    parts = {}
    if xl:
        _drop_prefix(checkpoint, XL_CLIP_PREFIX)
        parts["text_encoder_2"] = _build_text_encoder(checkpoint, folder, model_type, torch_dtype, path.name,
                                                      second=True)
        parts["tokenizer_2"] = _load_tokenizer(folder, model_type, "tokenizer_2")
    checkpoint.clear()
    tokenizer = _load_tokenizer(folder, model_type)
    scheduler = _load_scheduler(folder, model_type)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
        "model_type": model_type,
        **parts,
    }


# ----------------------------------------------------------------------------------------------- reading


def load_text_encoders_xl(path: str | Path, *, allow_pickle: bool = False, config: str | Path | None = None,
                          torch_dtype: torch.dtype = torch.float32) -> tuple:
    """SDXL base's two text encoders read again from its checkpoint, and nothing else from it (a .safetensors
    file is read key by key): (text_encoder, text_encoder_2)."""
    path = Path(path).expanduser()
    folder = _check_config_folder(config) if config is not None else CONFIG_ROOT / CONFIG_FOLDERS["xl_base"]
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle, only="conditioner.")
    first = _build_text_encoder(checkpoint, folder, "xl_base", torch_dtype, path.name)
    _drop_prefix(checkpoint, XL_CLIP_PREFIX)
    return first, _build_text_encoder(checkpoint, folder, "xl_base", torch_dtype, path.name, second=True)


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False, only: str = "") -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors into a flat {key: tensor} dict (EMA copies, `model_ema.*`, are skipped);
    `only`: the keys that start with it (the rest of a .safetensors file is not read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is a folder, not a checkpoint file; pass a single .safetensors file")
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise UserError(
            f"{path.name}: unsupported checkpoint file type {suffix or '(no extension)'!r}; expected a .safetensors "
            "file (or, with --allow-pickle, .ckpt/.bin/.pt/.pth)"
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(
            f"{path.name} is a pickle checkpoint, and loading a pickle file can run arbitrary code; convert it to "
            ".safetensors, or pass --allow-pickle if you trust where it came from"
        )
    if suffix in SAFE_SUFFIXES:
        checkpoint = _read_safetensors(path, only)
    else:
        checkpoint = {k: v for k, v in _read_pickle(path).items() if k.startswith(only)}
    if not checkpoint:
        raise UserError(f"{path.name} holds no tensors; it is not a Stable Diffusion checkpoint ({SUPPORTED})")
    return _normalize_keys(checkpoint)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def _read_safetensors(path: Path, only: str = "") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(only) and not k.startswith("model_ema.")}
    except OSError as e:
        raise UserError(f"cannot read {path}: {_reason(e)}") from None
    except Exception as e:  # SafetensorError and friends: bad header, truncated data
        raise UserError(
            f"{path.name} is not a valid .safetensors file (it may be truncated or corrupt: {_reason(e)})"
        ) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read {path}: {_reason(e)}") from None
    except pickle.UnpicklingError as e:  # weights_only refused a non-tensor object (or the pickle is broken)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"Unsupported [a-z]+: (?:GLOBAL )?\S+", text)
        if found:
            raise UserError(
                f"{path.name} holds more than tensors ({found.group(0).strip()}), which a weights-only load "
                "refuses; convert it to .safetensors with a tool you trust"
            ) from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        raise UserError(
            f"{path.name} cannot be read as a torch checkpoint (it may be truncated or corrupt: "
            f"{detail.group(1).strip() if detail else _reason(e)})"
        ) from None
    except Exception as e:  # corrupt or truncated archive, EOF, not a torch file...
        raise UserError(
            f"{path.name} cannot be read as a torch checkpoint (it may be truncated or corrupt: "
            f"{type(e).__name__}: {_reason(e)})"
        ) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict (found {type(obj).__name__}); {SUPPORTED}")
    return {
        k: v for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and not k.startswith("model_ema.")
    }


def _normalize_keys(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map known harmless layout variants onto the one diffusers' converters expect."""
    # Some SD 1.x files store the CLIPTextTransformer without the `text_model.` level.
    flat = CLIP_PREFIX + "embeddings.token_embedding.weight"
    if flat in checkpoint and _CLIP_TOKEN_EMB not in checkpoint:
        checkpoint = {
            (CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX):] if k.startswith(CLIP_PREFIX) else k): v
            for k, v in checkpoint.items()
        }
    return checkpoint


def _drop_prefix(checkpoint: dict, prefix: str) -> None:
    for k in [k for k in checkpoint if k.startswith(prefix)]:
        del checkpoint[k]


# --------------------------------------------------------------------------------------------- detection


def _other_name(model_type: str) -> str:
    for prefix, name in _OTHER_NAMES:
        if model_type.startswith(prefix):
            return name
    return model_type


def detect_model_type(checkpoint: dict[str, torch.Tensor], *, name: str = "checkpoint") -> str:
    """Return "v1", "v2", "inpainting" or "inpainting_v2" from the keys and shapes, or raise UserError.

    diffusers' `infer_diffusers_model_type` names the families this loader refuses (SDXL, SD3, FLUX,
    ControlNet, the x4 upscaler...). For SD 1.x/2.x the text-encoder layout decides v1 (CLIP) vs v2 (OpenCLIP)
    and the UNet's input channels decide plain (4) vs inpainting (9); this agrees with diffusers on real
    checkpoints and also works for scaled-down test models, whose widths are not the real 768/1024.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    xl = _detect_xl(checkpoint, name)
    if xl is not None:
        return xl
    try:
        inferred = infer_diffusers_model_type(checkpoint)
    except Exception:  # partial checkpoints can trip its key lookups; our own checks below still apply
        inferred = None
    if inferred is not None and inferred not in CONFIG_FOLDERS:
        raise UserError(
            f"{name} looks like a {_other_name(inferred)} checkpoint ({inferred}), which is not supported; {SUPPORTED}"
        )

    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise UserError(
            f"{name} is not a Stable Diffusion checkpoint: it has no UNet weights in the original layout "
            f"({UNET_PREFIX}*); {SUPPORTED}"
        )
    in_channels = int(conv_in.shape[1])
    if in_channels not in (4, 9):
        hint = " (InstructPix2Pix uses 8)" if in_channels == 8 else ""
        raise UserError(f"{name} has a UNet with {in_channels} input channels{hint}, which is not supported; "
                        "expected 4 (text-to-image) or 9 (inpainting)")

    has_clip = _CLIP_TOKEN_EMB in checkpoint
    has_open_clip = _OPEN_CLIP_TOKEN_EMB in checkpoint
    if has_clip == has_open_clip:
        what = "both a CLIP and an OpenCLIP" if has_clip else "no"
        raise UserError(
            f"{name} has {what} text encoder (cond_stage_model.*); a Stable Diffusion checkpoint holds exactly one "
            "(UNet-only or merged files are not supported)"
        )
    if not any(k.startswith(VAE_PREFIX) for k in checkpoint):
        raise UserError(f"{name} has no VAE weights ({VAE_PREFIX}*); a full Stable Diffusion checkpoint is needed")

    text_width = int(checkpoint[_CLIP_TOKEN_EMB if has_clip else _OPEN_CLIP_TOKEN_EMB].shape[-1])
    context_widths = {
        int(v.shape[-1]) for k, v in checkpoint.items()
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    }
    if context_widths and context_widths != {text_width}:
        raise UserError(
            f"{name}: the UNet's cross-attention width {sorted(context_widths)} does not match the text encoder's "
            f"width {text_width}; the checkpoint mixes parts of different models"
        )

    family = "v2" if has_open_clip else "v1"
    if in_channels == 9:
        return "inpainting" if family == "v1" else "inpainting_v2"
    return family


def _detect_xl(checkpoint: dict[str, torch.Tensor], name: str) -> str | None:
    """"xl_base" for an SDXL base checkpoint, "xl_inpaint" for SDXL inpainting (a 9-channel UNet), None for
    one without SDXL's text encoders (conditioner.*); refuses the SDXL kinds editsuite does not run yet and
    partial files. Keys decide, not diffusers' layer-count probe (which needs 10+ layers, so it misses
    scaled-down test models)."""
    if not any(k.startswith("conditioner.embedders.") for k in checkpoint):
        return None
    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and int(conv_in.shape[1]) not in (4, 9):
        raise UserError(f"{name} has an SDXL UNet with {int(conv_in.shape[1])} input channels, which is not "
                        f"supported; expected 4 (text-to-image) or 9 (inpainting)")
    if any(k.startswith(XL_REFINER_PREFIX) for k in checkpoint):
        raise UserError(f"{name} looks like a Stable Diffusion XL refiner checkpoint, which is not supported yet; "
                        f"{SUPPORTED}")
    for key in (XL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
                XL_OPEN_CLIP_PREFIX + "token_embedding.weight"):
        if key not in checkpoint:
            raise UserError(f"{name} has SDXL text encoder weights (conditioner.embedders.*) but not {key}; a full "
                            "SDXL checkpoint holds both text encoders")
    if conv_in is None or conv_in.ndim != 4 or UNET_PREFIX + "label_emb.0.0.weight" not in checkpoint:
        raise UserError(f"{name} has SDXL text encoders but no SDXL UNet ({UNET_PREFIX}*, with label_emb); "
                        f"{SUPPORTED}")
    if not any(k.startswith(VAE_PREFIX) for k in checkpoint):
        raise UserError(f"{name} has no VAE weights ({VAE_PREFIX}*); a full Stable Diffusion checkpoint is needed")
    return "xl_inpaint" if int(conv_in.shape[1]) == 9 else "xl_base"


# -------------------------------------------------------------------------------------------- components


def _check_config_folder(config: str | Path) -> Path:
    folder = Path(config).expanduser()
    if not folder.is_dir():
        raise UserError(f"config folder not found: {folder}")
    missing = [sub for sub in ("unet/config.json", "vae/config.json", "text_encoder/config.json")
               if not (folder / sub).is_file()]
    if missing:
        raise UserError(f"{folder} is not a diffusers config folder: it has no {', '.join(missing)}")
    return folder


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file} as JSON ({_reason(e)})") from None


def _empty_weights():
    """Create parameters on the meta device (no allocation, no random init); buffers stay real on the CPU.
    The weights then come in with `load_state_dict(assign=True)`."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _assign_weights(model: nn.Module, state_dict: dict, component: str, name: str, dtype: torch.dtype) -> nn.Module:
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _reason(e))
        raise UserError(f"{name}: the {component} weights do not fit the {component} config ({detail})") from None
    if missing:
        raise UserError(
            f"{name}: the checkpoint lacks {len(missing)} {component} weight(s) the config needs "
            f"(first: {missing[0]}); it does not match the {component} config"
        )
    if unexpected:
        log.warning("%s: ignored %d %s weight(s) the config has no place for (first: %s)",
                    name, len(unexpected), component, unexpected[0])
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen after an empty `missing`, but never hand back a half-built model
        raise UserError(f"{name}: the {component} weight {leftover[0]} was not in the checkpoint")
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        # nn.Module.to, not diffusers' override: that one warns about fp32-pinned modules even when there are
        # none (UNet2DConditionModel and AutoencoderKL pin none).
        nn.Module.to(model, dtype=dtype)
    return model.eval()


def unet_state_dict(checkpoint: dict, config: dict) -> dict:
    """The UNet's weights from an original-layout checkpoint, in diffusers' UNet2DConditionModel layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(checkpoint, config)


def vae_state_dict(checkpoint: dict, config: dict) -> dict:
    """The VAE's weights from an original-layout checkpoint, in diffusers' AutoencoderKL layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # Only the first_stage_model.* keys: the converter looks for the "first_stage_model." / "vae." prefixes.
    return convert_ldm_vae_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}, config)


_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def text_encoder_state_dict(checkpoint: dict, model, model_type: str, second: bool = False) -> dict:
    """The text encoder's weights from an original-layout checkpoint, in the layout of `model` (a CLIPTextModel,
    or SDXL's second encoder, a CLIPTextModelWithProjection, with `second`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if second:  # SDXL's OpenCLIP bigG: every layer and its projection are used (the pooled embedding)
        state_dict = convert_open_clip_checkpoint(model, checkpoint, prefix=XL_OPEN_CLIP_PREFIX)
        return {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if model_type in ("v2", "inpainting_v2"):
        state_dict = convert_open_clip_checkpoint(model, checkpoint, prefix=OPEN_CLIP_PREFIX)
    else:
        state_dict = convert_ldm_clip_checkpoint(checkpoint)
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions keep it.
    if not hasattr(model, "text_model"):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    n_layers = model.config.num_hidden_layers
    kept = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):  # a buffer old transformers versions saved; the model builds its own
            continue
        m = _LAYER_RE.search(k)
        if m and int(m.group(1)) >= n_layers:
            # SD 2.x conditions on OpenCLIP's penultimate layer: its text encoder config has 23 of the 24
            # layers in the file, and the last one is left out (as is the unused text_projection).
            continue
        kept[k] = v
    kept.pop("text_projection.weight", None)
    return kept


@contextlib.contextmanager
def _user_errors(what: str):
    """Turn what diffusers/transformers raise for a bad config file or a mismatched checkpoint into a UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what}: {_reason(e)}") from None


def _build_diffusers_model(cls, subfolder: str, label: str, to_state_dict, checkpoint: dict, folder: Path,
                           dtype: torch.dtype, name: str, overrides: dict | None = None):
    """A UNet or VAE built empty from its config folder (and `overrides`), then filled with the converted
    checkpoint weights."""
    with _user_errors(f"invalid {label} config {folder / subfolder / 'config.json'}"):
        config = dict(cls.load_config(str(folder / subfolder), local_files_only=True)) | (overrides or {})
        with _empty_weights():
            model = cls.from_config(config)
    with _user_errors(f"{name}: the {label} weights do not match the {label} config"):
        state_dict = to_state_dict(checkpoint, config)
    return _assign_weights(model, state_dict, label, name, dtype)


def _build_unet(checkpoint: dict, folder: Path, dtype: torch.dtype, name: str, model_type: str = ""):
    from diffusers import UNet2DConditionModel

    # SDXL inpainting shares SDXL base's configs, with 9 input channels
    channels = {"in_channels": 9} if model_type == "xl_inpaint" else None
    return _build_diffusers_model(UNet2DConditionModel, "unet", "UNet", unet_state_dict, checkpoint, folder, dtype,
                                  name, channels)


def _build_vae(checkpoint: dict, folder: Path, dtype: torch.dtype, name: str):
    from diffusers import AutoencoderKL

    return _build_diffusers_model(AutoencoderKL, "vae", "VAE", vae_state_dict, checkpoint, folder, dtype, name)


def _build_text_encoder(checkpoint: dict, folder: Path, model_type: str, dtype: torch.dtype, name: str,
                        second: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sub, label = ("text_encoder_2", "second text encoder") if second else ("text_encoder", "text encoder")
    if not (folder / sub / "config.json").is_file():  # a custom config folder for SD 1.x/2.x has no second one
        folder = CONFIG_ROOT / CONFIG_FOLDERS[model_type]
    with _user_errors(f"invalid {label} config {folder / sub / 'config.json'}"):
        config = CLIPTextConfig.from_pretrained(str(folder / sub), local_files_only=True)
        with _empty_weights():
            model = (CLIPTextModelWithProjection if second else CLIPTextModel)(config)
    with _user_errors(f"{name}: the {label} weights do not match the {label} config"):
        state_dict = text_encoder_state_dict(checkpoint, model, model_type, second)
    return _assign_weights(model, state_dict, label, name, dtype)


def _load_tokenizer(folder: Path, model_type: str, subfolder: str = "tokenizer"):
    from transformers import CLIPTokenizer

    sub = folder / subfolder
    if not (sub / "vocab.json").is_file():
        sub = CONFIG_ROOT / CONFIG_FOLDERS[model_type] / subfolder
    try:
        return CLIPTokenizer.from_pretrained(str(sub), local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer from {sub}: {_reason(e)}") from None


def _load_scheduler(folder: Path, model_type: str):
    import diffusers

    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        file = CONFIG_ROOT / CONFIG_FOLDERS[model_type] / "scheduler" / "scheduler_config.json"
    config = _read_json(file)
    cls_name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, str(cls_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"{file}: unknown scheduler class {cls_name!r}")
    with _user_errors(f"invalid scheduler config {file}"):
        return cls.from_config(config)
