"""SDXL on the Core ML side: editsuite converts SDXL (base and refiner) into Apple's SDXL layout, the same
names, dtypes and shapes as Apple's converter gives for the same source (tests/fixtures/apple/sdxl), each
package within 35 dB of its diffusers module in the reference executor, and the edits run on the bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from coreml_checks import EDITS, StandIn, _io, _spec, apple_contract_problems, photo_and_mask, psnr  # noqa: E402
from tiny import tiny_xl_components, tiny_xl_refiner_components  # noqa: E402

from editsuite import load_bundle  # noqa: E402
from editsuite.bundle.coreml_backend import load_coreml_bundle  # noqa: E402
from editsuite.bundle.coreml_layout import find_models  # noqa: E402
from editsuite.convert.coreml import convert  # noqa: E402
from editsuite.convert.verify import THRESHOLD_DB, verify  # noqa: E402

APPLE = Path(__file__).parent / "fixtures" / "apple" / "sdxl"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The source of Apple's SDXL fixture, converted by editsuite with the settings Apple's was made with."""
    return convert(APPLE / "source", tmp_path_factory.mktemp("xl") / "bundle", model_version="tiny-sdxl")


def _ordered_io(path: Path):
    d = _spec(path).description
    return list(_io(d.input).items()), list(_io(d.output).items())


def test_converted_sdxl_has_apples_names_dtypes_and_shapes(converted):
    """Package by package, inputs and outputs in Apple's order, against the packages Apple's converter made
    from the same folder with --xl-version."""
    ours, apples = find_models(converted).paths, find_models(APPLE / "packages").paths
    assert set(ours) == set(apples) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    for component in ours:
        assert _ordered_io(ours[component]) == _ordered_io(apples[component]), component
    assert [p.name for p in ours.values()] == [p.name.replace("applefx-set1_", "") for p in apples.values()]
    assert apple_contract_problems(converted) == []


def test_every_converted_sdxl_package_verifies(converted):
    checks = verify(converted)
    assert {c.module for c in checks} == {"TextEncoder", "TextEncoder2", "VAEEncoder", "VAEDecoder", "Unet"}
    assert all(c.psnr_db >= THRESHOLD_DB for c in checks), [(c.module, c.psnr_db) for c in checks]


def test_edits_on_the_converted_sdxl_bundle_match_pytorch(converted):
    coreml = load_bundle(converted)
    torch_ = load_bundle(APPLE / "source", backend="torch", device="cpu", dtype="float32")
    assert coreml.backend.name == "coreml" and coreml.manifest.xl and coreml.tokenizer_2.pad_token == "!"
    photo, mask = photo_and_mask()
    for edit in ("txt2img", "img2img", "inpaint"):
        a, b = (EDITS[edit](bundle, photo, mask).images[0] for bundle in (coreml, torch_))
        score = psnr(a, b)
        print(f"SDXL {edit}: editsuite's Core ML bundle vs PyTorch {score:.1f} dB")
        assert a.size == b.size and score >= 35, (edit, score)


def test_sdxl_refiner_converts_chunked_at_two_sizes(tmp_path):
    """The refiner: the second text encoder only, 5 time ids (an aesthetic score), its UNet in two chunks
    that take the SDXL inputs in the first; every package verified, what the backend feeds checked by the
    stand-in for Core ML's MLModel at both sizes."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = tiny_xl_refiner_components(tiny_xl_components())
    StableDiffusionXLImg2ImgPipeline(**refiner, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                     add_watermarker=False).save_pretrained(tmp_path / "refiner",
                                                                            safe_serialization=True)
    out = convert(tmp_path / "refiner", tmp_path / "bundle", resolutions=[(64, 64), (64, 96)], chunk_unet=True)
    models = find_models(out)
    assert set(models.paths) == {"text_encoder_2", "unet_chunk1", "unet_chunk2", "vae_encoder", "vae_decoder"}
    head = _spec(models.paths["unet_chunk1"]).description
    assert dict(_io(head.input))["time_ids"][1] == [2, 5]
    assert apple_contract_problems(out) == []
    checks = verify(out)
    assert {c.module for c in checks} == {"TextEncoder2", "VAEEncoder", "VAEDecoder", "UnetChunk1+UnetChunk2"}
    assert all(c.psnr_db >= THRESHOLD_DB for c in checks), [(c.module, c.psnr_db) for c in checks]

    StandIn.fed.clear()
    bundle = load_coreml_bundle(out, use_coreml=True, runtime=StandIn)
    assert bundle.manifest.refiner and bundle.tokenizer is None and not bundle.manifest.force_zeros_for_empty_prompt
    photo, _ = photo_and_mask()
    torch_ = load_bundle(tmp_path / "refiner", backend="torch", device="cpu", dtype="float32")
    for size in ((64, 64), (64, 96)):
        picture = photo.resize(size)
        a, b = (EDITS["img2img"](x, picture, None).images[0] for x in (bundle, torch_))
        assert a.size == b.size == size and psnr(a, b) >= 35, (size, psnr(a, b))
    assert {n for n, _ in StandIn.fed} == {p.name for p in models.paths.values()}


@pytest.mark.slow  # k-means over every weight: 50 s on 2 cores
def test_sdxl_unet_palettizes_to_6_bits_and_runs(tmp_path):
    """--quantize-bits 6 on SDXL's UNet: k-means lookup tables in the program, and it still runs (random tiny
    weights palettize worse than trained ones, hence the low bar, as for SD 1.x in test_coreml)."""
    from editsuite.bundle.mil_executor import load_program

    out = convert(APPLE / "source", tmp_path / "p6", quantize_bits=6, components=["unet"])
    (check,) = verify(out)
    print(f"6-bit palettized tiny SDXL UNet: {check.psnr_db:.1f} dB")
    assert check.module == "Unet" and check.psnr_db > 15
    ops = [op.op_type for op in load_program(find_models(out).paths["unet"]).functions["main"].operations]
    assert ops.count("constexpr_lut_to_dense") > 0
