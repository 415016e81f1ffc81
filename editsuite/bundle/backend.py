"""The one interface every backend offers the shared loop (PyTorch here, Core ML on Apple's runtime or the
reference executor). The loop calls these and nothing else, so it never asks which backend runs."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelBackend(Protocol):
    """Tensors cross this interface in `dtype` (float32: latents, scheduler and guidance arithmetic stay
    exact); the models compute in `compute_dtype`."""

    name: str  # "torch", "coreml": recorded in each picture's settings
    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype
    notice: str | None  # a line the CLI shows once (e.g. a VAE that fell back to float32), or None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> hidden states (B, 77, D)."""

    def encode_text_xl(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: token ids of both tokenizers (B, 77) each -> both encoders' penultimate hidden states side by
        side (B, 77, D1+D2) and the second encoder's pooled, projected embedding (B, P)."""

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
             class_labels: torch.Tensor | None = None, cache=None, added: dict | None = None) -> torch.Tensor:
        """(B, C_in, h, w) -> prediction (B, 4, h, w); `cache` from `feature_cache` when skipping steps;
        `added`: SDXL's extra conditioning, "text_embeds" (B, P) and "time_ids" (B, 6)."""

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> moments (B, 2*4, h, w) (mean, logvar)."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> pixels (B, 3, H, W) in about [-1, 1]."""

    def feature_cache(self):
        """A cache for `cache_interval` (DeepCache) runs, or None where the backend cannot reuse features
        (a compiled Core ML UNet runs whole)."""
