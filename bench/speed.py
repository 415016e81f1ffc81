"""Time editsuite against diffusers on the same machine, in the same run, on the same components.

    python bench/speed.py [--model sd15|demo] [--size 512] [--steps 20] [--repeat 3] [--dtype auto]

Measured side by side (each a median of --repeat runs after one warm-up):
- one UNet step with guidance (batch 2) at --size;
- VAE encode and VAE decode of one --size picture;
- a whole txt2img of --steps steps;
for diffusers' fp32 default, diffusers with bf16 weights, and editsuite with the given --dtype. Ratios are
against diffusers fp32 measured in this run. Peak memory (max RSS) is measured per configuration in a
child process. `sd15` is SD 1.5's architecture with random weights (nothing can be downloaded here;
timing does not need the weights); `demo` is the built-in demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model_folder(name: str) -> Path:
    if name == "demo":
        from editsuite.bundle.manifest import ModelKind
        from editsuite.demo import demo_model

        return demo_model(ModelKind.BASE)
    folder = ROOT / "build" / "bench-coreml" / "sd15-random"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from coreml_convert import make_model

        make_model(folder)
    return folder


def _median(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(config: str, folder: Path, size: int, steps: int, repeat: int, dtype: str) -> dict:
    """One configuration, in this process: {"unet_step", "vae_encode", "vae_decode", "txt2img", "peak_gib"}."""
    import torch

    torch.manual_seed(0)
    if config.startswith("diffusers"):
        from diffusers import StableDiffusionPipeline

        weights = torch.bfloat16 if config == "diffusers-bf16" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=weights, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        unet, vae, dt = pipe.unet, pipe.vae, weights
        vae_config = vae.config
        run = lambda: pipe("a red circle on a blue background", num_inference_steps=steps, height=size,  # noqa: E731
                           width=size, generator=torch.Generator().manual_seed(0))
        unet_call = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        encode = lambda img: vae.encode(img).latent_dist.mean  # noqa: E731
        decode = lambda z: vae.decode(z).sample  # noqa: E731
    else:
        from editsuite import Txt2Img, load_bundle

        bundle = load_bundle(folder, device="cpu", dtype=dtype)
        b, dt = bundle.backend, bundle.dtype
        task = Txt2Img(bundle)
        run = lambda: task.run("a red circle on a blue background", steps=steps, width=size, height=size,  # noqa: E731
                               seed=0)
        unet_call = b.unet
        encode = b.vae_encode
        decode = b.vae_decode
        unet = b.unet_model
        vae_config = b.vae.config
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    x = torch.randn(2, 4, latent, latent, dtype=dt)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dt)
    img = torch.rand(1, 3, size, size, dtype=dt) * 2 - 1
    z = torch.randn(1, 4, latent, latent, dtype=dt)
    with torch.inference_mode():
        out = {
            "unet_step": _median(lambda: unet_call(x, torch.tensor(500), ctx), repeat),
            "vae_encode": _median(lambda: encode(img), repeat),
            "vae_decode": _median(lambda: decode(z), repeat),
        }
    out["txt2img"] = _median(run, 1)
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd15", "demo"), default="sd15")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512 for sd15, 64 for demo)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="editsuite's --dtype")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size or (512 if args.model == "sd15" else 64)
    folder = _model_folder(args.model)
    if args.one:
        print(json.dumps(measure(args.one, folder, size, args.steps, args.repeat, args.dtype)))
        return
    rows = {}
    for config in ("diffusers-fp32", "diffusers-bf16", f"editsuite-{args.dtype}"):
        cmd = [sys.executable, __file__, "--one", config, "--model", args.model, "--size", str(size),
               "--steps", str(args.steps), "--repeat", str(args.repeat), "--dtype", args.dtype]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{config} failed")
        rows[config] = json.loads(done.stdout.strip().splitlines()[-1])
        print(config, rows[config], flush=True)
    ref = rows["diffusers-fp32"]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default; "
          f"model {args.model}, {size}x{size}, {args.steps} steps")
    print(f"{'config':22s} {'UNet step':>10s} {'VAE enc':>9s} {'VAE dec':>9s} {'txt2img':>9s} {'peak GiB':>9s}  "
          f"speed-up vs diffusers fp32 (step / dec / txt2img), memory ratio")
    for name, r in rows.items():
        print(f"{name:22s} {r['unet_step']:>10.3f} {r['vae_encode']:>9.3f} {r['vae_decode']:>9.3f} {r['txt2img']:>9.2f} "
              f"{r['peak_gib']:>9.2f}  {ref['unet_step'] / r['unet_step']:.2f}x / {ref['vae_decode'] / r['vae_decode']:.2f}x"
              f" / {ref['txt2img'] / r['txt2img']:.2f}x, {r['peak_gib'] / ref['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
