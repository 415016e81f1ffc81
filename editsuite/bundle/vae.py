"""`--vae`: another VAE in place of a model's own (an SDXL "fp16-fix" VAE, SD 1.5's ft-MSE VAE, a
fine-tune's recommended one), as diffusers does with `Pipeline.from_pretrained(model, vae=AutoencoderKL...)`.

Accepted, never from the file name alone:
- a diffusers VAE folder (`config.json` and its weights), or a model folder with a `vae/` subfolder: loaded
  with its own config, as diffusers does (its latent scale and `force_upcast` included);
- a single weights file, in diffusers' layout (`encoder.down_blocks.*`) or the original one
  (`encoder.down.N.block.M`, with or without `first_stage_model.`): built on the model's own VAE config,
  since a file carries none; weights of another shape are a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editsuite.errors import UserError

_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # in both layouts


def vae_name(source) -> str:
    """What the metadata calls the VAE (A1111's "VAE" key): the file or folder name."""
    return Path(str(source)).name


def _class_name(config: Path) -> str | None:
    import json

    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def load_vae(source, like_config, dtype: torch.dtype, *, allow_pickle: bool = False):
    """An AutoencoderKL from `source` (see the module doc); `like_config` is the model's own VAE config."""
    from diffusers import AutoencoderKL

    path = Path(str(source)).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file() or _class_name(folder / "config.json") != "AutoencoderKL":
            raise UserError(f"--vae {path} is not a VAE: pass a diffusers VAE folder (an AutoencoderKL config.json "
                            "and weights), a model folder with vae/, or a .safetensors file")
        if not allow_pickle and not any(folder.glob("*.safetensors")):
            raise UserError(f"--vae {folder} holds no .safetensors weights; loading a pickle can run arbitrary "
                            "code: convert it, or pass --allow-pickle if you trust where it came from")
        try:
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except Exception as e:  # diffusers raises many types for missing or broken files
            raise UserError(f"cannot load the VAE from {folder}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return vae.eval()
    if not path.exists():
        raise UserError(f"--vae {path} not found; pass a VAE folder or a .safetensors file")
    from editsuite.bundle.single_file import _assign_weights, _empty_weights, read_checkpoint

    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    config = dict(like_config)
    with _empty_weights():
        vae = AutoencoderKL.from_config(config)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in checkpoint):
        state = {k: v for k, v in checkpoint.items() if k.startswith(_VAE_PARTS)}  # diffusers' layout already
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in checkpoint) else ""
        # only the VAE's own keys (a VAE file may carry a training loss' weights too)
        ldm = {k: v for k, v in checkpoint.items() if k.removeprefix(prefix).startswith(_VAE_PARTS)}
        if not ldm:
            raise UserError(f"--vae {path.name} holds no VAE weights (encoder.*, decoder.*)")
        try:
            state = convert_ldm_vae_checkpoint(ldm, config)
        except Exception as e:
            raise UserError(f"--vae {path.name}: its weights do not fit this model's VAE ({e})") from None
    return _assign_weights(vae, state, "VAE", f"--vae {path.name}", dtype)
