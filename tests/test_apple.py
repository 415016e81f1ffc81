"""Bundles made by Apple's own converter (ml-stable-diffusion torch2coreml, tests/fixtures/apple; see its README)
run in editsuite: every edit that fits the model's kind, through the reference executor, against the same
edit run by PyTorch on the diffusers folder each bundle was converted from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from coreml_checks import EDITS, StandIn, apple_contract_problems, photo_and_mask, psnr  # noqa: E402

from editsuite import Txt2Img, load_bundle  # noqa: E402
from editsuite.bundle.coreml_backend import load_coreml_bundle  # noqa: E402
from editsuite.convert.verify import THRESHOLD_DB, verify  # noqa: E402
from editsuite.errors import UserError  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "apple"
APPLE = {  # fixture: (the diffusers folder it was converted from, the edits that fit its kind)
    "sd1": ("sd1", ["txt2img", "img2img", "inpaint", "outpaint", "upscale"]),  # inpaint: 4-channel blend
    "inpaint9": ("inpaint9", ["inpaint"]),  # a 9-channel UNet: real inpainting, which Apple's pipelines lack
    "sd2v": ("sd2v", ["txt2img", "img2img"]),  # v-prediction, said by the --config folder
    "sd1-chunked": ("sd1", ["txt2img", "img2img"]),
    "sd1-6bit": ("sd1", ["txt2img", "img2img"]),
    # SDXL (--xl-version): two text encoders, time_ids and text_embeds, a float32 VAE; inpaint: 4-channel
    "sdxl": ("sdxl", ["txt2img", "img2img", "inpaint", "outpaint", "upscale"]),
}


def _source(fixture: str) -> Path:
    return FIX / APPLE[fixture][0] / "source"


@pytest.mark.parametrize("fixture", list(APPLE))
def test_apple_bundle_runs_each_edit_of_its_kind_as_pytorch_does(fixture):
    coreml = load_bundle(FIX / fixture / "packages", config=_source(fixture))
    reference = load_bundle(_source(fixture), backend="torch", device="cpu", dtype="float32")
    assert coreml.backend.name == "coreml" and coreml.notice  # off macOS: the reference executor, said once
    photo, mask = photo_and_mask()
    for edit in APPLE[fixture][1]:
        a, b = (EDITS[edit](bundle, photo, mask).images[0] for bundle in (coreml, reference))
        score = psnr(a, b)
        print(f"{fixture} {edit}: Apple's bundle vs PyTorch on its source {score:.1f} dB")
        assert a.size == b.size and score >= 35, (edit, score)


def test_what_is_read_from_apple_packages():
    """Kind, channels, resolution and text width come from the packages; the rest from --config or SD's defaults."""
    sd2 = load_bundle(FIX / "sd2v" / "packages", config=_source("sd2v"))
    assert (sd2.manifest.prediction_type, sd2.scheduler_config["_class_name"]) == ("v_prediction", "DDIMScheduler")
    bare = load_bundle(FIX / "sd2v" / "packages")  # no config: SD's defaults, or the option
    assert bare.manifest.prediction_type == "epsilon"
    assert load_bundle(FIX / "sd2v" / "packages", prediction_type="v_prediction").scheduler_config[
        "prediction_type"] == "v_prediction"
    inp = load_bundle(FIX / "inpaint9" / "packages", config=_source("inpaint9"))
    assert (inp.kind.value, inp.manifest.unet_in_channels, inp.manifest.cross_attention_dim) == ("inpainting", 9, 32)
    assert inp.backend.resolutions == [(64, 64)] and inp.manifest.vae_scale_factor == 8
    assert inp.manifest.name == "applefx-set1_tiny-inpaint9"
    # Apple's Swift pipeline runs the chunks when a folder has both; so does editsuite
    assert load_bundle(FIX / "sd1-chunked" / "packages").backend.unet_parts == ["unet_chunk1", "unet_chunk2"]
    # Apple's published repositories keep packages in packages/: the folder above it opens too
    assert load_bundle(FIX / "sd1", config=_source("sd1")).backend.name == "coreml"


@pytest.mark.parametrize("fixture", ["sd1", "sd1-chunked", "inpaint9", "sdxl"])
def test_backend_feeds_exactly_what_each_apple_model_describes(fixture):
    """What Core ML's predict is given, checked against each package's spec by a stand-in for MLModel."""
    StandIn.fed.clear()
    bundle = load_coreml_bundle(FIX / fixture / "packages", config=_source(fixture), use_coreml=True, runtime=StandIn)
    photo, mask = photo_and_mask()
    for edit in APPLE[fixture][1][:3]:
        EDITS[edit](bundle, photo, mask)
    fed = {name for name, _ in StandIn.fed}
    # every model it uses was called, both chunks too, both of SDXL's text encoders
    assert len(fed) == (5 if fixture in ("sd1-chunked", "sdxl") else 4)


@pytest.mark.parametrize("fixture", ["sd1", "inpaint9", "sd2v", "sd1-chunked", "sd1-6bit", "sdxl"])
def test_contract_checker_accepts_apples_own_bundles(fixture):
    assert apple_contract_problems(FIX / fixture / "packages") == []


def test_verify_an_apple_bundle_against_its_source():
    checks = verify(FIX / "sd1-chunked" / "packages", against=str(_source("sd1-chunked")))
    assert {c.module for c in checks} == {"TextEncoder", "VAEEncoder", "VAEDecoder", "UnetChunk1+UnetChunk2"}
    assert all(c.psnr_db >= THRESHOLD_DB for c in checks), [(c.module, c.psnr_db) for c in checks]
    with pytest.raises(UserError, match="pass --against"):
        verify(FIX / "sd1" / "packages")


def test_verify_apples_sdxl_bundle_against_its_source():
    """Both text encoders on what SDXL's UNet reads (penultimate layer, pooled embeddings), the UNet with
    time_ids and text_embeds, the float32 VAEs: each within Apple's 35 dB of diffusers' modules."""
    checks = verify(FIX / "sdxl" / "packages", against=str(_source("sdxl")))
    assert {c.module for c in checks} == {"TextEncoder", "TextEncoder2", "VAEEncoder", "VAEDecoder", "Unet"}
    assert all(c.psnr_db >= THRESHOLD_DB for c in checks), [(c.module, c.psnr_db) for c in checks]


def test_what_is_read_from_apples_sdxl_bundle():
    """SDXL is recognised by the UNet's time_ids; without --config the scheduler, latent scale and both
    tokenizers are SDXL's own (shipped with editsuite), with --config the source folder's."""
    with_config = load_bundle(FIX / "sdxl" / "packages", config=_source("sdxl"))
    m = with_config.manifest
    assert (m.family.value, m.refiner, m.cross_attention_dim, m.scaling_factor) == ("sdxl", False, 64, 0.13025)
    assert with_config.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert len(with_config.tokenizer_2) == 544 and with_config.tokenizer_2.pad_token == "!"
    bare = load_bundle(FIX / "sdxl" / "packages")
    assert bare.manifest.xl and bare.manifest.scaling_factor == 0.13025
    assert bare.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert len(bare.tokenizer) == len(bare.tokenizer_2) == 49408 and bare.tokenizer_2.pad_token == "!"


def _compiled_folder(tmp_path: Path) -> Path:
    """A folder laid out as Apple's compiled/ (Swift resources): names and metadata.json only."""
    res = tmp_path / "Resources"
    for name, inputs in (("Unet", [("sample", "Float16", "[2, 4, 8, 8]"), ("timestep", "Float16", "[2]"),
                                   ("encoder_hidden_states", "Float16", "[2, 32, 1, 77]")]),
                         ("TextEncoder", [("input_ids", "Float32", "[1, 77]")])):
        (res / f"{name}.mlmodelc").mkdir(parents=True)
        schema = [{"name": n, "dataType": t, "shape": s, "type": "MultiArray"} for n, t, s in inputs]
        meta = [{"inputSchema": schema, "outputSchema": [{"name": "noise_pred", "dataType": "Float32",
                                                          "shape": "[2, 4, 8, 8]"}], "userDefinedMetadata": {}}]
        (res / f"{name}.mlmodelc" / "metadata.json").write_text(json.dumps(meta))
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(_source("sd1") / "tokenizer" / f, res / f)
    return tmp_path


def test_compiled_folder_off_macos_is_one_line_saying_what_to_do(tmp_path, capsys):
    from editsuite.cli.app import main

    folder = _compiled_folder(tmp_path)
    assert main(["txt2img", "-p", "x", "-m", str(folder), "-o", str(tmp_path / "o.png"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run only on macOS" in err[0] and "packages/" in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_compiled_folder_is_described_from_its_metadata(tmp_path):
    """On macOS a compiled folder runs in Core ML; what editsuite reads of it comes from metadata.json."""
    bundle = load_coreml_bundle(_compiled_folder(tmp_path), use_coreml=True, runtime=lambda path: None)
    assert bundle.backend.unet_parts == ["unet"] and bundle.backend.resolutions == [(64, 64)]
    assert bundle.manifest.cross_attention_dim == 32
    assert bundle.tokenizer("a red circle").input_ids[0] == 542  # the vocab.json beside the models


def test_cli_runs_an_apple_bundle_with_config(tmp_path):
    from editsuite.cli.app import main

    out = tmp_path / "bench.png"
    photo, mask = photo_and_mask()
    photo.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    args = ["inpaint", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"), "-p", "a bench", "--steps", "2",
            "-s", "1", "-m", str(FIX / "inpaint9" / "packages"), "--config", str(_source("inpaint9")), "-o", str(out),
            "-q"]
    assert main(args) == 0 and out.is_file()
    bad = main(["txt2img", "-p", "x", "-m", str(FIX / "sd1" / "packages"), "--prediction-type", "sample", "-q",
                "-o", str(tmp_path / "x.png")])
    assert bad == 2 and not (tmp_path / "x.png").exists()


def test_unconvertible_size_on_an_apple_bundle_names_its_size():
    bundle = load_bundle(FIX / "sd1" / "packages", config=_source("sd1"))
    with pytest.raises(UserError, match="converted for 64x64, not 128x128"):
        Txt2Img(bundle).run("x", steps=1, seed=0, width=128, height=128)
