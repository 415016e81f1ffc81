"""`editsuite verify OUT [--against MODEL]`: each converted package against its PyTorch module, on any OS.

Every package runs in the reference executor with fp16 intermediates (as on device) at each converted
resolution, on the same inputs as the PyTorch module at fp32; the PSNR (peak: the largest magnitude of
the reference output) is reported per module, the worst over resolutions. A chunked UNet is verified
chained: chunk 1 then chunk 2, against the whole PyTorch UNet.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from editsuite.errors import UserError

THRESHOLD_DB = 35.0


@dataclasses.dataclass
class Check:
    module: str
    psnr_db: float
    resolutions: list[str]
    ops: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.psnr_db >= THRESHOLD_DB


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    mse = torch.mean((ref - out) ** 2).item()
    peak = ref.abs().max().item()
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def verify(out: str | Path, against: str | None = None, *, fp16: bool = True) -> list[Check]:
    from editsuite.bundle.loader import load_bundle
    from editsuite.bundle.mil_executor import Program
    from editsuite.convert.coreml import MANIFEST, read_manifest
    from editsuite.convert.modules import TextEncoder

    out = Path(out)
    data = read_manifest(out)
    if data is None:
        raise UserError(f"{out} is not a converted Core ML bundle (no {MANIFEST}); make one with `editsuite convert`")
    source = against or data["model"]["source"]
    ref = load_bundle(source, backend="torch", device="cpu", dtype="float32")
    b, m = ref.backend, ref.manifest
    settings = data["settings"]
    sizes = [tuple(r) for r in settings["resolutions"]]
    packages = data["packages"]
    g = torch.Generator().manual_seed(0)
    checks: list[Check] = []

    ids = ref.tokenizer(["", "a red circle on a blue background"], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids.to(torch.int32)
    with torch.no_grad():
        context = TextEncoder(b.text_encoder)(ids)

    # the references are the original diffusers/transformers modules, not the rewritten ones that were traced
    def unet_ref(sample, timestep, ctx, labels=None):
        return b.unet_model(sample, timestep, ctx, class_labels=None if labels is None else labels.long()).sample

    def run(name, module, inputs_by_res, pick=lambda o: o):
        program = Program(out / f"{name}.mlpackage", fp16=fp16)
        worst, labels = math.inf, []
        for label, inputs in inputs_by_res:
            with torch.no_grad():
                expected = pick(module(*inputs.values()))
            got = program(**inputs)[program.output_names[0]]
            worst = min(worst, psnr(expected, got))
            labels.append(label)
        return Check(name, worst, labels, program.op_histogram())

    if "TextEncoder" in packages:
        checks.append(run("TextEncoder", TextEncoder(b.text_encoder), [("77 tokens", {"input_ids": ids[1:]})]))
    f = m.vae_scale_factor
    if "VAEEncoder" in packages:
        cases = []
        for w, h in sizes:  # a smooth random picture: what a photo looks like to a VAE, more than white noise
            img = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g) * 2 - 1,
                                                  size=(h, w), mode="bilinear", align_corners=False)
            cases.append((f"{w}x{h}", {"image": img}))
        checks.append(run("VAEEncoder", lambda x: b.vae.encode(x).latent_dist.parameters, cases))
    if "VAEDecoder" in packages:
        cases = [(f"{w}x{h}", {"z": torch.randn(1, m.latent_channels, h // f, w // f, generator=g) / m.scaling_factor})
                 for w, h in sizes]
        checks.append(run("VAEDecoder", lambda z: b.vae.decode(z).sample, cases))

    unet_cases = []
    for w, h in sizes:
        inputs = {"sample": torch.randn(2, m.unet_in_channels, h // f, w // f, generator=g),
                  "timestep": torch.tensor([999.0, 999.0]) if not unet_cases else torch.tensor([500.0, 500.0]),
                  "encoder_hidden_states": context}
        if m.kind.value == "x4-upscaler":
            inputs["class_labels"] = torch.tensor([20, 20], dtype=torch.int32)
        unet_cases.append((f"{w}x{h}", inputs))
    if "Unet" in packages:
        checks.append(run("Unet", unet_ref, unet_cases))
    elif "UnetChunk1" in packages and "UnetChunk2" in packages:
        first, second = Program(out / "UnetChunk1.mlpackage", fp16=fp16), Program(out / "UnetChunk2.mlpackage", fp16=fp16)
        worst, labels = math.inf, []
        for label, inputs in unet_cases:
            with torch.no_grad():
                expected = unet_ref(*inputs.values())
            mid = first(**inputs)
            feed = {k: mid[k] for k in second.input_names if k in mid}
            feed["encoder_hidden_states"] = inputs["encoder_hidden_states"]
            got = second(**feed)["noise_pred"]
            worst = min(worst, psnr(expected, got))
            labels.append(label)
        ops = first.op_histogram()
        for k, v in second.op_histogram().items():
            ops[k] = ops.get(k, 0) + v
        checks.append(Check("UnetChunk1+UnetChunk2", worst, labels, ops))
    return checks
