"""What a model is: kind, channels, prediction type, scaling, resolution.

Identity comes from the component configs (UNet in-channels, class embeddings, VAE depth, scheduler
prediction type), never from a file or folder name.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from editsuite.errors import UserError


class Family(str, enum.Enum):
    SD = "sd"  # SD 1.x / 2.x: one CLIP text encoder, the UNet conditioned on its hidden states
    SDXL = "sdxl"  # two text encoders; the UNet also takes the pooled text embedding and size "time ids"


class ModelKind(str, enum.Enum):
    BASE = "base"  # 4-channel UNet: txt2img, img2img, outpaint, tiled upscale, 4-channel inpaint
    INPAINTING = "inpainting"  # 9-channel UNet: latents + mask + masked-image latents
    UPSCALER = "x4-upscaler"  # 7-channel UNet: latents + noised low-res image, class_labels=noise_level


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The identity of a model bundle, derived from its configs."""

    kind: ModelKind
    unet_in_channels: int
    latent_channels: int
    prediction_type: str  # "epsilon" or "v_prediction"
    scaling_factor: float  # latent scaling (0.18215 for SD 1.x/2.x, 0.08333 for the x4 upscaler)
    vae_scale_factor: int  # pixels per latent cell (8, or 4 for the x4 upscaler)
    native_resolution: int  # the side length the UNet was trained at, in pixels
    cross_attention_dim: int
    scheduler: str  # the model's own scheduler class
    name: str = ""
    model_hash: str = ""  # short hash of the weights, as other SD tools show it
    source: str = ""
    max_noise_level: int | None = None  # x4 upscaler only
    family: Family = Family.SD
    # SDXL: an empty negative prompt is all zeros rather than the encoded "" (the pipeline's config)
    force_zeros_for_empty_prompt: bool = True
    vae: str = ""  # a VAE loaded in place of the model's own (--vae): its file or folder name
    # the SDXL refiner: conditioned on an aesthetic score instead of a target size, one text encoder (the second)
    requires_aesthetics_score: bool = False

    @property
    def refiner(self) -> bool:
        return self.xl and self.requires_aesthetics_score

    @property
    def xl(self) -> bool:
        return self.family is Family.SDXL

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["family"] = self.family.value
        return d


def _cfg(config: Any) -> Mapping[str, Any]:
    return config if isinstance(config, Mapping) else dict(config)


def manifest_from_configs(
    unet_config: Any,
    vae_config: Any,
    scheduler_config: Any,
    *,
    name: str = "",
    model_hash: str = "",
    source: str = "",
    max_noise_level: int | None = None,
    force_zeros_for_empty_prompt: bool = True,
    vae_name: str = "",
    requires_aesthetics_score: bool = False,
) -> Manifest:
    """Derive the manifest from diffusers configs; refuse what is not a Stable Diffusion UNet."""
    unet, vae, sched = _cfg(unet_config), _cfg(vae_config), _cfg(scheduler_config)
    latent = int(vae.get("latent_channels", 4))
    in_ch = int(unet.get("in_channels", 0))
    if in_ch == latent:
        kind = ModelKind.BASE
    elif in_ch == 2 * latent + 1:
        kind = ModelKind.INPAINTING
    elif in_ch == latent + 3 and unet.get("num_class_embeds"):
        kind = ModelKind.UPSCALER
    else:
        raise UserError(
            f"{source or 'this model'} has a UNet with {in_ch} input channels; editsuite supports Stable Diffusion "
            f"models with {latent} (base), {2 * latent + 1} (inpainting) or {latent + 3} (x4 upscaler)"
        )
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    native = int(sample_size) * vae_scale
    cad = unet.get("cross_attention_dim", 768)
    if isinstance(cad, (list, tuple)):
        cad = cad[0]
    return Manifest(
        kind=kind,
        unet_in_channels=in_ch,
        latent_channels=latent,
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_scale_factor=vae_scale,
        native_resolution=native,
        cross_attention_dim=int(cad),
        scheduler=str(sched.get("_class_name", "PNDMScheduler")),
        name=name,
        model_hash=model_hash,
        source=source,
        max_noise_level=max_noise_level,
        family=Family.SDXL if unet.get("addition_embed_type") == "text_time" else Family.SD,
        force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt),
        vae=vae_name,
        requires_aesthetics_score=bool(requires_aesthetics_score),
    )
