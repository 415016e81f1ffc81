"""SDXL on the PyTorch backend: loading its diffusers folders and single files, and the edits bit-identical
to diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline (tiny seeded SDXL models, --dtype float32).

Several images: as for SD 1.x (tests/test_parity.py), txt2img and img2img batches are identical to
diffusers' with a list of generators; inpaint draws each image's encodes from its own generator where
diffusers draws them from the first, so the first image is identical and each image equals diffusers' run of
one image with its seed."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image
from test_parity import SCHEDULERS, assert_parity
from tiny import save_tiny_xl, tiny_xl_components

import editsuite
from editsuite import load_bundle
from editsuite.errors import UserError

STEPS, GUIDANCE, SEED = 4, 6.0, 77


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def xl(request, tmp_path_factory):
    """(diffusers' txt2img pipeline, editsuite's bundle) over the same tiny SDXL folder."""
    folder = save_tiny_xl(tmp_path_factory.mktemp("xl") / "m", request.param)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_bundle(folder, device="cpu", dtype="float32")


def _generators(n, seed=SEED):
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return gens[0] if n == 1 else gens


def _with_scheduler(pipe, scheduler):
    own = pipe.__dict__.setdefault("_own_scheduler", pipe.scheduler)
    pipe.scheduler = type(own).from_config(own.config) if scheduler is None else SCHEDULERS[scheduler](own.config)
    return pipe


def test_loads_as_sdxl(xl):
    _, bundle = xl
    m = bundle.manifest
    assert m.xl and m.family.value == "sdxl" and m.native_resolution == 64 and m.scaling_factor == 0.13025
    assert m.cross_attention_dim == 64 and bundle.tokenizer_2.pad_token == "!"
    assert bundle.identity()["family"] == "sdxl"


@pytest.mark.parametrize("scheduler,negative,n", [
    (None, "", 1), (None, "blurry, dark", 2), ("dpm++2m-karras", "", 1), ("euler-a", "ugly", 1), ("unipc", "", 2),
])
def test_txt2img_equals_diffusers(xl, scheduler, negative, n):
    pipe, bundle = xl
    theirs = _with_scheduler(pipe, scheduler)(
        "a red fox in the snow", negative_prompt=negative or None, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, height=64, width=64, generator=_generators(n), num_images_per_prompt=n).images
    ours = editsuite.Txt2Img(bundle).run("a red fox in the snow", negative_prompt=negative, steps=STEPS,
                                         guidance_scale=GUIDANCE, seed=SEED, num_images=n, scheduler=scheduler)
    assert len(ours.images) == n
    for a, b in zip(ours.images, theirs):
        assert_parity(a, b)


def test_txt2img_without_guidance_and_at_another_size(xl):
    pipe, bundle = xl
    theirs = _with_scheduler(pipe, None)("a house", num_inference_steps=STEPS, guidance_scale=1.0, height=48,
                                          width=80, generator=_generators(1)).images[0]
    ours = editsuite.Txt2Img(bundle).run("a house", steps=STEPS, guidance_scale=1.0, seed=SEED, width=80, height=48)
    assert ours.images[0].size == (80, 48)
    assert_parity(ours.images[0], theirs)


@pytest.mark.parametrize("scheduler,strength,n", [(None, 0.6, 1), ("ddim", 0.75, 2), ("dpm++2m", 0.5, 1)])
def test_img2img_equals_diffusers(xl, scheduler, strength, n):
    pipe, bundle = xl
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    theirs = _with_scheduler(img2img, scheduler)(
        "a watercolour", image=picture, strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        generator=_generators(n), num_images_per_prompt=n).images
    ours = editsuite.Img2Img(bundle).run(picture, "a watercolour", strength=strength, steps=STEPS,
                                         guidance_scale=GUIDANCE, seed=SEED, num_images=n, scheduler=scheduler)
    for a, b in zip(ours.images, theirs):
        assert_parity(a, b)


def _picture_and_mask(seed=5):
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    return picture, Image.fromarray(mask)


@pytest.mark.parametrize("channels,strength,scheduler", [(4, 0.8, None), (4, 1.0, "dpm++2m"), (9, 1.0, None),
                                                          (9, 0.7, "ddim")])
def test_inpaint_equals_diffusers(channels, strength, scheduler):
    from diffusers import StableDiffusionXLInpaintPipeline

    comps = tiny_xl_components(in_channels=channels)
    pipe = StableDiffusionXLInpaintPipeline(**comps, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    bundle = editsuite.ModelBundle.from_components(**comps)
    assert bundle.kind.value == ("inpainting" if channels == 9 else "base") and bundle.manifest.xl
    picture, mask = _picture_and_mask()
    for n in (1, 2):
        theirs = _with_scheduler(pipe, scheduler)(
            "a bench", image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, height=64, width=64, generator=_generators(n), num_images_per_prompt=n).images
        ours = editsuite.Inpaint(bundle).run(picture, mask, "a bench", strength=strength, steps=STEPS, seed=SEED,
                                             guidance_scale=GUIDANCE, num_images=n, scheduler=scheduler,
                                             overlay=False)
        assert_parity(ours.images[0], theirs[0])  # the first of a batch, and a single image
    # image 1 of the batch is the single image of seed + 1: editsuite's exactly as diffusers', and the batch's
    # to a level on a few pixels (the UNet rounds differently at another batch size), as for SD (test_parity)
    alone = editsuite.Inpaint(bundle).run(picture, mask, "a bench", strength=strength, steps=STEPS, seed=SEED + 1,
                                          guidance_scale=GUIDANCE, scheduler=scheduler, overlay=False).images[0]
    assert_parity(alone, _with_scheduler(pipe, scheduler)(
        "a bench", image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, height=64, width=64, generator=_generators(1, SEED + 1)).images[0])
    diff = np.abs(np.asarray(ours.images[1], np.int16) - np.asarray(alone, np.int16)).max(-1)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_outpaint_and_tiled_upscale_run_on_sdxl(xl):
    _, bundle = xl
    picture, _ = _picture_and_mask()
    out = editsuite.Outpaint(bundle).run(picture, "a wide view", right=16, steps=2, seed=1).images[0]
    assert out.size == (80, 64)
    assert np.array_equal(np.asarray(out)[:, :64 - 16], np.asarray(picture)[:, :64 - 16])  # the original, kept
    big = editsuite.Upscale(bundle).run(picture, "sharp", scale=2, steps=2, seed=1, strength=0.3)
    assert big.images[0].size == (128, 128) and big.metadata["tiles"] > 1


def test_in_memory_components_and_a_missing_second_encoder(tmp_path):
    comps = tiny_xl_components()
    bundle = editsuite.ModelBundle.from_components(**comps)
    assert bundle.manifest.xl
    image = editsuite.Txt2Img(bundle).run("x", steps=2, seed=1).images[0]
    assert image.size == (64, 64)
    comps.pop("text_encoder_2"), comps.pop("tokenizer_2")
    with pytest.raises(UserError, match="second text encoder"):
        editsuite.ModelBundle.from_components(**comps)


# -- single-file SDXL checkpoints -------------------------------------------------------------------------

def _in_fresh_memory(bundle):
    """The bundle's weights copied into fresh memory, now and whenever its text encoders are read again. Weights
    read from a file lie at its offsets, and on some CPUs the same weights at another alignment compute an ulp
    apart (measured: SDXL's pooled text embedding, 1.2e-7, then 1 level in 2 pixels of 4096). A single file and
    its folder hold the same tensors at other offsets: this compares the weights and the loading, not the
    offsets."""
    def copy(module):
        for t in () if module is None else (*module.parameters(), *module.buffers()):
            t.data = t.data.clone()
        return module

    be = bundle.backend
    for name in ("text_encoder", "text_encoder_2", "unet_model", "vae"):
        copy(getattr(be, name))
    if be.reload_text_encoders is not None:
        reload = be.reload_text_encoders
        be.reload_text_encoders = lambda: tuple(copy(m) for m in reload())
    return bundle


def _alike(single, whole):
    """Both bundles in fresh memory (`_in_fresh_memory`), their four modules holding equal weights."""
    single, whole = _in_fresh_memory(single), _in_fresh_memory(whole)
    for name in ("text_encoder", "text_encoder_2", "unet_model", "vae"):
        a, b = getattr(single.backend, name).state_dict(), getattr(whole.backend, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return single, whole


def test_single_file_sdxl_gives_the_same_picture_as_its_folder(tmp_path):
    """The tiny SDXL written in Stability's original layout (tests/ldm_layout.py) loads offline and paints
    exactly what its diffusers folder paints. Its sizes are not SDXL's, so its config folder is passed, as a
    user does with --config for a scaled-down model."""
    from ldm_layout import to_ldm_xl_checkpoint
    from safetensors.torch import save_file

    folder = save_tiny_xl(tmp_path / "folder")
    c = tiny_xl_components()
    path = tmp_path / "tiny-xl.safetensors"
    save_file(to_ldm_xl_checkpoint(c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"]), str(path))
    single, whole = load_bundle(path, dtype="float32", config=folder), load_bundle(folder, dtype="float32")
    single, whole = _alike(single, whole)
    assert single.manifest.xl and single.tokenizer_2.pad_token == "!"
    run = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    assert_parity(editsuite.Txt2Img(single).run("a lighthouse", **run).images[0],
                  editsuite.Txt2Img(whole).run("a lighthouse", **run).images[0])
    # the text encoders were let go when the UNet started; a new prompt reads them again, from the file
    assert single.backend.text_encoder is None and whole.backend.text_encoder_2 is None
    assert_parity(editsuite.Txt2Img(single).run("a harbour", negative_prompt="fog", **run).images[0],
                  editsuite.Txt2Img(whole).run("a harbour", negative_prompt="fog", **run).images[0])


def test_single_file_sdxl_inpainting_gives_the_same_picture_as_its_folder(tmp_path):
    """A 9-channel SDXL UNet in the original layout is SDXL inpainting: base's configs with the checkpoint's
    channels; it inpaints exactly as its diffusers folder."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from ldm_layout import to_ldm_xl_checkpoint
    from safetensors.torch import save_file

    from editsuite.bundle.single_file import detect_model_type

    c = tiny_xl_components(in_channels=9)
    StableDiffusionXLInpaintPipeline(**c, add_watermarker=False).save_pretrained(tmp_path / "folder",
                                                                                  safe_serialization=True)
    checkpoint = to_ldm_xl_checkpoint(c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"])
    assert detect_model_type(checkpoint) == "xl_inpaint"
    save_file(checkpoint, str(tmp_path / "tiny-xl-inpainting.safetensors"))
    single = load_bundle(tmp_path / "tiny-xl-inpainting.safetensors", dtype="float32", config=tmp_path / "folder")
    whole = load_bundle(tmp_path / "folder", dtype="float32")
    single, whole = _alike(single, whole)
    assert single.manifest.xl and single.kind.value == "inpainting" and single.manifest.unet_in_channels == 9
    picture, mask = _picture_and_mask()
    run = dict(strength=1.0, steps=STEPS, seed=SEED, guidance_scale=GUIDANCE, overlay=False)
    assert_parity(editsuite.Inpaint(single).run(picture, mask, "a bench", **run).images[0],
                  editsuite.Inpaint(whole).run(picture, mask, "a bench", **run).images[0])


def test_text_encoders_are_let_go_during_the_steps_and_read_again_unchanged(xl, tmp_path):
    """SDXL's text encoders (1.5 GiB in bf16) are not held while the UNet and the VAE work: released at the
    UNet's first call, read again from the folder for the next new prompt, the same weights; a model built
    in memory (nothing to read again) keeps them."""
    pipe, bundle = xl
    kept = {k: v.clone() for k, v in bundle.backend.text_encoder_2.state_dict().items()} \
        if bundle.backend.text_encoder_2 is not None else None
    editsuite.Txt2Img(bundle).run("a pier at night", steps=1, seed=1)
    assert bundle.backend.text_encoder is None and bundle.backend.text_encoder_2 is None
    bundle.backend.encode_text_xl(*(t(["a new prompt"], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids for t in (bundle.tokenizer, bundle.tokenizer_2)))
    again = bundle.backend.text_encoder_2.state_dict()
    reference = kept or pipe.text_encoder_2.state_dict()
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in again)
    moved = load_bundle(save_tiny_xl(tmp_path / "moved"), dtype="float32")
    editsuite.Txt2Img(moved).run("a pier at night", steps=1, seed=1)
    import shutil

    shutil.rmtree(tmp_path / "moved")  # the files are gone before the next new prompt: one line, no traceback
    with pytest.raises(UserError, match="could not be read again"):
        editsuite.Txt2Img(moved).run("another prompt", steps=1, seed=1)
    in_memory = editsuite.ModelBundle.from_components(**tiny_xl_components(), dtype=torch.float32)
    editsuite.Txt2Img(in_memory).run("a pier at night", steps=1, seed=1)
    assert in_memory.backend.text_encoder_2 is not None


# published fp16 file sizes of SDXL base 1.0: UNet 5.14 GB, OpenCLIP bigG 1.39 GB, CLIP-L 246 MB, VAE 167 MB
XL_PARAM_COUNTS = (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)


def test_shipped_sdxl_configs_build_on_meta_and_take_a_full_size_original_layout():
    """Full-size SDXL on the meta device (no memory): parameter counts, and a full-size original-layout key
    set converts onto exactly the models' keys and shapes, and is detected as SDXL base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm_layout import to_ldm_xl_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editsuite.bundle import single_file

    root = single_file.CONFIG_ROOT / "sdxl-base"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(root / "text_encoder_2")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert tuple(count(m) for m in (unet, vae, te1, te2)) == XL_PARAM_COUNTS
    checkpoint = to_ldm_xl_checkpoint(unet, vae, te1, te2)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(checkpoint) == "xl_base"  # diffusers agrees at real shapes
    assert single_file.detect_model_type(checkpoint) == "xl_base"
    for model, converted in (
        (unet, single_file.unet_state_dict(checkpoint, unet.config)),
        (vae, single_file.vae_state_dict(checkpoint, vae.config)),
        (te1, single_file.text_encoder_state_dict(checkpoint, te1, "xl_base")),
        (te2, single_file.text_encoder_state_dict(checkpoint, te2, "xl_base", second=True)),
    ):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert got == want


# -- the CLI and the SDXL-only parameters -----------------------------------------------------------------

def test_cli_runs_sdxl_with_size_conditioning_and_sd_models_refuse_it(tmp_path, monkeypatch, capsys):
    import json

    from tiny import save_tiny

    from editsuite.cli.app import main
    from editsuite.imaging.metadata import read_settings

    monkeypatch.chdir(tmp_path)
    folder = save_tiny_xl(tmp_path / "xl")
    args = ["txt2img", "-p", "a boat", "-m", str(folder), "-s", "5", "--steps", "2", "--dtype", "float32", "--json"]
    assert main(args + ["--original-size", "128x96", "--crop-top-left", "8,0", "-o", "a.png"]) == 0
    path = json.loads(capsys.readouterr().out)[0]["path"]
    settings = read_settings(path)
    assert settings["original_size"] == "128x96" and settings["crop_top_left"] == "8,0"
    assert settings["model"]["family"] == "sdxl"
    assert main(args + ["-o", "b.png"]) == 0  # the default conditioning paints another picture
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert not np.array_equal(a, b)
    # the same conditioning through diffusers: (height, width) = (96, 128), crop (8, 0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a boat", num_inference_steps=2, guidance_scale=7.5, height=64, width=64, generator=_generators(1, 5),
                  original_size=(96, 128), crops_coords_top_left=(8, 0)).images[0]
    assert_parity(Image.open(tmp_path / "a.png").convert("RGB"), theirs)

    sd = save_tiny(tmp_path / "sd")
    assert main(["txt2img", "-p", "x", "-m", str(sd), "--steps", "2", "--original-size", "64x64"]) == 2
    assert "original size is SDXL's conditioning" in capsys.readouterr().err
    assert main(["txt2img", "-p", "x", "-m", str(folder), "--steps", "2", "--original-size", "64by64"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert not list(tmp_path.glob("txt2img-*.png"))


def test_negative_size_conditioning_follows_each_pipeline(xl):
    """txt2img uses the negative sizes only when both are given; img2img defaults each to the positive one."""
    pipe, bundle = xl
    run = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, negative_prompt="fog")
    theirs = _with_scheduler(pipe, None)(
        "a tree", negative_prompt="fog", num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
        generator=_generators(2), num_images_per_prompt=2, negative_original_size=(32, 32),
        negative_target_size=(64, 48), negative_crops_coords_top_left=(4, 4)).images
    ours = editsuite.Txt2Img(bundle).run("a tree", **run, num_images=2, negative_original_size="32x32",
                                         negative_target_size="48x64", negative_crop_top_left="4,4")
    for a, b in zip(ours.images, theirs):
        assert_parity(a, b)
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    theirs = img2img("a tree", image=picture, strength=0.7, negative_prompt="fog", num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, generator=_generators(1), negative_original_size=(32, 32)).images[0]
    ours = editsuite.Img2Img(bundle).run(picture, "a tree", strength=0.7, **run, negative_original_size="32x32")
    assert_parity(ours.images[0], theirs)


# -- a separate VAE (--vae) -------------------------------------------------------------------------------

def test_a_separate_vae_replaces_the_models_own(tmp_path, capsys):
    """A VAE folder, a diffusers-layout file and an original-layout file give the same weights and the same
    picture as diffusers' pipeline built with that VAE; the name is recorded, also in A1111's text."""
    from diffusers import AutoencoderKL
    from ldm_layout import vae_to_ldm
    from safetensors.torch import save_file

    from editsuite.cli.app import main

    folder = save_tiny_xl(tmp_path / "xl")
    other = tiny_xl_components(seed=9)["vae"]
    other.save_pretrained(tmp_path / "other-vae", safe_serialization=True)
    save_file(other.state_dict(), str(tmp_path / "other-diffusers.safetensors"))
    ldm = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(other.state_dict(), other.config).items()}
    save_file(ldm, str(tmp_path / "other-ldm.safetensors"))  # as SD's ft-MSE VAE file is laid out
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, vae=AutoencoderKL.from_pretrained(tmp_path / "other-vae"),
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a kite", num_inference_steps=2, guidance_scale=GUIDANCE, generator=_generators(1)).images[0]
    for source in ("other-vae", "other-diffusers.safetensors", "other-ldm.safetensors"):
        bundle = load_bundle(folder, dtype="float32", vae=tmp_path / source)
        assert bundle.manifest.vae == source
        mine = bundle.backend.vae.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in other.state_dict().items()), source
        ours = editsuite.Txt2Img(bundle).run("a kite", steps=2, guidance_scale=GUIDANCE, seed=SEED).images[0]
        assert_parity(ours, theirs)
    assert main(["txt2img", "-p", "a kite", "-m", str(folder), "--vae", str(tmp_path / "other-ldm.safetensors"),
                 "--steps", "2", "-o", str(tmp_path / "kite.png")]) == 0
    assert "VAE: other-ldm.safetensors" in Image.open(tmp_path / "kite.png").info["parameters"]

    small = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    for source, message in (("small.safetensors", "does not match the VAE config"),
                            ("nowhere.safetensors", "not found"), ("xl/unet", "not a VAE")):
        assert main(["txt2img", "-p", "x", "-m", str(folder), "--vae", str(tmp_path / source), "--steps", "1",
                     "-o", str(tmp_path / "never.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never.png").exists()


# -- the refiner, alone and as the second of an ensemble of experts ----------------------------------------

def _refiner_setup(tmp_path):
    from tiny import tiny_xl_refiner_components

    base = tiny_xl_components()
    refiner = tiny_xl_refiner_components(base)
    StableDiffusionXLPipeline(**base, add_watermarker=False).save_pretrained(tmp_path / "base",
                                                                            safe_serialization=True)
    StableDiffusionXLImg2ImgPipeline(**refiner, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                     add_watermarker=False).save_pretrained(tmp_path / "refiner",
                                                                            safe_serialization=True)
    # diffusers' pipelines as users load them: modules read back from the folders give the last bits of the
    # folders' own (a module built in memory can round differently, 1e-6, than the same weights read back)
    base_pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base", add_watermarker=False)
    refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner", add_watermarker=False)
    for p in (base_pipe, refiner_pipe):
        p.set_progress_bar_config(disable=True)
    return base_pipe, refiner_pipe


def test_refiner_folder_loads_and_repaints_as_diffusers(tmp_path):
    _, refiner_pipe = _refiner_setup(tmp_path)
    bundle = load_bundle(tmp_path / "refiner", dtype="float32")
    m = bundle.manifest
    assert m.refiner and bundle.tokenizer is None and bundle.backend.text_encoder is None
    assert not m.force_zeros_for_empty_prompt
    picture, _ = _picture_and_mask()
    theirs_kw = dict(aesthetic_score=8.5, negative_aesthetic_score=1.0, negative_crops_coords_top_left=(8, 8))
    ours_kw = dict(aesthetic_score=8.5, negative_aesthetic_score=1.0, negative_crop_top_left="8,8")
    for theirs_extra, ours_extra in ((dict(), dict()), (theirs_kw, ours_kw)):
        theirs = _with_scheduler(refiner_pipe, None)(
            "a bird", image=picture, strength=0.5, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            generator=_generators(1), **theirs_extra).images[0]
        ours = editsuite.Img2Img(bundle).run(picture, "a bird", strength=0.5, steps=STEPS, guidance_scale=GUIDANCE,
                                             seed=SEED, **ours_extra)
        assert_parity(ours.images[0], theirs)
    with pytest.raises(UserError, match="is an SDXL refiner"):
        editsuite.Txt2Img(bundle)
    base = load_bundle(tmp_path / "base", dtype="float32")
    with pytest.raises(UserError, match="aesthetic scores condition SDXL's refiner"):
        editsuite.Img2Img(base).run(picture, "a bird", steps=1, aesthetic_score=7.0)


@pytest.mark.parametrize("scheduler,switch,n", [(None, 0.7, 1), ("euler-a", 0.8, 2), ("heun", 0.6, 1)])
def test_base_and_refiner_as_diffusers_ensemble_of_experts(tmp_path, scheduler, switch, n):
    base_pipe, refiner_pipe = _refiner_setup(tmp_path)
    steps = 6
    gens = _generators(n)  # the same generators run on through both stages, in diffusers and here
    latents = _with_scheduler(base_pipe, scheduler)(
        "a castle", num_inference_steps=steps, guidance_scale=GUIDANCE, denoising_end=switch, output_type="latent",
        generator=gens, num_images_per_prompt=n).images
    theirs = _with_scheduler(refiner_pipe, scheduler)(
        "a castle", image=latents, num_inference_steps=steps, guidance_scale=GUIDANCE, denoising_start=switch,
        generator=gens, num_images_per_prompt=n).images
    base, refiner = (load_bundle(tmp_path / k, dtype="float32") for k in ("base", "refiner"))
    ours = editsuite.Txt2Img(base, refiner=refiner).run("a castle", steps=steps, guidance_scale=GUIDANCE, seed=SEED,
                                                        num_images=n, scheduler=scheduler, refiner_switch=switch)
    assert len(ours.images) == n == len(theirs)
    for a, b in zip(ours.images, theirs):
        assert_parity(a, b)
    assert ours.metadata["refiner"]["name"] == "refiner" and ours.metadata["refiner_switch"] == switch


def test_cli_refiner(tmp_path, capsys):
    from tiny import save_tiny

    from editsuite.cli.app import main

    _refiner_setup(tmp_path)
    out = tmp_path / "castle.png"
    common = ["txt2img", "-p", "a castle", "--steps", "3", "-s", "1"]
    assert main(common + ["-m", str(tmp_path / "base"), "--refiner", str(tmp_path / "refiner"), "--switch", "0.5",
                          "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert "Refiner: refiner" in text and "Refiner switch at: 0.5" in text
    sd = save_tiny(tmp_path / "sd")
    for args, message in (
        (["-m", str(tmp_path / "base"), "--switch", "0.5"], "refiner switch needs a refiner"),
        (["-m", str(sd), "--refiner", str(tmp_path / "refiner")], "pairs two SDXL models"),
        (["-m", str(tmp_path / "base"), "--refiner", str(tmp_path / "refiner"), "--switch", "1"], "both excluded"),
        (["-m", str(tmp_path / "refiner")], "is an SDXL refiner"),
    ):
        assert main(common + args + ["-o", str(tmp_path / "never.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never.png").exists()
