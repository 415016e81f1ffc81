"""Single-file (original LDM layout) checkpoint loading: detection, exact weights, refusals, shipped configs.

Tiny models only: components shaped like diffusers' own pipeline tests (get_dummy_components) are written
out in the original Stable Diffusion layout by `tests/ldm_layout.py` and loaded back.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm_layout import to_ldm_checkpoint  # noqa: E402

from editsuite.bundle import single_file  # noqa: E402
from editsuite.bundle.single_file import CONFIG_ROOT, detect_model_type, load_single_file  # noqa: E402
from editsuite.errors import UserError  # noqa: E402

FOLDERS = {"v1": "sd-v1", "v2": "sd-v2", "inpainting": "sd-v1-inpainting", "inpainting_v2": "sd-v2-inpainting"}
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in the CLIP vocabulary


# ------------------------------------------------------------------------------------------ tiny models


def tiny_components(*, v2: bool, in_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        # SD 2.x: linear proj_in/proj_out and per-block head dims; SD 1.x: 1x1-conv projections
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            pad_token_id=1,
            vocab_size=1000,
            hidden_act="gelu" if v2 else "quick_gelu",
        )
    )
    # random (not default-initialised) norms and biases, so a mix-up of any two weights shows
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return unet.eval(), vae.eval(), text_encoder.eval()


def save_config_folder(folder: Path, unet, vae, text_encoder) -> Path:
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text_encoder.config.save_pretrained(folder / "text_encoder")
    return folder


CASES = {  # model type -> (v2, in_channels)
    "v1": (False, 4),
    "inpainting": (False, 9),
    "v2": (True, 4),
    "inpainting_v2": (True, 9),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{model_type: (components, config folder, .safetensors path)} built once for the module."""
    built = {}
    for model_type, (v2, in_channels) in CASES.items():
        root = tmp_path_factory.mktemp(model_type)
        parts = tiny_components(v2=v2, in_channels=in_channels)
        folder = save_config_folder(root / "config", *parts)
        path = root / "model.safetensors"
        save_file(to_ldm_checkpoint(*parts, open_clip=v2), str(path))
        built[model_type] = (parts, folder, path)
    return built


def assert_same_weights(expected, actual):
    a, b = expected.state_dict(), actual.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("model_type", list(CASES))
def test_roundtrip_reproduces_every_weight(tiny, model_type):
    (unet, vae, text_encoder), folder, path = tiny[model_type]
    out = load_single_file(path, config=folder)
    assert out["model_type"] == model_type
    assert set(out) == {"tokenizer", "text_encoder", "unet", "vae", "scheduler", "model_type"}
    assert_same_weights(unet, out["unet"])
    assert_same_weights(vae, out["vae"])
    assert_same_weights(text_encoder, out["text_encoder"])
    for name in ("unet", "vae", "text_encoder"):
        params = list(out[name].parameters())
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        assert not out[name].training
    # buffers the checkpoint does not carry (CLIP position_ids) are real, so outputs match exactly
    ids = torch.tensor([[0, 17, 256, 999, 2, 1, 1]])
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, out["text_encoder"](ids).last_hidden_state)
    # tokenizer and scheduler fall back to the shipped ones for the detected type
    assert out["tokenizer"]("a photo of a cat").input_ids == CAT_IDS
    expected_pad = "!" if "v2" in model_type else "<|endoftext|>"
    assert out["tokenizer"].pad_token == expected_pad
    shipped = json.loads((CONFIG_ROOT / FOLDERS[model_type] / "scheduler" / "scheduler_config.json").read_text())
    assert type(out["scheduler"]).__name__ == shipped["_class_name"]
    assert out["scheduler"].config.prediction_type == shipped["prediction_type"]


def test_unet_forward_matches_after_roundtrip(tiny):
    (unet, _, _), folder, path = tiny["inpainting"]
    out = load_single_file(path, config=folder)
    torch.manual_seed(0)
    sample, context = torch.randn(1, 9, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        want = unet(sample, 10, encoder_hidden_states=context).sample
        got = out["unet"](sample, 10, encoder_hidden_states=context).sample
    assert torch.equal(want, got)


def test_detection_uses_keys_not_file_name(tiny, tmp_path):
    _, folder, path = tiny["v1"]
    misleading = tmp_path / "sd_xl_base_2.1-768-v-inpainting.safetensors"
    misleading.write_bytes(path.read_bytes())
    assert load_single_file(misleading, config=folder)["model_type"] == "v1"


def test_config_folder_tokenizer_and_scheduler_are_used_when_present(tiny, tmp_path):
    import shutil

    _, folder, path = tiny["v1"]
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    shutil.copytree(CONFIG_ROOT / "sd-v2" / "tokenizer", custom / "tokenizer")  # the "!"-padding one
    (custom / "scheduler").mkdir()
    (custom / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"})
    )
    out = load_single_file(path, config=custom)
    assert out["tokenizer"].pad_token == "!"
    assert type(out["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert out["scheduler"].config.prediction_type == "v_prediction"


def test_torch_dtype_is_applied(tiny, tmp_path):
    (unet, vae, text_encoder), folder, _ = tiny["v2"]
    # a half-precision file (the common case) loads into float32 and into bfloat16 when asked
    full = to_ldm_checkpoint(unet, vae, text_encoder, open_clip=True)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in full.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    out32 = load_single_file(path, config=folder)
    assert all(p.dtype == torch.float32 for p in out32["unet"].parameters())
    assert torch.equal(out32["vae"].encoder.conv_in.weight, vae.encoder.conv_in.weight.half().float())
    out16 = load_single_file(path, config=folder, torch_dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.dtype == torch.bfloat16 for p in out16[name].parameters())
    with pytest.raises(UserError, match="torch_dtype"):
        load_single_file(path, config=folder, torch_dtype=torch.int8)


def test_no_network_access(tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    _, folder, path = tiny["inpainting_v2"]
    assert load_single_file(path, config=folder)["model_type"] == "inpainting_v2"


# ----------------------------------------------------------------------------------------- pickle


def test_pickle_checkpoint_refused_without_flag(tiny, tmp_path):
    (unet, vae, text_encoder), _, _ = tiny["v1"]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm_checkpoint(unet, vae, text_encoder)}, str(path))
    for suffix in (".ckpt", ".bin", ".pt", ".pth"):
        other = path.with_suffix(suffix)
        other.write_bytes(path.read_bytes())
        with pytest.raises(UserError) as err:
            load_single_file(other)
        message = str(err.value)
        assert "--allow-pickle" in message and "arbitrary code" in message and ".safetensors" in message
        assert "\n" not in message


def test_pickle_checkpoint_loads_with_allow_pickle(tiny, tmp_path):
    (unet, vae, text_encoder), folder, _ = tiny["v1"]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm_checkpoint(unet, vae, text_encoder), "global_step": 470000, "epoch": 3}, str(path))
    out = load_single_file(path, allow_pickle=True, config=folder)
    assert out["model_type"] == "v1"
    assert_same_weights(unet, out["unet"])
    assert_same_weights(text_encoder, out["text_encoder"])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_even_with_allow_pickle(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, str(path))
    with pytest.raises(UserError, match="more than tensors"):
        load_single_file(path, allow_pickle=True)
    assert not marker.exists()


def test_corrupt_pickle_is_a_user_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="cannot be read"):
        load_single_file(path, allow_pickle=True)


# --------------------------------------------------------------------------------------- refusals


def test_random_tensors_are_not_a_stable_diffusion_checkpoint(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(8, 8), "layers.0.bias": torch.randn(8)}, str(path))
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint") as err:
        load_single_file(path)
    assert "Stable Diffusion 1.x, 2.x and XL" in str(err.value)


def test_truncated_safetensors_is_a_user_error(tiny, tmp_path):
    _, _, path = tiny["v1"]
    data = path.read_bytes()
    for i, cut in enumerate((len(data) // 2, 100, 4, 0)):
        bad = tmp_path / f"truncated{i}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="not a valid .safetensors file"):
            load_single_file(bad)


def test_unsupported_extension_missing_file_and_folder(tmp_path):
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="unsupported checkpoint file type '.onnx'"):
        load_single_file(other)
    with pytest.raises(UserError, match="not found"):
        load_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="folder"):
        load_single_file(tmp_path)


def _sdxl_like() -> dict:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1280),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }


def test_partial_and_unsupported_sdxl_files_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_sdxl_like(), str(path))  # SDXL keys, but neither text encoder whole
    with pytest.raises(UserError, match=r"SDXL text encoder weights .* but not conditioner.embedders.0"):
        load_single_file(path)
    other = _sdxl_like()  # 9 channels is SDXL inpainting (tests/test_sdxl.py); 7 is nothing editsuite runs
    other["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 7, 3, 3)
    with pytest.raises(UserError, match="SDXL UNet with 7 input channels"):
        detect_model_type(other)
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
               "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(49408, 1280)}
    with pytest.raises(UserError, match="Stable Diffusion XL refiner"):
        detect_model_type(refiner)


def test_other_families_and_partial_files_are_refused(tiny):
    (unet, vae, text_encoder), _, _ = tiny["v1"]
    full = to_ldm_checkpoint(unet, vae, text_encoder)
    assert detect_model_type(full) == "v1"

    pix2pix = dict(full)
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
    with pytest.raises(UserError, match="InstructPix2Pix"):
        detect_model_type(pix2pix)

    unet_only = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(UserError, match="no text encoder"):
        detect_model_type(unet_only)

    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(UserError, match="no VAE"):
        detect_model_type(no_vae)

    mixed = dict(full)
    mixed["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(1000, 64)
    with pytest.raises(UserError, match="cross-attention width"):
        detect_model_type(mixed)

    controlnet = dict(full)
    controlnet["control_model.time_embed.0.weight"] = torch.zeros(4, 4)
    with pytest.raises(UserError, match="ControlNet"):
        detect_model_type(controlnet)


def test_checkpoint_that_does_not_fit_the_config_is_a_user_error(tiny):
    _, folder_v1, _ = tiny["v1"]
    _, _, path_inpaint = tiny["inpainting"]
    with pytest.raises(UserError, match="UNet weights do not fit"):  # 9-channel file, 4-channel config
        load_single_file(path_inpaint, config=folder_v1)
    with pytest.raises(UserError, match="config folder not found"):
        load_single_file(path_inpaint, config=folder_v1 / "nope")
    with pytest.raises(UserError, match="not a diffusers config folder"):
        load_single_file(path_inpaint, config=folder_v1 / "unet")


def test_flat_clip_layout_variant_is_accepted(tiny, tmp_path):
    """Some SD 1.x files store the CLIP text transformer without the `text_model.` level."""
    (unet, vae, text_encoder), folder, _ = tiny["v1"]
    sd = to_ldm_checkpoint(unet, vae, text_encoder)
    prefix = "cond_stage_model.transformer.text_model."
    sd = {("cond_stage_model.transformer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    path = tmp_path / "flat.safetensors"
    save_file(sd, str(path))
    out = load_single_file(path, config=folder)
    assert_same_weights(text_encoder, out["text_encoder"])


# -------------------------------------------------------------------------------- shipped configs


def _load_configs(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(str(folder / "unet"), local_files_only=True)
    vae = AutoencoderKL.load_config(str(folder / "vae"), local_files_only=True)
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    return unet, vae, text, sched, index


@pytest.mark.parametrize(
    "folder, in_channels, context, prediction, sample_size, head_dim, linear",
    [
        ("sd-v1", 4, 768, "epsilon", 64, 8, False),
        ("sd-v1-inpainting", 9, 768, "epsilon", 64, 8, False),
        ("sd-v2", 4, 1024, "v_prediction", 96, [5, 10, 20, 20], True),
        ("sd-v2-inpainting", 9, 1024, "epsilon", 64, [5, 10, 20, 20], True),
    ],
)
def test_shipped_config_facts(folder, in_channels, context, prediction, sample_size, head_dim, linear):
    unet, vae, text, sched, index = _load_configs(CONFIG_ROOT / folder)
    assert unet["in_channels"] == in_channels and unet["out_channels"] == 4
    assert unet["cross_attention_dim"] == context
    assert unet["sample_size"] == sample_size
    assert unet["attention_head_dim"] == head_dim
    assert unet["use_linear_projection"] is linear
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert vae["scaling_factor"] == 0.18215 and vae["latent_channels"] == 4
    assert sched["prediction_type"] == prediction
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert text["hidden_size"] == context and text["max_position_embeddings"] == 77
    if context == 1024:  # OpenCLIP ViT-H, penultimate layer, as a CLIPTextModel
        assert (text["num_hidden_layers"], text["hidden_act"], text["intermediate_size"]) == (23, "gelu", 4096)
    else:  # OpenAI CLIP ViT-L/14
        assert (text["num_hidden_layers"], text["hidden_act"], text["intermediate_size"]) == (12, "quick_gelu", 3072)
    assert index["_class_name"] == ("StableDiffusionInpaintPipeline" if in_channels == 9 else "StableDiffusionPipeline")
    assert index["scheduler"] == ["diffusers", sched["_class_name"]]


# published parameter counts of the SD 1.5 / 2.1 components
PARAM_COUNTS = {
    "sd-v1": (859_520_964, 83_653_863, 123_060_480),
    "sd-v1-inpainting": (859_535_364, 83_653_863, 123_060_480),
    "sd-v2": (865_910_724, 83_653_863, 340_387_840),
    "sd-v2-inpainting": (865_925_124, 83_653_863, 340_387_840),
}


@pytest.mark.parametrize("folder", list(PARAM_COUNTS))
def test_shipped_configs_build_on_meta_and_take_a_full_size_original_layout(folder):
    """Full-size models on the meta device (no memory): parameter counts, and a full-size original-layout
    key set (built with meta tensors) converts onto exactly the models' keys and shapes, detected right."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = CONFIG_ROOT / folder
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text_encoder)) == PARAM_COUNTS[folder]

    v2 = folder.startswith("sd-v2")
    checkpoint = to_ldm_checkpoint(unet, vae, text_encoder, open_clip=v2)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = {v: k for k, v in FOLDERS.items()}[folder]
    assert infer_diffusers_model_type(checkpoint) == model_type  # diffusers agrees at real shapes
    assert detect_model_type(checkpoint) == model_type

    for model, converted in (
        (unet, single_file.unet_state_dict(checkpoint, unet.config)),
        (vae, single_file.vae_state_dict(checkpoint, vae.config)),
        (text_encoder, single_file.text_encoder_state_dict(checkpoint, text_encoder, model_type)),
    ):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert got == want


def test_shipped_tokenizers(tmp_path):
    from transformers import CLIPTokenizer

    digests = set()
    for folder in FOLDERS.values():
        tok_dir = CONFIG_ROOT / folder / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
        assert tokenizer.pad_token == ("!" if folder.startswith("sd-v2") else "<|endoftext|>")
        padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert len(padded) == 77 and padded[7] == (0 if folder.startswith("sd-v2") else 49407)
        digests.add(tuple(hashlib.sha256((tok_dir / f).read_bytes()).hexdigest() for f in ("vocab.json", "merges.txt")))
    assert len(digests) == 1  # one vocabulary for SD 1 and SD 2


def test_shipped_vocab_follows_the_clip_construction():
    """vocab = byte chars, the same + '</w>', every merge joined (in order), then the two specials."""
    from editsuite.configs.make_tokenizer import bytes_to_unicode

    tok_dir = CONFIG_ROOT / "sd-v1" / "tokenizer"
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 49152 - 256 - 2
    chars = list(bytes_to_unicode().values())
    expected = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in lines[1:]]
    expected += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    assert sorted(vocab.items(), key=lambda kv: kv[1]) == [(t, i) for i, t in enumerate(expected)]
