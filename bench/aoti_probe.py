"""Issue 20, second probe of a compiled UNet: AOTInductor packages against editsuite's eager default, each
in a fresh process, SD 1.5 architecture (bench/speed.py's random-weight folder), bf16, 512x512, batch 2.

    python bench/aoti_probe.py build plain    # torch.export + AOTInductor, weights left out of the package
    python bench/aoti_probe.py run plain      # that package fed the loaded UNet's own weights (user-managed)
    python bench/aoti_probe.py build frozen   # inductor's freezing: weights folded and packed into the package
    python bench/aoti_probe.py run frozen     # that package alone
    python bench/aoti_probe.py run eager      # editsuite's default UNet as it was at 3d64f3f (packed convs)

Each run prints its first call, four more calls and their median, and the process's peak RSS. The first
probe (bench/compile_probe.py) compared AOTInductor with an eager run from a slower spell of the machine;
this one interleaves them. Log: logs/aoti-probe.log (the eager rows are from before channels-last).
"""

import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def peak() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def timed(label: str, fn) -> None:
    t0 = time.time()
    fn()
    first = time.time() - t0
    times = []
    for _ in range(4):
        t0 = time.time()
        fn()
        times.append(time.time() - t0)
    print(label, "first", round(first, 2), "steps", [round(v, 2) for v in times], "median",
          round(statistics.median(times), 2), "peakGiB", peak(), "threads", torch.get_num_threads(), flush=True)


class Plain(torch.nn.Module):
    """The UNet with plain tensor inputs and output, as torch.export wants it (bench/compile_probe.py too)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def main() -> None:
    mode, variant = sys.argv[1], sys.argv[2]
    package = f"/tmp/aoti/unet-{variant}.pt2"
    x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 768, dtype=torch.bfloat16)
    t = torch.tensor([500.0, 500.0])
    import editsuite.bundle.speed as speed

    if variant != "eager":  # export needs plain modules; inductor lays out the weights itself
        speed.pack_convolutions = speed.pack_linears = lambda m: 0
    if mode == "run" and variant == "frozen":
        t0 = time.time()
        runner = torch._inductor.aoti_load_package(package)
        print("load", round(time.time() - t0, 1), peak(), flush=True)
        with torch.inference_mode():
            timed("frozen", lambda: runner(x, t, ctx))
        return
    from speed import _model_folder

    from editsuite import load_bundle

    backend = load_bundle(_model_folder("sd15")).backend
    print("loaded", peak(), flush=True)
    unet = backend.unet_model

    if mode == "run" and variant == "eager":
        with torch.inference_mode():
            timed("eager", lambda: backend.unet(x.float(), t, ctx.float()))
    elif mode == "run":
        t0 = time.time()
        runner = torch._inductor.aoti_load_package(package)
        module = Plain(unet)
        weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        names = runner.get_constant_fqns()
        runner.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
        print("load", round(time.time() - t0, 1), peak(), flush=True)
        with torch.inference_mode():
            timed("plain", lambda: runner(x, t, ctx))
    else:
        import torch._inductor.config as inductor

        configs = {}
        if variant == "frozen":
            inductor.freezing = True
        else:
            configs = {"aot_inductor.package_constants_in_so": False}
        Path(package).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with torch.no_grad():
            exported = torch.export.export(Plain(unet).eval(), (x, t, ctx))
        torch._inductor.aoti_compile_and_package(exported, package_path=package, inductor_configs=configs)
        print("build", variant, round(time.time() - t0, 1), "peak", peak(), flush=True)


if __name__ == "__main__":
    main()
