"""Time editsuite against diffusers on the same machine, in the same run, on the same model files.

    python bench/speed.py [--model sd15|demo] [--size 512] [--steps 20] [--repeat 3] [--dtype auto]
                          [--load 0 1] [--rounds 3]

Three configurations: diffusers' fp32 default (StableDiffusionPipeline as loaded, SDPA attention),
diffusers with bf16 weights (its best plain setting on a CPU with bf16), and editsuite with --dtype (auto:
its fast default). For each, in child processes of its own:
- `micro`: one UNet step with guidance (batch 2), one VAE encode and one VAE decode of a --size picture,
  each the median of --repeat runs after a warm-up;
- `txt2img`: a fresh process that loads the model and makes one --size picture in --steps steps (the
  model's own scheduler, seed 0); its time is the generation call, its peak memory the process's max RSS
  (loading included).
--load N runs everything again with N background processes keeping cores busy (a user's machine is rarely
idle); --rounds R interleaves the configs R times and reports medians with min-max. Ratios are against
diffusers with bf16 weights (its best plain CPU setting, the fair comparison) and diffusers fp32, measured
in the same condition of this run. The pictures are saved under build/speed/ and
compared: PSNR of each against diffusers fp32 (editsuite fp32 equals diffusers fp32 exactly, see
tests/test_parity.py, so this is what the precision costs). `sd15` is SD 1.5's architecture with random
weights (nothing can be downloaded here; timing does not need the weights), `demo` the built-in demo model.
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
OUT = ROOT / "build" / "speed"
PROMPT = "a red circle on a blue background"
CONFIGS = ("diffusers-fp32", "diffusers-bf16", "editsuite")
GPU_CONFIGS = ("diffusers-fp32", "diffusers-fp16", "editsuite")  # --device cuda: fp16 is diffusers' GPU habit
DEVICE = "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


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
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load(config: str, folder: Path, dtype: str):
    """(generate(), unet(x, t, ctx), encode(img), decode(z), dtype, unet config, latent factor)."""
    import torch

    if config.startswith("diffusers"):
        from diffusers import StableDiffusionPipeline

        weights = {"diffusers-bf16": torch.bfloat16, "diffusers-fp16": torch.float16}.get(config, torch.float32)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=weights, safety_checker=None,
                                                       requires_safety_checker=False).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)

        def generate(size, steps):
            return pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
                        generator=torch.Generator().manual_seed(0)).images[0]

        unet, vae = pipe.unet, pipe.vae
        return (generate, lambda x, t, c, **kw: unet(x, t, encoder_hidden_states=c).sample,
                lambda img: vae.encode(img).latent_dist.mean, lambda z: vae.decode(z).sample,
                weights, unet.config, pipe.vae_scale_factor, None)
    from editsuite import Txt2Img, load_bundle

    bundle = load_bundle(folder, device=DEVICE, dtype=dtype)
    task = Txt2Img(bundle)
    b = bundle.backend

    def generate(size, steps):
        return task.run(PROMPT, steps=steps, width=size, height=size, seed=0).images[0]

    return (generate, b.unet, b.vae_encode, b.vae_decode, b.dtype, b.unet_model.config,
            bundle.manifest.vae_scale_factor, b)


def micro(config: str, folder: Path, size: int, repeat: int, dtype: str) -> dict:
    import torch

    _, unet, encode, decode, dt, unet_config, factor, backend = _load(config, folder, dtype)
    torch.manual_seed(0)
    latent = size // factor
    x = torch.randn(2, 4, latent, latent, dtype=dt, device=DEVICE)
    ctx = torch.randn(2, 77, unet_config.cross_attention_dim, dtype=dt, device=DEVICE)
    img = torch.rand(1, 3, size, size, dtype=dt, device=DEVICE) * 2 - 1
    z = torch.randn(1, 4, latent, latent, dtype=dt, device=DEVICE)
    t = torch.tensor(500)
    with torch.inference_mode():
        out = {
            "unet_step": _median(lambda: unet(x, t, ctx), repeat),
            "vae_encode": _median(lambda: encode(img), repeat),
            "vae_decode": _median(lambda: decode(z), repeat),
        }
        if backend is not None:  # a --cache-interval step between full ones: the UNet's outer level only
            cache = backend.feature_cache()
            unet(x, t, ctx, cache=cache)
            cache.reuse = True
            out["unet_outer_level"] = _median(lambda: unet(x, t, ctx, cache=cache), repeat)
    return out


def txt2img(config: str, folder: Path, size: int, steps: int, dtype: str, model: str) -> dict:
    t0 = time.perf_counter()
    generate = _load(config, folder, dtype)[0]
    loaded = time.perf_counter() - t0
    generate(size, 2) if DEVICE == "cuda" else None  # GPU: one short warm-up run (kernels, allocator)
    _sync()
    t0 = time.perf_counter()
    image = generate(size, steps)
    _sync()
    seconds = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{model}-{config}.png"
    image.save(path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if DEVICE == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30  # on a GPU, the GPU's memory is the one that counts
    return {"txt2img": seconds, "load": loaded, "peak_gib": peak, "image": str(path)}


def big_vae(folder: Path, size: int, dtype: str) -> dict:
    """editsuite's VAE decode and encode of one size x size picture (tiled above 1 megapixel), in a fresh
    process: seconds and the process's peak memory."""
    import torch

    from editsuite import load_bundle

    backend = load_bundle(folder, device=DEVICE, dtype=dtype).backend
    f = 2 ** (len(backend.vae.config.block_out_channels) - 1)
    z = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    pixels = backend.vae_decode(z)
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.vae_encode(pixels.clamp(-1, 1))
    return {"size": size, "decode": decode, "encode": time.perf_counter() - t0,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _child(*args: str) -> dict:
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(args)} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def psnr(a: str, b: str) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd15", "demo"), default="sd15")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512 for sd15, 64 for demo)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="editsuite's --dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda compares fp16 (peak = GPU memory)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--load", type=int, nargs="+", default=[0], help="busy background processes, one condition "
                    "each (e.g. --load 0 1: idle, then one core kept busy)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every config per condition")
    ap.add_argument("--big-vae", type=int, metavar="SIZE", help="only: editsuite's VAE decode and encode of a "
                    "SIZE x SIZE picture (tiled), time and peak memory")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--what", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    configs = args.configs or ",".join(GPU_CONFIGS if DEVICE == "cuda" else CONFIGS)
    size = args.size or (512 if args.model == "sd15" else 64)
    folder = _model_folder(args.model)
    if args.big_vae:
        print(json.dumps(big_vae(folder, args.big_vae, args.dtype)))
        return
    if args.one:
        out = (micro(args.one, folder, size, args.repeat, args.dtype) if args.what == "micro"
               else txt2img(args.one, folder, size, args.steps, args.dtype, args.model))
        print(json.dumps(out))
        return
    for load in args.load:
        rows = _condition(configs.split(","), args, size, load)
        _report(rows, args, size, load)


def _spin(stop) -> None:
    """A background process keeping one core busy, as a browser, an editor or a second job does."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _condition(configs: list[str], args, size: int, load: int) -> dict[str, dict[str, list]]:
    """Every config, `--rounds` times interleaved (micro and txt2img in fresh child processes), with `load`
    busy processes running throughout; each result's raw JSON is printed as it comes."""
    import multiprocessing as mp

    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    rows: dict[str, dict[str, list]] = {c: {} for c in configs}
    try:
        for r in range(args.rounds):
            for config in configs:
                common = ["--one", config, "--model", args.model, "--size", str(size), "--steps", str(args.steps),
                          "--repeat", str(args.repeat), "--dtype", args.dtype, "--device", DEVICE]
                got = {**_child(*common, "--what", "micro"), **_child(*common, "--what", "txt2img")}
                print(f"load {load} round {r + 1} {config}", json.dumps(got), flush=True)
                for key, value in got.items():
                    rows[config].setdefault(key, []).append(value)
    finally:
        stop.set()
        for p in spinners:
            p.join()
    return rows


def _report(rows: dict[str, dict[str, list]], args, size: int, load: int) -> None:
    """Medians (min-max over the rounds), and ratios against diffusers bf16 (the fair comparison) and fp32."""
    med = {c: {k: statistics.median(v) if isinstance(v[0], (int, float)) else v[-1] for k, v in r.items()}
           for c, r in rows.items()}
    outer = med.get("editsuite", {}).get("unet_outer_level")
    if outer:
        print(f"editsuite --cache-interval: a step between full ones (outer level only) {outer:.3g} s")
    where = "GPU " + _gpu_name() if DEVICE == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{where}, torch default threads, {load} busy background process(es); model {args.model}, "
          f"{size}x{size}, txt2img {args.steps} steps; editsuite --dtype {args.dtype}; medians of {args.rounds} "
          "interleaved round(s) (min-max)")
    span = lambda c, k: f"{med[c][k]:.3g} ({min(rows[c][k]):.3g}-{max(rows[c][k]):.3g})"  # noqa: E731
    print("| config | UNet step s | VAE decode s | txt2img s | peak GiB | step / decode / txt2img x bf16 | "
          "x fp32 | memory x fp32 | PSNR vs fp32 dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in med:
        cells = []
        for ref_name in ("diffusers-bf16", "diffusers-fp32"):
            ref = med.get(ref_name)
            cells.append("" if ref is None else " / ".join(
                f"{ref[k] / med[name][k]:.2f}" for k in ("unet_step", "vae_decode", "txt2img")))
        ref = med.get("diffusers-fp32")
        memory = "" if ref is None else f"{med[name]['peak_gib'] / ref['peak_gib']:.2f}"
        quality = "" if ref is None else f"{psnr(ref['image'], med[name]['image']):.1f}"
        print(f"| {name} | {span(name, 'unet_step')} | {span(name, 'vae_decode')} | {span(name, 'txt2img')} | "
              f"{med[name]['peak_gib']:.2f} | {cells[0]} | {cells[1]} | {memory} | {quality} |", flush=True)

if __name__ == "__main__":
    main()
