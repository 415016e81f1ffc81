"""Prompt encoding with classifier-free guidance, as diffusers' `encode_prompt` does it."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Text conditioning for a batch: `context` is (2B, 77, D) as [uncond; cond] when `do_cfg`, else (B, 77, D).
    SDXL adds `added`: "text_embeds" (the pooled embedding, in the order of `context`) and "time_ids"."""

    context: torch.Tensor
    scale: float
    added: dict[str, torch.Tensor] | None = None

    @property
    def do_cfg(self) -> bool:
        return self.scale > 1.0

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        """(2B, C, h, w) -> (B, C, h, w): uncond + scale * (cond - uncond)."""
        if not self.do_cfg:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _embed(bundle, text: str):
    """One prompt -> (1, 77, D) hidden states (SDXL: and the (1, P) pooled embedding); cached on the bundle
    so repeated prompts cost nothing."""
    cache = bundle.__dict__.setdefault("_prompt_cache", {})
    if text not in cache:
        if len(cache) >= 64:  # bounded: a batch over many prompts must not grow memory without end
            cache.pop(next(iter(cache)))
        if bundle.manifest.xl:  # the refiner has no first tokenizer
            first = None if bundle.tokenizer is None else _ids(bundle.tokenizer, text)
            cache[text] = bundle.backend.encode_text_xl(first, _ids(bundle.tokenizer_2, text))
        else:
            cache[text] = bundle.backend.encode_text(_ids(bundle.tokenizer, text))
    return cache[text]


@dataclasses.dataclass(frozen=True)
class TimeIds:
    """SDXL's micro-conditioning: rows (1, 6) of (original height, width, crop top, left, target height,
    width) in pixels (the refiner: (1, 5), an aesthetic score in place of the target size), for the
    conditional and the unconditional half. With guidance, diffusers' txt2img
    repeats the [uncond, cond] pair per image (`paired`); its img2img repeats each half per image. The two
    orders differ only when the halves do, and are kept for exact parity."""

    cond: torch.Tensor
    uncond: torch.Tensor
    paired: bool = True

    @classmethod
    def build(cls, width: int, height: int, *, pipeline: str, original=None, crop=None, target=None,
              negative_original=None, negative_crop=None, negative_target=None,
              aesthetic: tuple[float, float] | None = None) -> "TimeIds":
        """The rows as diffusers' SDXL `pipeline` ("txt2img" or "img2img") makes them from its arguments, each
        (height, width) or (top, left) or None for the default: the picture's size, (0, 0).
        txt2img uses a negative triple only when both negative sizes are given; img2img defaults each negative
        size to the positive one and always takes the positive crop (diffusers' own rule, kept for parity).
        `aesthetic` (score, negative score): the refiner's rows, (original, crop, score) with the negative
        crop (img2img and inpaint only)."""
        size = (height, width)
        original, crop, target = original or size, crop or (0, 0), target or size
        row = lambda o, c, t: torch.tensor([[*o, *c, *t]], dtype=torch.float32)  # noqa: E731
        if aesthetic is not None:
            score, negative_score = aesthetic
            return cls(row(original, crop, (score,)),
                       row(negative_original or original, negative_crop or (0, 0), (negative_score,)), paired=False)
        cond = row(original, crop, target)
        if pipeline == "txt2img":
            both = negative_original is not None and negative_target is not None
            uncond = row(negative_original, negative_crop or (0, 0), negative_target) if both else cond
            return cls(cond, uncond, paired=True)
        return cls(cond, row(negative_original or original, crop, negative_target or target), paired=False)

    def batch(self, num_images: int, cfg: bool) -> torch.Tensor:
        if not cfg:
            return self.cond.repeat(num_images, 1)
        if self.paired:
            return torch.cat([self.uncond, self.cond]).repeat(num_images, 1)
        return torch.cat([self.uncond.repeat(num_images, 1), self.cond.repeat(num_images, 1)])


def encode_prompt(bundle, prompt: str, negative_prompt: str | None, num_images: int, guidance_scale: float,
                  time_ids: TimeIds | None = None) -> Guidance:
    """Prompt and negative prompt -> `Guidance` for `num_images` images (diffusers' order: uncond first).
    SDXL needs `time_ids`, and an empty negative prompt is all zeros where the model's pipeline says so
    (`force_zeros_for_empty_prompt`), as in StableDiffusionXLPipeline.encode_prompt."""
    if not bundle.manifest.xl:
        cond = _embed(bundle, prompt).repeat(num_images, 1, 1)
        if guidance_scale <= 1.0:
            return Guidance(cond, guidance_scale)
        uncond = _embed(bundle, negative_prompt or "").repeat(num_images, 1, 1)
        return Guidance(torch.cat([uncond, cond]), guidance_scale)
    if time_ids is None:
        raise ValueError("an SDXL prompt needs its time ids")
    hidden, pooled = _embed(bundle, prompt)
    hidden, pooled = hidden.repeat(num_images, 1, 1), pooled.repeat(num_images, 1)
    if guidance_scale <= 1.0:
        return Guidance(hidden, guidance_scale, {"text_embeds": pooled, "time_ids": time_ids.batch(num_images, False)})
    if not negative_prompt and bundle.manifest.force_zeros_for_empty_prompt:
        neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        neg_hidden, neg_pooled = _embed(bundle, negative_prompt or "")
        neg_hidden, neg_pooled = neg_hidden.repeat(num_images, 1, 1), neg_pooled.repeat(num_images, 1)
    return Guidance(torch.cat([neg_hidden, hidden]), guidance_scale,
                    {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids.batch(num_images, True)})
