"""Parity with diffusers: the same components, scheduler, seed, steps and guidance give the same image.

Exactly the same: every case here is bit-identical to diffusers' pipeline, so the test asserts equality.

Several images: image i draws from its own generator seeded `seed + i`. diffusers does the same when given
a list of generators, and for txt2img and img2img the whole batch is identical. Inpaint and the x4 upscaler
draw one sample for the whole batch from the first generator in diffusers (the masked-image latents, the
low-res image's noise); editsuite draws it per image so that each image is reproduced alone by its own
seed. Their first image is identical to diffusers' batch; every image is identical to diffusers' run of
one image with its seed (tested below).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionUpscalePipeline, UniPCMultistepScheduler)
from tiny import save_tiny, tiny_bundle, tiny_components

import editsuite

# our name -> the scheduler diffusers users would build by hand (None: the model's own)
SCHEDULERS = {
    None: None,
    "euler-a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "dpm++2m-karras": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "lms": lambda cfg: LMSDiscreteScheduler.from_config(cfg),
    "heun": lambda cfg: HeunDiscreteScheduler.from_config(cfg),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg),
    "dpm++2m": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
}
COMMON = dict(steps=4, guidance_scale=6.0, seed=1234)


def diffusers_kwargs(pipe, scheduler, num_images=1, seed=COMMON["seed"]):
    """diffusers' arguments for COMMON; one generator, or a list of them (seed + i) for several images."""
    own = pipe.__dict__.setdefault("_own_scheduler", pipe.scheduler)  # as the pipeline built it
    pipe.scheduler = type(own).from_config(own.config) if scheduler is None else SCHEDULERS[scheduler](own.config)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    return dict(num_inference_steps=COMMON["steps"], guidance_scale=COMMON["guidance_scale"],
                generator=gens[0] if num_images == 1 else gens, num_images_per_prompt=num_images)


def assert_parity(ours, theirs, where=None):
    """Bit-identical pixels (within `where` when given)."""
    a, b = np.asarray(ours, np.int16), np.asarray(theirs, np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b).max(-1)
    if where is not None:
        diff = diff[where]
    assert diff.max() == 0, f"{(diff > 0).mean():.4%} of pixels differ from diffusers (max diff {diff.max()})"


def make(kind, prediction_type="epsilon"):
    comps = tiny_components(kind, prediction_type)
    return comps, tiny_bundle(components=comps)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def base(request):
    return make("base", request.param)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def inpainting(request):
    return make("inpainting", request.param)


NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("scheduler", [None, "euler-a", "dpm++2m-karras", "lms", "heun", "unipc", "ddpm", "dpm++2m"])
def test_txt2img(base, scheduler):
    comps, bundle = base
    pipe = StableDiffusionPipeline(**comps, **NO_SAFETY)
    theirs = pipe("a red circle", negative_prompt="blurry", height=64, width=48,
                  **diffusers_kwargs(pipe, scheduler, num_images=2)).images
    ours = editsuite.Txt2Img(bundle).run("a red circle", negative_prompt="blurry", height=64, width=48,
                                         scheduler=scheduler, num_images=2, **COMMON).images
    assert len(ours) == 2
    for o, t in zip(ours, theirs):
        assert_parity(o, t)


def test_txt2img_ddim_eta(base):
    comps, bundle = base
    pipe = StableDiffusionPipeline(**comps, **NO_SAFETY)
    theirs = pipe("a red circle", height=64, width=64, eta=0.6, **diffusers_kwargs(pipe, "ddim")).images[0]
    ours = editsuite.Txt2Img(bundle).run("a red circle", height=64, width=64, eta=0.6, scheduler="ddim", **COMMON)
    assert_parity(ours.images[0], theirs)
    plain = editsuite.Txt2Img(bundle).run("a red circle", height=64, width=64, scheduler="ddim", **COMMON)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(theirs))  # eta really draws noise


@pytest.mark.parametrize("scheduler", [None, "euler", "dpm++2m-karras", "euler-a"])
def test_img2img(base, photo, scheduler):
    comps, bundle = base
    pipe = StableDiffusionImg2ImgPipeline(**comps, **NO_SAFETY)
    theirs = pipe("a blue square", image=photo, strength=0.6, **diffusers_kwargs(pipe, scheduler, 2)).images
    ours = editsuite.Img2Img(bundle).run(photo, "a blue square", strength=0.6, scheduler=scheduler, num_images=2,
                                         **COMMON)
    for o, t in zip(ours.images, theirs, strict=True):
        assert_parity(o, t)


def _inpaint_parity(comps, bundle, photo, mask, scheduler, strength, **kw):
    pipe = StableDiffusionInpaintPipeline(**comps, **NO_SAFETY)
    theirs = pipe("a green triangle", image=photo, mask_image=mask, strength=strength, height=64, width=64,
                  **diffusers_kwargs(pipe, scheduler)).images[0]
    task = editsuite.Inpaint(bundle)
    raw = task.run(photo, mask, "a green triangle", strength=strength, scheduler=scheduler, overlay=False,
                   **COMMON).images[0]
    assert_parity(raw, theirs)
    kept = task.run(photo, mask, "a green triangle", strength=strength, scheduler=scheduler, **COMMON).images[0]
    inside = np.asarray(mask) >= 128
    assert_parity(kept, theirs, where=inside)
    assert np.array_equal(np.asarray(kept)[~inside], np.asarray(photo)[~inside])


@pytest.mark.parametrize("scheduler,strength", [(None, 1.0), ("euler-a", 1.0), ("ddim", 0.7)])
def test_inpaint_9_channel(inpainting, photo, mask, scheduler, strength):
    _inpaint_parity(*inpainting, photo, mask, scheduler, strength)


@pytest.mark.parametrize("scheduler,strength", [(None, 1.0), ("euler", 0.75), ("dpm++2m-karras", 1.0)])
def test_inpaint_4_channel(base, photo, mask, scheduler, strength):
    _inpaint_parity(*base, photo, mask, scheduler, strength)


def test_inpaint_only_masked_matches_padding_mask_crop(inpainting):
    import PIL.Image

    comps, bundle = inpainting
    rng = np.random.default_rng(0)
    big = PIL.Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    m = np.zeros((96, 128), np.uint8)
    m[40:60, 70:100] = 255
    m = PIL.Image.fromarray(m)
    pipe = StableDiffusionInpaintPipeline(**comps, **NO_SAFETY)
    theirs = pipe("a bench", image=big, mask_image=m, padding_mask_crop=8, height=64, width=64,
                  **diffusers_kwargs(pipe, None)).images[0]
    ours = editsuite.Inpaint(bundle).run(big, m, "a bench", only_masked=True, padding=8, **COMMON).images[0]
    assert ours.size == big.size
    assert_parity(ours, theirs)
    outside = np.asarray(m) == 0
    assert np.array_equal(np.asarray(ours)[outside], np.asarray(big)[outside])


def test_inpaint_mask_blur_matches_blurred_mask(inpainting, photo, mask):
    comps, bundle = inpainting
    pipe = StableDiffusionInpaintPipeline(**comps, **NO_SAFETY)
    blurred = pipe.mask_processor.blur(mask, 4)
    theirs = pipe("a cat", image=photo, mask_image=blurred, height=64, width=64,
                  **diffusers_kwargs(pipe, None)).images[0]
    ours = editsuite.Inpaint(bundle).run(photo, mask, "a cat", mask_blur=4, overlay=False, **COMMON).images[0]
    assert_parity(ours, theirs)
    kept = np.asarray(editsuite.Inpaint(bundle).run(photo, mask, "a cat", mask_blur=4, **COMMON).images[0])
    untouched = np.asarray(blurred) == 0
    assert untouched.any() and np.array_equal(kept[untouched], np.asarray(photo)[untouched])


@pytest.mark.parametrize("scheduler", [None, "euler-a"])
def test_upscale_x4(photo, scheduler):
    comps, bundle = make("upscaler")
    pipe = StableDiffusionUpscalePipeline(**comps, max_noise_level=350)
    low = photo.resize((32, 32))
    theirs = pipe("sharp", image=low, noise_level=30, **diffusers_kwargs(pipe, scheduler)).images[0]
    ours = editsuite.Upscale(bundle).run(low, "sharp", noise_level=30, scheduler=scheduler, **COMMON).images[0]
    assert ours.size == (128, 128)
    assert_parity(ours, theirs)


def _each_image_alone(run, pipe_run, n=2):
    """Image i of a batch of n is the single image of seed + i: editsuite's exactly as diffusers', and the
    batch's to within the UNet's rounding. That one exception: the UNet's last bits depend on the batch size
    (oneDNN picks its kernels by shape; diffusers' batch of 2 differs from its own single runs the same
    way), so a batch image may differ from its single run by 1 level on a few pixels."""
    batch = run(num_images=n).images
    for i, image in enumerate(batch):
        alone = run(num_images=1, seed=COMMON["seed"] + i).images[0]
        assert_parity(alone, pipe_run(seed=COMMON["seed"] + i))
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16)).max(-1)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, f"image {i}: max diff {diff.max()}"


def test_inpaint_batch_images_reproduce_alone(inpainting, photo, mask):
    comps, bundle = inpainting
    pipe = StableDiffusionInpaintPipeline(**comps, **NO_SAFETY)
    task = editsuite.Inpaint(bundle)

    def run(num_images, seed=COMMON["seed"]):
        return task.run(photo, mask, "a green triangle", scheduler="euler-a", overlay=False, num_images=num_images,
                        **{**COMMON, "seed": seed})

    def pipe_run(seed):
        return pipe("a green triangle", image=photo, mask_image=mask, height=64, width=64,
                    **diffusers_kwargs(pipe, "euler-a", seed=seed)).images[0]
    _each_image_alone(run, pipe_run)


def test_upscale_batch_images_reproduce_alone(photo):
    comps, bundle = make("upscaler")
    pipe = StableDiffusionUpscalePipeline(**comps, max_noise_level=350)
    low, task = photo.resize((32, 32)), editsuite.Upscale(bundle)

    def run(num_images, seed=COMMON["seed"]):
        return task.run(low, "sharp", noise_level=30, num_images=num_images, scheduler="euler-a",
                        **{**COMMON, "seed": seed})

    def pipe_run(seed):
        return pipe("sharp", image=low, noise_level=30, **diffusers_kwargs(pipe, "euler-a", seed=seed)).images[0]
    _each_image_alone(run, pipe_run)


def _outdated_scheduler(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_old_scheduler_configs_are_corrected_as_diffusers_pipelines_do(tmp_path, photo, mask):
    """diffusers' pipelines correct steps_offset and clip_sample (and, for inpainting, skip_prk_steps) when
    they are built: the same model from its folder gives the same image here as from_pretrained there."""
    v = save_tiny(tmp_path / "v", prediction_type="v_prediction")  # a DDIM model
    _outdated_scheduler(v, steps_offset=0, clip_sample=True)
    bundle = editsuite.load_bundle(v, device="cpu", dtype="float32")
    pipe = StableDiffusionPipeline.from_pretrained(v, **NO_SAFETY)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    theirs = pipe("a red circle", height=64, width=64, **diffusers_kwargs(pipe, None)).images[0]
    assert_parity(editsuite.Txt2Img(bundle).run("a red circle", height=64, width=64, **COMMON).images[0], theirs)

    e = save_tiny(tmp_path / "e")  # a PNDM model
    _outdated_scheduler(e, skip_prk_steps=False, steps_offset=0)
    bundle = editsuite.load_bundle(e, device="cpu", dtype="float32")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(e, **NO_SAFETY)
    assert pipe.scheduler.config.skip_prk_steps is True
    theirs = pipe("a cat", image=photo, mask_image=mask, height=64, width=64, **diffusers_kwargs(pipe, None)).images[0]
    ours = editsuite.Inpaint(bundle).run(photo, mask, "a cat", overlay=False, steps=COMMON["steps"],
                                         guidance_scale=COMMON["guidance_scale"], seed=COMMON["seed"])
    assert_parity(ours.images[0], theirs)
    # txt2img's pipeline keeps skip_prk_steps False: PNDM runs its Runge-Kutta warm-up, here as there
    pipe = StableDiffusionPipeline.from_pretrained(e, **NO_SAFETY)
    assert pipe.scheduler.config.skip_prk_steps is False
    theirs = pipe("a cat", height=64, width=64, **diffusers_kwargs(pipe, None)).images[0]
    assert_parity(editsuite.Txt2Img(bundle).run("a cat", height=64, width=64, **COMMON).images[0], theirs)


def test_demo_model_parity_and_guidance_matters():
    """The demo model answers its prompt (the tiny random models hardly do), so a guidance scale that is
    off by 0.5 changes the picture: parity here proves the guidance arithmetic, not just the plumbing."""
    from editsuite.demo import demo_model

    folder = demo_model(editsuite.ModelKind.BASE)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **NO_SAFETY)
    bundle = editsuite.load_bundle(folder, device="cpu", dtype="float32")
    prompt = "a red circle on a blue background"
    theirs = pipe(prompt, **diffusers_kwargs(pipe, None)).images[0]
    ours = editsuite.Txt2Img(bundle).run(prompt, **COMMON).images[0]
    assert_parity(ours, theirs)
    off = editsuite.Txt2Img(bundle).run(prompt, **{**COMMON, "guidance_scale": COMMON["guidance_scale"] - 0.5})
    changed = np.abs(np.asarray(off.images[0], np.int16) - np.asarray(theirs, np.int16)).max(-1)
    assert (changed > 2).mean() > 0.05, "the demo model should respond to the guidance scale"
