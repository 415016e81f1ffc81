"""Core ML conversion of tiny models of every kind and attention variant: each package verified against its
PyTorch module in the reference executor (>= 35 dB), the Neural Engine layout rules, compression,
chunking, several resolutions, and the five tasks end to end on the Core ML backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from tiny import save_tiny  # noqa: E402

from editsuite import Img2Img, Inpaint, Outpaint, Txt2Img, Upscale, load_bundle  # noqa: E402
from editsuite.bundle.mil_executor import Program  # noqa: E402
from editsuite.convert.coreml import convert  # noqa: E402
from editsuite.convert.verify import THRESHOLD_DB, verify  # noqa: E402
from editsuite.errors import UserError  # noqa: E402

KINDS = {  # name: (kind, prediction type)
    "sd1": ("base", "epsilon"),
    "sd2": ("base", "v_prediction"),  # linear projections, per-block head counts
    "inpainting": ("inpainting", "epsilon"),
    "upscaler": ("upscaler", "epsilon"),
}
VARIANTS = ("original", "split-einsum", "split-einsum-v2")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {name: save_tiny(root / name, kind, pred) for name, (kind, pred) in KINDS.items()}


@pytest.fixture(scope="module")
def bundles(sources, tmp_path_factory):
    """One full conversion per kind, each with other settings, so together they cover every option."""
    root = tmp_path_factory.mktemp("coreml")
    settings = {
        "sd1": dict(resolutions=[(64, 64), (64, 96)], chunk_unet=True),
        "sd2": dict(attention="split-einsum-v2"),
        "inpainting": dict(attention="original"),
        "upscaler": dict(resolutions=[(64, 64)], quantize_bits=8),
    }
    return {name: convert(sources[name], root / name, **settings[name]) for name in KINDS}


def _psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))


@pytest.mark.parametrize("name", list(KINDS))
def test_every_package_verifies(bundles, name):
    checks = verify(bundles[name])
    expected = 4 if name != "sd1" else 4  # the chunked UNet is checked as one chained module
    assert len(checks) == expected
    for c in checks:
        print(f"{name} {c.module}: {c.psnr_db:.1f} dB at {', '.join(c.resolutions)}")
        assert c.psnr_db >= THRESHOLD_DB, (c.module, c.psnr_db)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(KINDS))
def test_unet_of_each_kind_and_variant(sources, tmp_path, name, variant, monkeypatch):
    import editsuite.convert.ane as ane

    monkeypatch.setattr(ane, "QUERY_CHUNK", 24)  # so v2 really chunks the tiny model's queries
    out = convert(sources[name], tmp_path / "b", attention=variant, components=["unet"])
    (check,) = verify(out)
    assert check.psnr_db >= THRESHOLD_DB, check.psnr_db
    program = Program(out / "Unet.mlpackage")
    if variant != "original":  # the Neural Engine layout: no linear op, nothing above rank 4
        print(f"{name}/{variant} UNet ops: {program.op_histogram()}")
        assert "linear" not in program.op_histogram()
        assert program.max_rank <= 4
        assert "einsum" in program.op_histogram()


def test_manifest_describes_the_bundle(bundles):
    data = json.loads((bundles["sd1"] / "coreml-manifest.json").read_text())
    assert data["model"]["kind"] == "base" and data["model"]["model_hash"]
    assert data["settings"] == {"resolutions": [[64, 64], [64, 96]], "attention": "split-einsum",
                                "quantize_bits": None, "chunk_unet": True}
    assert set(data["packages"]) == {"TextEncoder", "UnetChunk1", "UnetChunk2", "VAEEncoder", "VAEDecoder"}
    sample = data["packages"]["UnetChunk1"]["inputs"]["sample"]
    assert sample["shapes"] == [[2, 4, 8, 8], [2, 4, 12, 8]]
    for name in ("tokenizer", "scheduler"):
        assert (bundles["sd1"] / name).is_dir()
    import coremltools as ct

    spec = ct.utils.load_spec(str(bundles["sd1"] / "UnetChunk1.mlpackage"))
    assert all(i.shortDescription for i in spec.description.input)
    assert all(o.shortDescription for o in spec.description.output)


def test_chunks_hold_about_half_the_weights_each(bundles):
    data = json.loads((bundles["sd1"] / "coreml-manifest.json").read_text())
    a, b = (data["packages"][n]["size_bytes"] for n in ("UnetChunk1", "UnetChunk2"))
    assert 0.2 < a / (a + b) < 0.8


def test_int8_weights_are_compressed_and_the_token_table_is_not(bundles, sources, tmp_path):
    plain = convert(sources["upscaler"], tmp_path / "plain", resolutions=[(64, 64)], components=["unet", "text_encoder"])
    sizes = {}
    for name in ("Unet", "TextEncoder"):
        sizes[name] = [json.loads((d / "coreml-manifest.json").read_text())["packages"][name]["size_bytes"]
                       for d in (plain, bundles["upscaler"])]
    assert sizes["Unet"][1] < 0.7 * sizes["Unet"][0]
    te = Program(bundles["upscaler"] / "TextEncoder.mlpackage")
    table = max(te.consts.values(), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else 0)
    assert table.shape[0] == 49408  # the embedding table, expanded: stored fp16, not quantized
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(bundles["upscaler"] / "TextEncoder.mlpackage"))
    prog = load(spec, spec.specificationVersion,
                file_weights_dir=str(bundles["upscaler"] / "TextEncoder.mlpackage/Data/com.apple.CoreML/weights"))
    gathers = [o for o in prog.functions["main"].operations if o.op_type == "gather"]
    assert gathers and all(g.inputs["x"].op.op_type == "const" for g in gathers)


@pytest.mark.parametrize("bits", [6, 4])
def test_palettized_unet_runs_in_the_executor(sources, tmp_path, bits):
    out = convert(sources["sd1"], tmp_path / "p", quantize_bits=bits, components=["unet"])
    (check,) = verify(out)
    print(f"{bits}-bit palettized tiny UNet: {check.psnr_db:.1f} dB")
    assert check.psnr_db > 15  # random tiny weights palettize worse than trained ones; it must still run


def test_rerun_skips_finished_packages_and_refuses_other_settings(sources, tmp_path):
    said = []
    out = convert(sources["sd1"], tmp_path / "b", components=["text_encoder"], progress=said.append)
    assert (out / "TextEncoder.mlpackage").is_dir() and not (out / "Unet.mlpackage").exists()
    said.clear()
    convert(sources["sd1"], out, components=["text_encoder", "vae_decoder"], progress=said.append)
    assert "TextEncoder: already converted, skipped" in said
    assert (out / "VAEDecoder.mlpackage").is_dir()
    with pytest.raises(UserError, match="other settings"):
        convert(sources["sd1"], out, attention="original")
    assert not list(out.glob(".partial-*"))


def test_unlisted_size_names_the_converted_sizes(bundles):
    bundle = load_bundle(bundles["sd1"])
    with pytest.raises(UserError, match="converted for 64x64, 64x96, not 96x96"):
        Txt2Img(bundle).run("a red circle", steps=2, seed=0, width=96, height=96)


@pytest.fixture(scope="module")
def photo_and_mask():
    rng = np.random.default_rng(0)
    import PIL.Image

    photo = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return photo, PIL.Image.fromarray(mask)


def _pair(bundles, sources, name):
    return (load_bundle(bundles[name]), load_bundle(sources[name], backend="torch", device="cpu", dtype="float32"))


def test_five_tasks_on_the_coreml_backend_match_torch(bundles, sources, photo_and_mask):
    photo, mask = photo_and_mask
    small = photo.resize((16, 16))
    base_c, base_t = _pair(bundles, sources, "sd1")
    inp_c, inp_t = _pair(bundles, sources, "inpainting")
    up_c, up_t = _pair(bundles, sources, "upscaler")
    assert base_c.backend.name == "coreml" and base_c.notice  # off macOS: the reference executor, said once
    runs = {
        "txt2img": lambda b: Txt2Img(b).run("a red circle", steps=4, seed=3),
        "txt2img 64x96": lambda b: Txt2Img(b).run("a red circle", steps=4, seed=3, width=64, height=96),
        "img2img": lambda b: Img2Img(b).run(photo, "a red circle", steps=4, seed=3, strength=0.6),
        "outpaint": lambda b: Outpaint(b).run(photo.crop((0, 0, 64, 32)), "a red circle", steps=4, seed=3, bottom=32),
        "inpaint": lambda b: Inpaint(b).run(photo, mask, "a red circle", steps=4, seed=3),
        "upscale": lambda b: Upscale(b).run(small, steps=4, seed=3),
    }
    pairs = {"txt2img": (base_c, base_t), "txt2img 64x96": (base_c, base_t), "img2img": (base_c, base_t),
             "outpaint": (base_c, base_t), "inpaint": (inp_c, inp_t), "upscale": (up_c, up_t)}
    for task, run in runs.items():
        coreml, torch_ = pairs[task]
        a, b = run(coreml).images[0], run(torch_).images[0]
        assert a.size == b.size
        score = _psnr(a, b)
        print(f"{task}: Core ML backend vs torch {score:.1f} dB")
        assert score >= 30, (task, score)


def test_cli_convert_verify_and_bad_options(sources, tmp_path, capsys):
    from editsuite.cli.app import main

    out = tmp_path / "cli"
    assert main(["convert", str(sources["sd1"]), "-o", str(out), "--components", "text_encoder", "-q"]) == 0
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TextEncoder" in printed and " ok " in printed
    for bad, message in ((["--attention", "bogus"], "unknown attention 'bogus'"),
                         (["--quantize-bits", "5"], "--quantize-bits 5 is not supported"),
                         (["--resolution", "big"], "is not WIDTHxHEIGHT"),
                         (["--resolution", "60x64"], "not a multiple of 16")):
        assert main(["convert", str(sources["sd1"]), "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a converted Core ML bundle" in capsys.readouterr().err
