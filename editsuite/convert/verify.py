"""`editsuite verify BUNDLE [--against MODEL]`: each Core ML model against its PyTorch module, on any OS.

Every model of the bundle (editsuite's or Apple's) runs in the reference executor with fp16 where the
program computes in fp16 (as on device), fed through the Core ML backend exactly as the tasks feed it, at
each resolution of the bundle, on the same inputs as the original diffusers/transformers module at fp32;
the PSNR (peak: the largest magnitude of the reference output) is reported per module, the worst over
resolutions and outputs. A chunked UNet is verified chained: chunk 1 then chunk 2, against the whole UNet.
SDXL's text encoders are checked on what its UNet reads (the penultimate layer, the pooled embeddings), its
UNet with the pooled text embedding and size conditioning beside the context.
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
    from editsuite.bundle.coreml_backend import ReferenceModel, load_coreml_bundle
    from editsuite.bundle.coreml_layout import MANIFEST, SWIFT_NAMES, is_coreml_folder, read_manifest
    from editsuite.bundle.loader import load_bundle
    from editsuite.convert.coreml import example_time_ids

    out = Path(out)
    if not is_coreml_folder(out):
        raise UserError(f"{out} is not a Core ML bundle (no {MANIFEST}, no Apple-named packages); make one with "
                        "`editsuite convert`")
    data = read_manifest(out)
    source = against or (data or {}).get("model", {}).get("source")
    if not source:
        raise UserError(f"{out} was not converted by editsuite; pass --against with the diffusers folder it was "
                        "converted from")
    programs: dict[str, ReferenceModel] = {}

    def runtime(path: Path) -> ReferenceModel:
        model = programs[path.name] = ReferenceModel(path, fp16=fp16)
        return model

    coreml = load_coreml_bundle(out, config=source if data is None else None, runtime=runtime)
    ref = load_bundle(source, backend="torch", device="cpu", dtype="float32")
    b, m, cb = ref.backend, ref.manifest, coreml.backend
    g = torch.Generator().manual_seed(0)
    prompts = ["", "a red circle on a blue background"]
    tokenize = lambda tokenizer: None if tokenizer is None else tokenizer(  # noqa: E731
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids, ids_2 = tokenize(ref.tokenizer), tokenize(ref.tokenizer_2)
    added = None
    with torch.no_grad():
        if m.xl:
            context, pooled = b.encode_text_xl(ids, ids_2)
            added = {"text_embeds": pooled, "time_ids": torch.tensor([example_time_ids(m)] * 2)}
        else:
            context = b.text_encoder(ids, return_dict=False)[0].float()
    checks: list[Check] = []

    def check(components: list[str], pairs) -> None:
        """pairs: (label, expected tensors, Core ML backend call giving the same tensors)."""
        worst, labels = math.inf, []
        for label, expected, run in pairs:
            got = run()
            for e, o in zip(expected, got):
                worst = min(worst, psnr(e, o))
            labels.append(label)
        ops: dict[str, int] = {}
        for c in components:
            for k, v in programs[cb.models[c].path.name].program.op_histogram().items():
                ops[k] = ops.get(k, 0) + v
        checks.append(Check("+".join(SWIFT_NAMES[c] for c in components), worst, labels, ops))

    for component, encoder, tokens in (("text_encoder", b.text_encoder, ids), ("text_encoder_2", b.text_encoder_2, ids_2)):
        if component not in cb.models:
            continue
        te = cb.models[component]
        name = next(iter(te.desc.inputs))
        with torch.no_grad():
            out = encoder(tokens[1:], output_hidden_states=True)
        # in the order of the package's outputs: hidden states (SDXL: the penultimate layer), then pooled
        expected = [out.hidden_states[-2] if m.xl else out.last_hidden_state,
                    out.text_embeds if component == "text_encoder_2" else out.pooler_output]

        def run_te(te=te, name=name, tokens=tokens):
            got = te.run(**{name: tokens[1:].numpy()})
            return [torch.from_numpy(got[k]).float() for k in te.desc.outputs if k in ("last_hidden_state",
                                                                                     "hidden_embeds",
                                                                                     "pooled_outputs")]
        check([component], [("77 tokens", expected, run_te)])
    sizes = cb.resolutions
    f = m.vae_scale_factor
    if "vae_encoder" in cb.models:
        pairs = []
        for w, h in sizes:  # a smooth random picture: what a photo looks like to a VAE, more than white noise
            img = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g) * 2 - 1,
                                                  size=(h, w), mode="bilinear", align_corners=False)
            with torch.no_grad():
                pairs.append((f"{w}x{h}", [b.vae.encode(img).latent_dist.parameters], lambda x=img: [cb.vae_encode(x)]))
        check(["vae_encoder"], pairs)
    if "vae_decoder" in cb.models:
        pairs = []
        for w, h in sizes:
            z = torch.randn(1, m.latent_channels, h // f, w // f, generator=g) / m.scaling_factor
            with torch.no_grad():
                pairs.append((f"{w}x{h}", [b.vae.decode(z).sample], lambda z=z: [cb.vae_decode(z)]))
        check(["vae_decoder"], pairs)
    pairs = []
    for i, (w, h) in enumerate(sizes if cb.unet_parts else ()):
        sample = torch.randn(2, m.unet_in_channels, h // f, w // f, generator=g)
        t = torch.tensor([999.0, 999.0] if i == 0 else [500.0, 500.0])
        labels = torch.tensor([20, 20]) if m.kind.value == "x4-upscaler" else None
        extra = {} if added is None else {"added_cond_kwargs": added}
        with torch.no_grad():
            expected = b.unet_model(sample, t, context, class_labels=labels, **extra).sample
        pairs.append((f"{w}x{h}", [expected],
                      lambda s=sample, t=t, lb=labels: [cb.unet(s, t, context, lb, added=added)]))
    if cb.unet_parts:
        check(cb.unet_parts, pairs)
    return checks
