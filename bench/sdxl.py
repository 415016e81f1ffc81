"""SDXL on this CPU: a 1024x1024 txt2img with editsuite's default against diffusers, in the same run.

    python bench/sdxl.py [--size 1024] [--steps 3] [--rounds 2] [--configs editsuite,diffusers-bf16,diffusers-fp32]

The model is SDXL base's architecture (editsuite/configs/sdxl-base: UNet 2.57 B parameters, both text
encoders, the VAE) with seeded random weights, saved once as an fp16 diffusers folder under
build/bench-sdxl/ (nothing can be downloaded here; time and memory do not depend on the values).

Each configuration runs in a fresh process that loads the model and makes one picture: its peak memory is
the process's max RSS (loading included), its UNet step the median of the UNet calls after the first (each
call is the guided batch of 2), and its time the whole generation call. Configurations are interleaved
--rounds times; medians and min-max are printed, with ratios against diffusers with bf16 weights measured
in the same run (its best plain CPU setting) and diffusers fp32 beside it.
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
CONFIGS = ROOT / "editsuite" / "configs" / "sdxl-base"
MODEL = ROOT / "build" / "bench-sdxl" / "sdxl-random"
PROMPT = "a lighthouse on a cliff at dusk"
ALL = ("editsuite", "diffusers-bf16", "diffusers-fp32")


def make_model(folder: Path = MODEL) -> Path:
    """SDXL base's configs with seeded random weights, one module at a time (the UNet alone is 10 GB in
    float32), saved as an fp16 diffusers folder as SDXL is published."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder_2")),
    }
    for name, build in builders.items():
        module = build().to(torch.float16)
        module.save_pretrained(tmp / name, safe_serialization=True)
        del module
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(CONFIGS / name, tmp / name)
    shutil.copyfile(CONFIGS / "model_index.json", tmp / "model_index.json")
    tmp.rename(folder)
    return folder


def one(config: str, size: int, steps: int) -> dict:
    """Child process: load, make one picture, report times and peak memory."""
    import torch

    calls: list[float] = []
    threads: list[int] = []  # torch's threads in each UNet call (editsuite's governor sets them before it)

    def timed(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            calls.append(time.perf_counter() - t0)
            threads.append(torch.get_num_threads())
            return out
        return run

    t0 = time.perf_counter()
    if config.startswith("diffusers"):
        from diffusers import StableDiffusionXLPipeline

        dtype = torch.bfloat16 if config == "diffusers-bf16" else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=dtype, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.forward = timed(pipe.unet.forward)
        loaded = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=steps, width=size, height=size,
                     generator=torch.Generator().manual_seed(0)).images[0]
    else:
        from editsuite import Txt2Img, load_bundle

        bundle = load_bundle(MODEL)
        bundle.backend.unet = timed(bundle.backend.unet)
        task = Txt2Img(bundle)
        loaded = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = task.run(PROMPT, steps=steps, width=size, height=size, seed=0).images[0]
    seconds = time.perf_counter() - t0
    out = ROOT / "build" / "bench-sdxl" / f"{config}-{size}.png"
    image.save(out)
    return {"config": config, "txt2img": seconds, "load": loaded, "unet_step": statistics.median(calls[1:] or calls),
            "unet_first": calls[0], "unet_calls": [round(c, 1) for c in calls], "threads": threads, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.steps)), flush=True)
        return
    t0 = time.time()
    make_model()
    print(f"model: {MODEL} ({time.time() - t0:.0f} s to make or find)", flush=True)
    configs = args.configs.split(",")
    rows: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else configs[::-1]:  # interleaved, the order alternating
            cmd = [sys.executable, __file__, "--one", config, "--size", str(args.size), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{config} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows[config].append(row)
            print(f"round {r + 1} {json.dumps(row)}", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; SDXL base architecture, "
          f"random weights; {args.size}x{args.size}, {args.steps} steps; {args.rounds} rounds, medians [min-max]")

    def med(config, key):
        values = [row[key] for row in rows[config]]
        return statistics.median(values), min(values), max(values)

    print(f"{'config':16s} {'UNet step s':>20s} {'txt2img s':>22s} {'peak GiB':>18s}  step vs bf16  vs fp32")
    for c in configs:
        step, txt, peak = med(c, "unet_step"), med(c, "txt2img"), med(c, "peak_gib")
        ratios = [f"{med(ref, 'unet_step')[0] / step[0]:.2f}x" if ref in rows else "-"
                  for ref in ("diffusers-bf16", "diffusers-fp32")]
        print(f"{c:16s} {step[0]:7.1f} [{step[1]:.1f}-{step[2]:.1f}] {txt[0]:8.1f} [{txt[1]:.1f}-{txt[2]:.1f}] "
              f"{peak[0]:6.2f} [{peak[1]:.2f}-{peak[2]:.2f}]  {ratios[0]:>10s} {ratios[1]:>7s}")


if __name__ == "__main__":
    main()
