"""Loading: identity from configs, every source kind, and clear errors."""

import pytest
from tiny import save_tiny

import editsuite
from editsuite import ModelKind, UserError, load_bundle


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {k: save_tiny(root / k, kind=k) for k in ("base", "inpainting", "upscaler")}


@pytest.mark.parametrize("kind,expect,channels,factor", [
    ("base", ModelKind.BASE, 4, 8), ("inpainting", ModelKind.INPAINTING, 9, 8), ("upscaler", ModelKind.UPSCALER, 7, 4)])
def test_manifest_from_configs(folders, kind, expect, channels, factor):
    b = load_bundle(folders[kind], device="cpu")
    m = b.manifest
    assert (m.kind, m.unet_in_channels, m.vae_scale_factor) == (expect, channels, factor)
    assert b.identity()["model_hash"] and len(b.identity()["model_hash"]) == 10
    if kind == "upscaler":
        assert m.max_noise_level == 350 and m.prediction_type == "v_prediction" and b.low_res_scheduler is not None


def test_identity_does_not_come_from_the_name(folders, tmp_path):
    import shutil

    renamed = tmp_path / "sd-x4-upscaler-inpainting"
    shutil.copytree(folders["base"], renamed)
    assert load_bundle(renamed, device="cpu").kind is ModelKind.BASE


def test_v_prediction_model(tmp_path):
    b = load_bundle(save_tiny(tmp_path / "v", prediction_type="v_prediction"), device="cpu")
    assert b.manifest.prediction_type == "v_prediction"


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "unknown device"), (dict(dtype="int8"), "unknown dtype"),
    (dict(backend="onnx"), "unknown backend"), (dict(backend="coreml"), "is not a Core ML bundle"),
    (dict(prediction_type="sample"), "unknown prediction type")])
def test_bad_options(folders, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_bundle(folders["base"], **kwargs)


def test_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="cannot load the model from someone/not-cached"):
        load_bundle("someone/not-cached", device="cpu")


def test_missing_path():
    with pytest.raises(UserError, match="not found"):
        load_bundle("./no/such/model.safetensors")


def test_folder_without_components(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["x", "y"]}')
    with pytest.raises(UserError, match="model_index.json has no vae"):
        load_bundle(tmp_path)


def test_task_refuses_wrong_kind(folders):
    b = load_bundle(folders["inpainting"], device="cpu")
    with pytest.raises(UserError, match="txt2img needs a base model"):
        editsuite.Txt2Img(b)


def test_diffusers_folder_with_pickle_weights_needs_allow_pickle(tmp_path):
    """A UNet saved as diffusion_pytorch_model.bin is a pickle: refused as a .ckpt is, loaded with allow_pickle."""
    from tiny import tiny_components
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "pickled"
    StableDiffusionPipeline(**tiny_components("base"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UserError, match="is a pickle.*--allow-pickle"):
        load_bundle(folder, device="cpu")
    assert load_bundle(folder, device="cpu", allow_pickle=True).kind is ModelKind.BASE


def test_compute_units_on_a_pytorch_model_says_it_does_not_apply(folders, tmp_path, capsys):
    from editsuite.cli.app import main

    out = tmp_path / "o.png"
    assert main(["txt2img", "-p", "x", "-m", str(folders["base"]), "--compute-units", "cpu-and-ne", "-o", str(out),
                 "--steps", "1", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compute-units applies to Core ML bundles only" in err[0], err
    assert not out.exists()
