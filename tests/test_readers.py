"""editsuite's PNGs as other tools read them: sd-parsers and sd-prompt-reader, the readers galleries and
prompt viewers use, parse the `parameters` text the way AUTOMATIC1111 1.10 replays it."""

from __future__ import annotations

import PIL.Image
import pytest
from sd_parsers import ParserManager
from sd_prompt_reader.image_data_reader import ImageDataReader
from tiny import tiny_components

import editsuite
from editsuite import ModelBundle
from editsuite.imaging.metadata import png_info, png_settings, read_settings
from editsuite.imaging.output import save_atomic


@pytest.fixture(scope="module")
def odd_name():
    """The tiny model under a name with the characters infotext readers split on."""
    return ModelBundle.from_components(**tiny_components(), name='studio: "mix", v2')


def write(tmp_path, result, index=0, name="out.png"):
    return save_atomic(result.images[index], tmp_path / name, pnginfo=png_info(png_settings(result.image_settings(index))))


def both(path):
    sdp, spr = ParserManager().parse(path), ImageDataReader(str(path))
    assert sdp is not None and spr.status.name == "READ_SUCCESS" and spr.tool == "A1111 webUI"
    return sdp, spr


RUN = dict(steps=2, guidance_scale=7.0, seed=42, width=64, height=64)


@pytest.mark.parametrize("scheduler,sampler,schedule", [("dpm++2m", "DPM++ 2M", "SGM Uniform"),
                                                        ("dpm++2m-karras", "DPM++ 2M", "Karras"),
                                                        ("euler-a", "Euler a", "Uniform"),
                                                        ("ddim", "DDIM", None)])
def test_sampler_and_schedule_type_read_back(tmp_path, odd_name, scheduler, sampler, schedule):
    path = write(tmp_path, editsuite.Txt2Img(odd_name).run("a red circle", negative_prompt="blurry",
                                                           scheduler=scheduler, **RUN))
    sdp, spr = both(path)
    assert sdp.full_prompt == spr.positive == "a red circle"
    assert sdp.full_negative_prompt == spr.negative == "blurry"
    assert sdp.samplers[0].name == spr.parameter["sampler"] == sampler
    assert sdp.samplers[0].parameters.get("scheduler") == schedule
    assert sdp.samplers[0].parameters["seed"] == spr.parameter["seed"] == "42"
    # the model's name reaches both readers whole (as editsuite writes it: no "," or ":")
    assert sdp.samplers[0].model.name == spr.parameter["model"] == 'studio_"mix"_v2'
    assert read_settings(path)["model"]["name"] == 'studio: "mix", v2'  # the JSON keeps it exactly


def test_a_sampler_a1111_does_not_know_is_not_named(tmp_path, odd_name):
    path = write(tmp_path, editsuite.Txt2Img(odd_name).run("a cat", scheduler="ddpm", **RUN))
    text = PIL.Image.open(path).info["parameters"]
    assert "Sampler" not in text and "DDPM" not in text  # A1111 would replay it as DPM++ 2M
    spr = ImageDataReader(str(path))
    assert spr.positive == "a cat" and spr.parameter["sampler"] is None and spr.parameter["seed"] == "42"
    # sd-parsers reads A1111 text only when it names a sampler: the price of not naming a wrong one
    assert ParserManager().parse(path) is None
    assert read_settings(path)["scheduler"] == "ddpm"


def test_each_image_of_a_batch_carries_its_own_seed(tmp_path, odd_name):
    result = editsuite.Txt2Img(odd_name).run("a cat", num_images=2, **RUN)
    for i in range(2):
        sdp, spr = both(write(tmp_path, result, i, f"{i}.png"))
        assert sdp.samplers[0].parameters["seed"] == spr.parameter["seed"] == str(42 + i)


def test_prompt_less_upscale_has_no_prompt(tmp_path, photo):
    x4 = ModelBundle.from_components(**tiny_components("upscaler"), name="x4")
    path = write(tmp_path, editsuite.Upscale(x4).run(photo.resize((16, 16)), steps=2, seed=3))
    sdp, spr = both(path)
    assert sdp.full_prompt == spr.positive == ""
    assert spr.parameter["steps"] == "2" and spr.parameter["seed"] == "3"


def test_tiled_upscale_writes_a1111_sd_upscale_keys(tmp_path, odd_name, photo):
    result = editsuite.Upscale(odd_name).run(photo.resize((48, 48)), "sharp", scale=2, tile=64, overlap=16,
                                             strength=0.3, steps=2, seed=5)
    sdp, spr = both(write(tmp_path, result))
    assert sdp.metadata["SD upscale overlap"] == "16" and sdp.metadata["SD upscale upscaler"] == "Lanczos"
    assert spr.parameter["size"] == "64x64"  # as A1111 writes it: the size of a tile
    assert result.images[0].size == (96, 96)


def test_inpaint_keys_are_a1111s(tmp_path, odd_name, photo, mask):
    result = editsuite.Inpaint(odd_name).run(photo, mask, "a bench", mask_blur=4, only_masked=True, padding=8,
                                             invert_mask=True, steps=2, seed=1)
    sdp, _ = both(write(tmp_path, result))
    assert sdp.metadata["Mask blur"] == "4" and sdp.metadata["Inpaint area"] == "Only masked"
    assert sdp.metadata["Masked area padding"] == "8" and sdp.metadata["Mask mode"] == "Inpaint not masked"
