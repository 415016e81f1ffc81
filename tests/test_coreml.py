"""Core ML conversion of tiny models of every kind and attention variant: each package verified against its
PyTorch module in the reference executor (>= 35 dB), the Neural Engine layout rules, compression,
chunking, several resolutions, and the five tasks end to end on the Core ML backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from coreml_checks import EDITS, StandIn, apple_contract_problems, photo_and_mask, psnr  # noqa: E402
from tiny import save_tiny  # noqa: E402

from editsuite import Txt2Img, load_bundle  # noqa: E402
from editsuite.bundle.coreml_layout import find_models  # noqa: E402
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


@pytest.mark.parametrize("name", list(KINDS))
def test_every_package_verifies(bundles, name):
    checks = verify(bundles[name])
    unet = "UnetChunk1+UnetChunk2" if name == "sd1" else "Unet"  # the chunked UNet is checked chained
    assert {c.module for c in checks} == {"TextEncoder", "VAEEncoder", "VAEDecoder", unet}
    for c in checks:
        print(f"{name} {c.module}: {c.psnr_db:.1f} dB at {', '.join(c.resolutions)}")
        assert c.psnr_db >= THRESHOLD_DB, (c.module, c.psnr_db)


# One variant per kind by default (each variant twice over the kinds, with the `bundles` conversions: sd1
# split-einsum, sd2 v2, inpainting original, upscaler split-einsum); every pair with -m slow.
FAST_VARIANTS = {("sd1", "original"), ("sd2", "split-einsum-v2"), ("inpainting", "split-einsum"),
                 ("upscaler", "original")}


@pytest.mark.parametrize("name,variant", [
    pytest.param(n, v, marks=() if (n, v) in FAST_VARIANTS else pytest.mark.slow) for n in KINDS for v in VARIANTS])
def test_unet_of_each_kind_and_variant(sources, tmp_path, name, variant, monkeypatch):
    import editsuite.convert.ane as ane

    monkeypatch.setattr(ane, "V2_MAX_WEIGHTS", 1024)  # so v2 really chunks the tiny model's 64-token attention
    out = convert(sources[name], tmp_path / "b", attention=variant, components=["unet"])
    (check,) = verify(out)
    assert check.psnr_db >= THRESHOLD_DB, check.psnr_db
    program = Program(find_models(out).paths["unet"])
    if variant != "original":  # the Neural Engine layout: no linear op, nothing above rank 4
        print(f"{name}/{variant} UNet ops: {program.op_histogram()}")
        assert "linear" not in program.op_histogram()
        assert program.max_rank <= 4
        assert "einsum" in program.op_histogram()


def test_manifest_describes_the_bundle(bundles, sources):
    data = json.loads((bundles["sd1"] / "coreml-manifest.json").read_text())
    assert data["model"]["kind"] == "base" and data["model"]["model_hash"]
    assert data["settings"] == {"resolutions": [[64, 64], [64, 96]], "attention": "split-einsum",
                                "quantize_bits": None, "chunk_unet": True, "model_version": "sd1"}
    assert set(data["packages"]) == {"text_encoder", "unet_chunk1", "unet_chunk2", "vae_encoder", "vae_decoder"}
    assert data["packages"]["unet_chunk1"]["file"] == "Stable_Diffusion_version_sd1_unet_chunk1.mlpackage"
    assert data["model"]["source"] == str(sources["sd1"].resolve())  # absolute: verify works from any folder
    sample = data["packages"]["unet_chunk1"]["inputs"]["sample"]
    assert sample["shapes"] == [[2, 4, 8, 8], [2, 4, 12, 8]]
    for name in ("tokenizer", "scheduler"):
        assert (bundles["sd1"] / name).is_dir()
    import coremltools as ct

    spec = ct.utils.load_spec(str(find_models(bundles["sd1"]).paths["unet_chunk1"]))
    assert all(i.shortDescription for i in spec.description.input)
    assert all(o.shortDescription for o in spec.description.output)


def _first_chunk_share(unet) -> float:
    from editsuite.convert.modules import _params, chunk_split

    k = chunk_split(unet)
    second = sum(_params(b) for b in unet.up_blocks[k:]) + _params(unet.conv_out) + _params(unet.conv_norm_out)
    return 1 - second / _params(unet)


def test_chunks_split_the_weights_as_evenly_as_the_blocks_allow(bundles, sources):
    """The split falls between up blocks: SD 1.5's UNet (built empty from its config) gets 59 % / 41 %; the
    tiny UNet, two up blocks, can only split 80 / 20, and its packages hold what the split says."""
    import accelerate
    from diffusers import UNet2DConditionModel

    with accelerate.init_empty_weights():
        sd15 = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            Path(__file__).resolve().parents[1] / "editsuite" / "configs" / "sd-v1" / "unet"))
    assert 0.4 < _first_chunk_share(sd15) < 0.65
    data = json.loads((bundles["sd1"] / "coreml-manifest.json").read_text())
    a, b = (data["packages"][n]["size_bytes"] for n in ("unet_chunk1", "unet_chunk2"))
    tiny = load_bundle(sources["sd1"], backend="torch", device="cpu", dtype="float32").backend.unet_model
    assert abs(a / (a + b) - _first_chunk_share(tiny)) < 0.05


def test_int8_weights_are_compressed_and_the_token_table_is_not(bundles, sources, tmp_path):
    plain = convert(sources["upscaler"], tmp_path / "plain", resolutions=[(64, 64)], components=["unet", "text_encoder"])
    sizes = {}
    for name in ("unet", "text_encoder"):
        sizes[name] = [json.loads((d / "coreml-manifest.json").read_text())["packages"][name]["size_bytes"]
                       for d in (plain, bundles["upscaler"])]
    assert sizes["unet"][1] < 0.7 * sizes["unet"][0]
    te_path = find_models(bundles["upscaler"]).paths["text_encoder"]
    te = Program(te_path)
    table = max(te.consts.values(), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else 0)
    assert table.shape[0] == 49408  # the embedding table, expanded: stored fp16, not quantized
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(te_path))
    prog = load(spec, spec.specificationVersion, file_weights_dir=str(te_path / "Data/com.apple.CoreML/weights"))
    gathers = [o for o in prog.functions["main"].operations if o.op_type == "gather"]
    assert gathers and all(g.inputs["x"].op.op_type == "const" for g in gathers)


@pytest.mark.parametrize("bits", [pytest.param(6, marks=pytest.mark.slow), 4])  # Apple's 6-bit bundle: test_apple
def test_palettized_unet_runs_in_the_executor(sources, tmp_path, bits):
    out = convert(sources["sd1"], tmp_path / "p", quantize_bits=bits, components=["unet"])
    (check,) = verify(out)
    print(f"{bits}-bit palettized tiny UNet: {check.psnr_db:.1f} dB")
    assert check.psnr_db > 15  # random tiny weights palettize worse than trained ones; it must still run


def test_rerun_skips_finished_packages_and_refuses_other_settings(sources, tmp_path):
    said = []
    out = convert(sources["sd1"], tmp_path / "b", components=["text_encoder"], progress=said.append)
    assert set(find_models(out).paths) == {"text_encoder"}
    said.clear()
    convert(sources["sd1"], out, components=["text_encoder", "vae_decoder"], progress=said.append)
    assert "TextEncoder: already converted, skipped" in said
    assert set(find_models(out).paths) == {"text_encoder", "vae_decoder"}
    with pytest.raises(UserError, match="other settings"):
        convert(sources["sd1"], out, attention="original")
    assert not list(out.glob(".partial-*"))


def test_unlisted_size_names_the_converted_sizes(bundles):
    bundle = load_bundle(bundles["sd1"])
    with pytest.raises(UserError, match="converted for 64x64, 64x96, not 96x96"):
        Txt2Img(bundle).run("a red circle", steps=2, seed=0, width=96, height=96)


def _pair(bundles, sources, name):
    return (load_bundle(bundles[name]), load_bundle(sources[name], backend="torch", device="cpu", dtype="float32"))


def test_five_tasks_on_the_coreml_backend_match_torch(bundles, sources):
    photo, mask = photo_and_mask()
    base, inpainting, upscaler = (_pair(bundles, sources, n) for n in ("sd1", "inpainting", "upscaler"))
    assert base[0].backend.name == "coreml" and base[0].notice  # off macOS: the reference executor, said once
    pairs = {"txt2img": base, "txt2img 64x96": base, "img2img": base, "outpaint": base, "inpaint": inpainting,
             "upscale": upscaler}
    for task, (coreml, torch_) in pairs.items():
        a, b = (EDITS[task](bundle, photo, mask).images[0] for bundle in (coreml, torch_))
        assert a.size == b.size
        score = psnr(a, b)
        print(f"{task}: Core ML backend vs torch {score:.1f} dB")
        assert score >= 30, (task, score)


@pytest.mark.parametrize("name", list(KINDS))
def test_converted_bundle_keeps_apples_contract(bundles, sources, name):
    """Names, dtypes and shapes Apple's pipelines require, read from the specs; vocab.json and merges.txt at the
    root that tokenize as the source's tokenizer does; the model's numbers in each package's metadata."""
    from transformers import CLIPTokenizer

    assert apple_contract_problems(bundles[name], upscaler=name == "upscaler") == []
    source = load_bundle(sources[name], backend="torch", device="cpu", dtype="float32")
    apple_tok = CLIPTokenizer.from_pretrained(bundles[name], model_max_length=77)  # reads vocab.json + merges.txt
    for text in ("a red circle on a blue background", "Ünïcode, punctuation!? and   spaces", ""):
        assert apple_tok(text).input_ids == source.tokenizer(text).input_ids, text
    import coremltools as ct

    for path in find_models(bundles[name]).paths.values():
        meta = ct.utils.load_spec(str(path)).description.metadata.userDefined
        assert meta["com.github.editsuite.model_kind"] == source.kind.value
        assert meta["com.github.editsuite.prediction_type"] == source.manifest.prediction_type
        assert float(meta["com.github.editsuite.latent_scale"]) == source.manifest.scaling_factor
        assert int(meta["com.github.editsuite.vae_scale_factor"]) == source.manifest.vae_scale_factor


@pytest.mark.parametrize("name", ["sd1", "inpainting", "upscaler"])
def test_backend_feeds_exactly_what_each_converted_model_describes(bundles, name):
    """A stand-in for Core ML's MLModel checks every array the backend gives predict against the spec."""
    from editsuite.bundle.coreml_backend import load_coreml_bundle

    StandIn.fed.clear()
    bundle = load_coreml_bundle(bundles[name], use_coreml=True, runtime=StandIn)
    photo, mask = photo_and_mask()
    edits = {"sd1": ["txt2img", "txt2img 64x96", "img2img"], "inpainting": ["inpaint"], "upscaler": ["upscale"]}
    for edit in edits[name]:
        EDITS[edit](bundle, photo, mask)
    # every model the edits use: chunks and both VAEs for sd1; the x4 upscaler needs no VAE encoder
    assert len({n for n, _ in StandIn.fed}) == {"sd1": 5, "inpainting": 4, "upscaler": 3}[name]
    if name == "sd1":  # both converted sizes went through the enumerated shapes
        assert {shape for n, arrays in StandIn.fed if n.endswith("_vae_decoder.mlpackage")
                for _, shape in arrays.values()} == {(1, 4, 8, 8), (1, 4, 12, 8)}


def test_compile_needs_macos_and_writes_swift_resources(sources, bundles, tmp_path, monkeypatch, capsys):
    """Off macOS --compile is a one-line error; on macOS (coremlcompiler stood in for) Resources/ holds
    what Apple's Swift CLI and Mochi Diffusion open."""
    import subprocess

    import editsuite.convert.coreml as conv
    from editsuite.cli.app import main

    assert main(["convert", str(sources["sd1"]), "-o", str(tmp_path / "c"), "--compile", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile needs macOS" in err[0] and not (tmp_path / "c").exists()

    calls = []

    def fake_xcrun(cmd, **kw):  # what coremlcompiler does: <out>/<package stem>.mlmodelc
        calls.append(cmd)
        (Path(cmd[4]) / f"{Path(cmd[3]).stem}.mlmodelc").mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(conv, "on_macos", lambda: True)
    monkeypatch.setattr(subprocess, "run", fake_xcrun)
    out = tmp_path / "mac"
    shutil.copytree(bundles["sd1"], out)
    conv.convert(sources["sd1"], out, resolutions=[(64, 64), (64, 96)], chunk_unet=True, compile=True)
    assert all(c[:3] == ["xcrun", "coremlcompiler", "compile"] for c in calls) and len(calls) == 5
    assert sorted(p.name for p in (out / "Resources").iterdir()) == [
        "TextEncoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "VAEDecoder.mlmodelc",
        "VAEEncoder.mlmodelc", "merges.txt", "vocab.json"]


def test_cli_convert_verify_and_bad_options(sources, tmp_path, capsys):
    from editsuite.cli.app import main

    out = tmp_path / "cli"
    assert main(["convert", str(sources["sd1"]), "-o", str(out), "--components", "text_encoder", "-q"]) == 0
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TextEncoder" in printed and " ok " in printed
    for bad, message in ((["--attention", "bogus"], "'bogus' is not one of 'original', 'split-einsum', "
                                                    "'split-einsum-v2'"),
                         (["--quantize-bits", "5"], "--quantize-bits 5 is not supported"),
                         (["--resolution", "big"], "is not WIDTHxHEIGHT"),
                         (["--resolution", "60x64"], "not a multiple of 16")):
        assert main(["convert", str(sources["sd1"]), "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()
    assert main(["verify", str(tmp_path)]) == 2
    assert "is not a Core ML bundle" in capsys.readouterr().err


def test_fast_fp16_overflow_check_answers_as_coremltools_does():
    """convert replaces coremltools' slow check (does an fp32 weight hold values fp16 cannot?) with its own:
    the same answer on every kind of value."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from editsuite.convert.coreml import _fast_fp16_overflow_check

    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    cases = [[1.0, -2.0], [70000.0, 1.0], [1.0, -70000.0], [np.inf, 1.0], [-np.inf, 3.0], [1e39, 2.0],
             [-1e39, 70000.0], [np.nan, 3.0], [65504.0, -65504.0], [65505.0, 0.0]]
    answers = []
    for values in cases:
        @mb.program(input_specs=[mb.TensorSpec(shape=(2,))])
        def prog(x):
            return mb.add(x=x, y=np.array(values, dtype=np.float32))

        (add,) = [o for o in prog.functions["main"].operations if o.op_type == "add"]
        expected = FP16ComputePrecision.fp16_overflow(add)
        with _fast_fp16_overflow_check():
            got = FP16ComputePrecision.fp16_overflow(add)
        assert got == expected, (values, got, expected)
        answers.append(got)
    assert answers.count(True) >= 3 and answers.count(False) >= 3  # both answers were exercised
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is original  # coremltools' own again afterwards


def test_overwrite_replaces_only_what_editsuite_wrote(sources, tmp_path):
    """--overwrite of a folder that also holds the user's files (and the source model itself) replaces the
    bundle editsuite wrote there, finished beside it first, and nothing else."""
    out = tmp_path / "b"
    convert(sources["sd1"], out, components=["text_encoder"])
    (out / "notes.txt").write_text("mine")
    shutil.copytree(sources["sd1"], out / "model")
    (out / "Resources").mkdir()
    (out / "Resources" / "mine.txt").write_text("mine too")
    convert(out / "model", out, components=["text_encoder", "vae_decoder"], attention="original", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "Resources" / "mine.txt").is_file()
    assert load_bundle(out / "model", backend="torch", device="cpu").kind.value == "base"  # the source is intact
    data = json.loads((out / "coreml-manifest.json").read_text())
    assert data["settings"]["attention"] == "original" and data["settings"]["model_version"] == "model"
    assert set(find_models(out).paths) == {"text_encoder", "vae_decoder"}
    assert not list(out.glob("*sd1*")) and not list(tmp_path.glob(".b.converting-*"))  # old packages, staging gone


def test_rerun_repairs_a_half_written_tokenizer_and_package(sources, tmp_path):
    said = []
    out = convert(sources["sd1"], tmp_path / "b", components=["text_encoder"])
    (out / "tokenizer" / "tokenizer_config.json").unlink()
    te = find_models(out).paths["text_encoder"]
    (te / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    convert(sources["sd1"], out, components=["text_encoder"], progress=said.append)
    assert "TextEncoder: already converted, skipped" not in said  # its weights were gone: converted again
    assert (te / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").is_file()
    assert load_bundle(out).tokenizer("a red circle").input_ids == \
        load_bundle(sources["sd1"], backend="torch", device="cpu").tokenizer("a red circle").input_ids
    manifest = out / "coreml-manifest.json"  # a rerun reads the old manifest through the same checks
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "packages": ["unet"]}))
    with pytest.raises(UserError, match="'packages' must be JSON objects"):
        convert(sources["sd1"], out, components=["text_encoder"])


def _tamper(name):
    def edit(data, out):
        model = data["model"]
        if name == "key missing":
            del model["kind"]
        elif name == "unknown kind":
            model["kind"] = "sdxl-turbo"
        elif name == "extra field":
            model["colour"] = "blue"
        elif name == "absurd resolution":
            data["settings"]["resolutions"] = [[1000000000, 64]]
        elif name == "package deleted":
            shutil.rmtree(out / data["packages"]["unet"]["file"])
        elif name == "no scheduler":
            shutil.rmtree(out / "scheduler")
        elif name == "wrong type":
            model["unet_in_channels"] = "nine"
        return [1, 2] if name == "JSON list" else data
    return edit


@pytest.mark.parametrize("name,message", [
    ("key missing", "model.kind is missing"), ("JSON list", "not an editsuite manifest"),
    ("unknown kind", "model.kind 'sdxl-turbo'"), ("extra field", "unknown field model.colour"),
    ("absurd resolution", "out of range"), ("package deleted", "is missing"),
    ("no scheduler", "scheduler_config.json is missing"), ("wrong type", "model.unet_in_channels has the wrong type")])
def test_damaged_manifest_is_a_one_line_error(bundles, tmp_path, capsys, name, message):
    from editsuite.cli.app import main

    out = tmp_path / "b"
    shutil.copytree(bundles["inpainting"], out)
    path = out / "coreml-manifest.json"
    path.write_text(json.dumps(_tamper(name)(json.loads(path.read_text()), out)))
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
