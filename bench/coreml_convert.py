"""Benchmark `editsuite convert` on an SD 1.5-architecture model with random weights (none can be downloaded
here; conversion cost does not depend on the values).

    python bench/coreml_convert.py [--work build/bench-coreml] [--bits 16 8 6] [--resolution 512x512]
    python bench/coreml_convert.py --family sdxl --modules unet --bits 16 --resolution 1024x1024

`--family sdxl` converts SDXL base's architecture with random weights (bench/sdxl.py makes it) instead.

Each module is converted in its own process, so its wall time and peak memory (max RSS) are its own. For
each module and bit width the script prints wall time, peak memory, the number of non-constant ops in the
program and the package size, and the size as a ratio of the fp16 package converted in the same run.
Results go to WORK/results.json; copy the table into bench/RESULTS.md by hand with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "editsuite" / "configs" / "sd-v1"
MODULES = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def make_model(folder: Path) -> None:
    """SD 1.5's configs with seeded random weights, saved as an fp16 diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder"))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(CONFIGS / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def one(args) -> None:
    """Child process: convert one module at one bit width, print a JSON line."""
    from editsuite.bundle.coreml_layout import SWIFT_NAMES, find_models
    from editsuite.bundle.mil_executor import load_program
    from editsuite.convert.coreml import convert, parse_resolution

    args.bits = args.bits[0]
    t0 = time.time()
    out = convert(args.model, args.out, resolutions=[parse_resolution(r) for r in args.resolution],
                  quantize_bits=None if args.bits == 16 else args.bits, components=[args.one],
                  attention=args.attention)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    manifest = json.loads((out / "coreml-manifest.json").read_text())
    paths = find_models(out).paths
    for name in (["unet_chunk1", "unet_chunk2"] if args.one == "unet" and "unet_chunk1" in paths else [args.one]):
        program = load_program(paths[name])
        ops = sum(1 for op in program.functions["main"].operations
                  if op.op_type != "const" and not op.op_type.startswith("constexpr_"))
        print(json.dumps({"module": SWIFT_NAMES[name], "bits": args.bits, "attention": args.attention,
                          "seconds": round(seconds, 1), "peak_gib": round(peak, 2), "ops": ops,
                          "size_mib": round(manifest["packages"][name]["size_bytes"] / 2**20, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-coreml")
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 6])
    ap.add_argument("--resolution", nargs="+", default=["512x512"])
    ap.add_argument("--attention", default="split-einsum")
    ap.add_argument("--modules", nargs="+", default=list(MODULES))
    ap.add_argument("--tag", default="", help="a suffix for the output folders (to keep runs apart)")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    model = args.work / "sd15-random"
    if args.family == "sdxl":
        sys.path.insert(0, str(Path(__file__).parent))
        from sdxl import make_model as make_xl

        model, args.tag = make_xl(), f"-sdxl{args.tag}"
    elif not (model / "model_index.json").is_file():
        t0 = time.time()
        make_model(model)
        print(f"random SD 1.5 model written in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for bits in args.bits:
        for module in args.modules:
            out = args.work / f"coreml-{bits}bit-{args.attention}{args.tag}"
            cmd = [sys.executable, __file__, "--one", module, "--bits", str(bits), "--model", str(model),
                   "--out", str(out), "--attention", args.attention, "--resolution", *args.resolution]
            env = dict(os.environ, TQDM_DISABLE="1")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{module} at {bits} bits failed")
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, flush=True)
    fp16 = {r["module"]: r["size_mib"] for r in rows if r["bits"] == 16}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"resolution {' '.join(args.resolution)}; attention {args.attention}")
    print(f"{'module':12s} {'bits':>4s} {'seconds':>8s} {'peak GiB':>9s} {'ops':>6s} {'MiB':>8s} {'x fp16':>7s}")
    for r in rows:
        ratio = r["size_mib"] / fp16[r["module"]] if r["module"] in fp16 else float("nan")
        r["size_vs_fp16"] = round(ratio, 3)
        print(f"{r['module']:12s} {r['bits']:>4d} {r['seconds']:>8.1f} {r['peak_gib']:>9.2f} {r['ops']:>6d} "
              f"{r['size_mib']:>8.1f} {ratio:>7.3f}")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
