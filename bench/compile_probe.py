"""Issue 20 probe (superseded by bench/aoti_probe.py, which measures in turn: no gain): would a compiled UNet
make the fast default faster? SD 1.5's architecture, random weights (bench/speed.py makes it), bf16, 512x512,
batch 2, one process per mode:

    python bench/compile_probe.py eager        # editsuite's default UNet (packed convolutions)
    python bench/compile_probe.py compile      # torch.compile (inductor, freezing); the cache makes a rerun cheaper
    python bench/compile_probe.py aoti-build   # torch.export + AOTInductor package, built once (/tmp/editsuite-unet.pt2)
    python bench/compile_probe.py aoti-run     # that package loaded in a fresh process

Each prints its first call (what a fresh process pays) and four more steps with their median. A probe, not
the product: the numbers decide whether compiling is worth building into the default.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "build" / "bench-coreml" / "sd15-random"
PACKAGE = "/tmp/editsuite-unet.pt2"


def timed(label: str, fn) -> None:
    t0 = time.time()
    fn()
    print(label, "first call", round(time.time() - t0, 1), flush=True)
    times = []
    for _ in range(4):
        t0 = time.time()
        fn()
        times.append(time.time() - t0)
    print(label, "steps", [round(v, 2) for v in times], "median", round(statistics.median(times), 2), flush=True)


def main() -> None:
    mode = sys.argv[1]
    x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 768, dtype=torch.bfloat16)
    t = torch.tensor([500.0, 500.0])
    if mode == "aoti-run":
        t0 = time.time()
        runner = torch._inductor.aoti_load_package(PACKAGE)
        print("load", round(time.time() - t0, 1), flush=True)
        return timed(mode, lambda: runner(x, t, ctx))
    import editsuite.bundle.speed as speed

    if mode != "eager":
        speed.pack_convolutions = lambda m: 0  # inductor packs the weights itself
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import _model_folder

    from editsuite import load_bundle

    backend = load_bundle(_model_folder("sd15")).backend
    if mode == "eager":
        return timed(mode, lambda: backend.unet(x.float(), t, ctx.float()))
    import torch._inductor.config as inductor

    inductor.freezing = True
    if mode == "compile":
        backend.unet_model = torch.compile(backend.unet_model)
        return timed(mode, lambda: backend.unet(x.float(), t, ctx.float()))
    from aoti_probe import Plain

    t0 = time.time()
    with torch.no_grad():
        exported = torch.export.export(Plain(backend.unet_model).eval(), (x, t, ctx))
    torch._inductor.aoti_compile_and_package(exported, package_path=PACKAGE)
    print("export and AOTInductor compile", round(time.time() - t0, 1), flush=True)


if __name__ == "__main__":
    main()
