"""The CLI end to end on tiny models: every subcommand writes its files with metadata; bad input is one
line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tiny import save_tiny

from editsuite.cli.app import main
from editsuite.imaging.metadata import read_settings

FAST = ["--steps", "2", "--seed", "7", "-q"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: str(save_tiny(root / k, kind=k)) for k in ("base", "inpainting", "upscaler")}


@pytest.fixture
def work(tmp_path, monkeypatch, photo, mask):
    monkeypatch.chdir(tmp_path)
    photo.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path


def run(*args) -> int:
    return main([str(a) for a in args])


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_txt2img_writes_png_with_settings(models, work, capsys):
    assert run("txt2img", "-p", "a red circle", "-m", models["base"], "--json", *FAST) == 0
    out = json.loads(capsys.readouterr().out)
    path = Path(out[0]["path"])
    assert path.name == "txt2img-7-0001.png" and path.exists()
    settings = read_settings(path)
    assert settings["prompt"] == "a red circle" and settings["seed"] == 7 and settings["steps"] == 2
    assert settings["model"]["kind"] == "base" and settings["model"]["model_hash"]
    params = PIL.Image.open(path).info["parameters"]
    assert params.startswith("a red circle\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 7, Size: 64x64")


def test_same_seed_same_picture_and_no_overwrite(models, work):
    assert run("txt2img", "-p", "x", "-m", models["base"], *FAST) == 0
    assert run("txt2img", "-p", "x", "-m", models["base"], *FAST) == 0
    a, b = (np.asarray(PIL.Image.open(work / f"txt2img-7-000{i}.png")) for i in (1, 2))
    assert np.array_equal(a, b)


def test_img2img_several_inputs_go_to_a_folder(models, work, photo):
    photo.rotate(90).save(work / "second.png")
    assert run("img2img", "photo.png", "second.png", "-p", "x", "-m", models["base"], "-N", "2", "-o", "out",
               *FAST) == 0
    assert files(work / "out") == {f"{s}-img2img-{seed}-0001.png" for s in ("photo", "second") for seed in (7, 8)}
    second = read_settings(work / "out" / "second-img2img-8-0001.png")
    assert second["batch_index"] == 1 and second["seed"] == 8


def test_each_image_of_a_batch_has_its_own_seed_and_is_reproduced_alone(models, work):
    """-N 2 -s 42 writes seeds 42 and 43 (A1111's convention); -N 1 -s 43 makes the second image again (to
    within the UNet's rounding at another batch size, see test_parity; bfloat16 rounds coarser, so float32)."""
    base = ["-p", "a red circle", "-m", models["base"], "--steps", "2", "-q", "--dtype", "float32"]
    assert run("txt2img", *base, "-N", "2", "-s", "42", "-o", "out") == 0
    texts = {p.name: PIL.Image.open(p).info["parameters"] for p in (work / "out").iterdir()}
    assert set(texts) == {"txt2img-42-0001.png", "txt2img-43-0001.png"}
    assert "Seed: 43," in texts["txt2img-43-0001.png"] and "Seed: 42," in texts["txt2img-42-0001.png"]
    assert run("txt2img", *base, "-N", "1", "-s", "43", "-o", "alone") == 0
    batch, alone = (np.asarray(PIL.Image.open(work / d / "txt2img-43-0001.png"), np.int16) for d in ("out", "alone"))
    diff = np.abs(batch - alone).max(-1)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_inpaint_keeps_unmasked_pixels(models, work, photo, mask):
    assert run("inpaint", "photo.png", "--mask", "mask.png", "-p", "a bench", "-m", models["inpainting"],
               "--mask-blur", "2", "-o", "o.png", *FAST) == 0
    out = np.asarray(PIL.Image.open(work / "o.png"))
    far = np.asarray(mask.filter(PIL.ImageFilter.MaxFilter(17))) == 0  # 8 px away: beyond a radius-2 blur
    assert np.array_equal(out[far], np.asarray(photo)[far])
    assert read_settings(work / "o.png")["mask_blur"] == 2


def test_inpaint_only_masked(models, work):
    assert run("inpaint", "photo.png", "--mask", "mask.png", "-p", "x", "-m", models["inpainting"],
               "--only-masked", "--padding", "4", "-o", "o.png", *FAST) == 0
    assert "Inpaint area: Only masked" in PIL.Image.open(work / "o.png").info["parameters"]


def test_outpaint_extends_and_keeps_original(models, work, photo):
    assert run("outpaint", "photo.png", "-p", "x", "-m", models["base"], "--left", "16", "--top", "8",
               "-o", "o.png", *FAST) == 0
    out = np.asarray(PIL.Image.open(work / "o.png"))
    assert out.shape == (72, 80, 3)
    assert np.array_equal(out[8:, 16:], np.asarray(photo))


@pytest.mark.parametrize("model,size", [("upscaler", (256, 256)), ("base", (128, 128))])
def test_upscale(models, work, model, size):
    extra = ["--scale", "2", "--overlap", "16"] if model == "base" else []
    assert run("upscale", "photo.png", "-m", models[model], "-o", "o.png", *extra, *FAST) == 0
    assert PIL.Image.open(work / "o.png").size == size


def test_upscale_strength_zero_is_lanczos(models, work, photo):
    assert run("upscale", "photo.png", "-m", models["base"], "--scale", "2", "--strength", "0", "-o", "o.png",
               *FAST) == 0
    expect = photo.resize((128, 128), PIL.Image.LANCZOS)
    assert np.array_equal(np.asarray(PIL.Image.open(work / "o.png")), np.asarray(expect))


def test_info(models, capsys):
    assert run("info", models["inpainting"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "inpainting" and info["unet_in_channels"] == 9


def test_exif_rotated_and_rgba_inputs(models, work, photo):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.crop((0, 0, 64, 48)).save(work / "rot.jpg", exif=exif)
    assert run("img2img", "rot.jpg", "-p", "x", "-m", models["base"], "-o", "r.png", *FAST) == 0
    assert PIL.Image.open(work / "r.png").size == (48, 64)
    photo.convert("RGBA").save(work / "rgba.png")
    assert run("img2img", "rgba.png", "-p", "x", "-m", models["base"], "-o", "a.png", *FAST) == 0


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------

def _bad(work, capsys, args, *expect):
    before = files(work)
    code = run(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    assert files(work) == before, "something was written"
    return err


def test_bad_missing_file(models, work, capsys):
    _bad(work, capsys, ["img2img", "nope.png", "-p", "x", "-m", models["base"], *FAST], "nope.png", "not found")


def test_bad_not_an_image(models, work, capsys):
    (work / "notes.png").write_text("hello")
    _bad(work, capsys, ["img2img", "notes.png", "-p", "x", "-m", models["base"], *FAST], "notes.png", "not an image")


def test_bad_truncated_image(models, work, capsys):
    data = (work / "photo.png").read_bytes()
    (work / "cut.png").write_bytes(data[: len(data) // 2])
    _bad(work, capsys, ["img2img", "cut.png", "-p", "x", "-m", models["base"], *FAST], "cut.png")


def test_bad_later_input_stops_before_any_output(models, work, capsys):
    (work / "notes.png").write_text("hello")
    _bad(work, capsys, ["img2img", "photo.png", "notes.png", "-p", "x", "-m", models["base"], "-o", "out", *FAST],
         "notes.png")


def test_bad_mask_size(models, work, capsys, mask):
    mask.resize((32, 32)).save(work / "small.png")
    args = ["inpaint", "photo.png", "--mask", "small.png", "-p", "x", "-m", models["inpainting"], *FAST]
    _bad(work, capsys, args, "32x32", "64x64", "--resize-mask")
    assert run(*args, "--resize-mask", "-o", "ok.png") == 0


def test_bad_empty_mask(models, work, capsys):
    PIL.Image.new("L", (64, 64), 0).save(work / "black.png")
    _bad(work, capsys, ["inpaint", "photo.png", "--mask", "black.png", "-p", "x", "-m", models["inpainting"], *FAST],
         "mask is empty")


def test_bad_size_not_multiple_of_8(models, work, capsys):
    _bad(work, capsys, ["txt2img", "-p", "x", "--width", "100", "-m", models["base"], *FAST],
         "width 100 is not a multiple of 8", "96 or 104")


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_bad_strength(models, work, capsys, value):
    _bad(work, capsys, ["img2img", "photo.png", "-p", "x", "--strength", value, "-m", models["base"], *FAST],
         "strength must be between 0 and 1")


def test_bad_steps(models, work, capsys):
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", models["base"], "--seed", "1", "--steps", "0"],
         "steps must be at least 1")


def test_bad_cache_interval(models, work, capsys):
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", models["base"], "--cache-interval", "0"],
         "--cache-interval must be at least 1")


def test_cache_interval_and_dtype_reach_the_metadata(models, work, capsys):
    assert run("txt2img", "-p", "a red circle", "-m", models["base"], "--json", "--cache-interval", "2",
               "--dtype", "bfloat16", *FAST) == 0
    settings = read_settings(Path(json.loads(capsys.readouterr().out)[0]["path"]))
    assert settings["cache_interval"] == 2 and settings["dtype"] == "bfloat16"


def test_bad_scheduler_lists_choices(models, work, capsys):
    _bad(work, capsys, ["txt2img", "-p", "x", "--scheduler", "fancy", "-m", models["base"], *FAST],
         "unknown scheduler 'fancy'", "dpm++2m-karras", "euler-a")


def test_bad_model_folder(work, capsys):
    (work / "junk").mkdir()
    (work / "junk" / "readme.txt").write_text("hi")
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", "junk", *FAST], "not a Stable Diffusion model folder")


def test_bad_inpaint_on_upscaler(models, work, capsys):
    _bad(work, capsys, ["inpaint", "photo.png", "--mask", "mask.png", "-p", "x", "-m", models["upscaler"], *FAST],
         "inpaint needs a base or inpainting model", "x4-upscaler")


def test_bad_existing_output_is_kept(models, work, capsys):
    (work / "o.png").write_bytes(b"precious")
    _bad(work, capsys, ["txt2img", "-p", "x", "-o", "o.png", "-m", models["base"], *FAST], "--overwrite")
    assert (work / "o.png").read_bytes() == b"precious"
    assert run("txt2img", "-p", "x", "-o", "o.png", "-m", models["base"], "--overwrite", *FAST) == 0
    assert PIL.Image.open(work / "o.png").size == (64, 64)


def test_bad_pickle_checkpoint(work, capsys):
    (work / "model.ckpt").write_bytes(b"\x80\x04not really")
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", "model.ckpt", *FAST], "--allow-pickle")


def test_bad_option_value_is_one_line(models, work, capsys):
    _bad(work, capsys, ["txt2img", "-p", "x", "--steps", "many", "-m", models["base"]], "--steps")


def test_no_model_and_no_demo_says_what_to_pass(work, capsys, monkeypatch):
    import editsuite.demo

    monkeypatch.setattr(editsuite.demo, "demo_model", lambda kind: None)
    _bad(work, capsys, ["txt2img", "-p", "x", *FAST], "--model")


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1"])
def test_bad_guidance_is_refused_before_anything_runs(models, work, capsys, value):
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", models["base"], "-g", value, *FAST], "guidance scale")


def test_a_picture_with_nan_is_never_saved(models, work, capsys, monkeypatch):
    """Whatever overflows inside the model, a NaN or infinite picture is refused, not saved flat."""
    from editsuite.bundle.torch_backend import TorchBackend

    real = TorchBackend.vae_decode
    monkeypatch.setattr(TorchBackend, "vae_decode", lambda self, z: real(self, z) * float("nan"))
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", models["base"], *FAST], "NaN or infinite")


def test_a_fifo_as_input_is_refused_not_waited_on(models, work, capsys):
    import os

    os.mkfifo(work / "pipe.png")
    _bad(work, capsys, ["img2img", "pipe.png", "-p", "x", "-m", models["base"], *FAST], "not a regular file")


def test_a_prompt_that_is_not_utf8_is_one_line(models, work, capsys):
    # what Python makes of argv bytes that are not UTF-8: lone surrogates
    _bad(work, capsys, ["txt2img", "-p", "a b\udcff\udcfe", "-m", models["base"], *FAST], "not UTF-8")


def test_a_schedule_the_scheduler_cannot_make_is_one_line(work, capsys):
    """The demo model's PNDM runs a Runge-Kutta warm-up that 3 steps cannot hold: diffusers raises inside."""
    _bad(work, capsys, ["txt2img", "-p", "x", "--scheduler", "pndm", "--steps", "3", "-q"], "cannot run 3 steps")


def test_names_longer_than_the_file_system_allows_are_one_line(models, work, capsys):
    long = "a" * 300
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", models["base"], "-o", f"{long}.png", *FAST], "255")
    _bad(work, capsys, ["img2img", f"{long}.png", "-p", "x", "-m", models["base"], *FAST], "cannot be read")


@pytest.mark.parametrize("args,expect", [
    (["txt2img", "--width", "100000"], "width must be at most 16384"),
    (["txt2img", "-N", "100000"], "over the bound of 16,777,216"),
    (["outpaint", "photo.png", "--expand", "20000"], "at most 16384 a side"),
    (["upscale", "photo.png", "--scale", "nan"], "scale must be between 1 and 8 (got nan)"),
    (["txt2img", "-N", "3", "--max-output-pixels", "10000"], "over the bound of 10,000"),
])
def test_outputs_too_big_are_refused_before_the_run(models, work, capsys, args, expect):
    _bad(work, capsys, [*args, "-p", "x", "-m", models["base"], *FAST], expect)


@pytest.mark.parametrize("target", ["out.png", "sub/dir", "."])
def test_read_only_output_is_one_line_before_the_model_loads(work, capsys, read_only, target):
    """The model does not exist: the output folder is refused first, so nothing loads or runs."""
    _bad(work, capsys, ["txt2img", "-p", "x", "-m", "no-such-model", "-o", read_only / target, *FAST],
         "it is on a read-only file system", "choose another output folder")
