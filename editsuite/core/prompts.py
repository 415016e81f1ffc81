"""Prompt encoding with classifier-free guidance, as diffusers' `encode_prompt` does it."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Text conditioning for a batch: `context` is (2B, 77, D) as [uncond; cond] when `do_cfg`, else (B, 77, D)."""

    context: torch.Tensor
    scale: float

    @property
    def do_cfg(self) -> bool:
        return self.scale > 1.0

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        """(2B, C, h, w) -> (B, C, h, w): uncond + scale * (cond - uncond)."""
        if not self.do_cfg:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _embed(bundle, text: str) -> torch.Tensor:
    """One prompt -> (1, 77, D) hidden states; cached on the bundle so repeated prompts cost nothing."""
    cache = bundle.__dict__.setdefault("_prompt_cache", {})
    if text not in cache:
        tok = bundle.tokenizer
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        if len(cache) >= 64:  # bounded: a batch over many prompts must not grow memory without end
            cache.pop(next(iter(cache)))
        cache[text] = bundle.backend.encode_text(ids.input_ids)
    return cache[text]


def encode_prompt(bundle, prompt: str, negative_prompt: str | None, num_images: int, guidance_scale: float) -> Guidance:
    """Prompt and negative prompt -> `Guidance` for `num_images` images (diffusers' order: uncond first)."""
    cond = _embed(bundle, prompt).repeat(num_images, 1, 1)
    if guidance_scale <= 1.0:
        return Guidance(cond, guidance_scale)
    uncond = _embed(bundle, negative_prompt or "").repeat(num_images, 1, 1)
    return Guidance(torch.cat([uncond, cond]), guidance_scale)
