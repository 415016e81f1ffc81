"""Write the model cards (README.md) of the demo family from the training times and the scores:
`python -m editsuite.demo.card --scores build/demo-scores.json`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editsuite.demo import ROOT
from editsuite.demo.data import HELD_PAIRS, HELD_TRIPLES
from editsuite.demo.data import __doc__ as SPLIT
from editsuite.demo.evaluate import __doc__ as RULES
from editsuite.demo.scenes import __doc__ as GRAMMAR
from editsuite.demo.score import __doc__ as CASES
from editsuite.demo.train import STAGES

# the targets of issue 24: (part, figure, at least)
TARGETS = [("txt2img", "background", 95), ("txt2img", "colour", 90), ("txt2img", "shape", 85),
           ("txt2img", "count", 90), ("inpaint", "new_object", 80), ("outpaint", "background_continuous", 90)]

ROLE = {
    "base": "4-channel UNet (epsilon prediction, 16x16 latents from a factor-4 VAE): txt2img, img2img, outpaint, "
            "tiled upscale, 4-channel inpaint.",
    "inpainting": "9-channel UNet (latents + mask + masked-image latents), started from the base UNet.",
    "upscaler": "x4 upscaler: 7-channel convolutional UNet (latents + noised low-res image, class_labels = noise "
                "level), v-prediction; the family's VAE without mid-block attention, tuned on whole 128 px "
                "pictures, its latents rescaled to 0.08333, and its decoder then tuned (encoder frozen) on the latents "
                "the upscaler's UNet makes. Trained without prompts: its prompt is ignored.",
}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _held() -> str:
    triples = ", ".join(f"{c} {s} on {bg}" for bg, c, s in sorted(HELD_TRIPLES))
    pairs = ", ".join(" + ".join(f"{c} {s}" for c, s in sorted(p)) for p in sorted(HELD_PAIRS, key=sorted))
    return f"Held-out combinations: {triples}.\n\nHeld-out pairings: {pairs}."


def _thresholds() -> str:
    from editsuite.demo import evaluate as E
    from editsuite.demo.score import FEATHER, OUTPAINT_BACKGROUND

    fit = ", ".join(f"{k} {v}" for k, v in E.FIT_MIN.items())
    return (f"Thresholds: FIT_MIN {fit}; ASPECT_MAX {E.ASPECT_MAX}; SOLIDITY_MIN {E.SOLIDITY_MIN}; EDGE_MAX "
            f"{E.EDGE_MAX} px (measured {E.EDGE_RING} px either side of the outline); PLACE_TOLERANCE "
            f"{E.PLACE_TOLERANCE:.2f} and SIZE_TOLERANCE {E.SIZE_TOLERANCE} of the side; BORDER_MIN "
            f"{E.BORDER_MIN:.0%} of the border; BLEND_DISTANCE {E.BLEND_DISTANCE:.0f} (RGB); outpaint: the zone beyond "
            f"the {FEATHER} px feather, OUTPAINT_BACKGROUND {OUTPAINT_BACKGROUND:.0%} of its pixels.")


def _targets(scores: dict, also: list[tuple[str, dict]] = ()) -> list[str]:
    """The targets table; `also`: (label, scores) of other runs (another guidance, say), a column each."""
    def cell(got, least, unit="%"):
        mark = "" if got is None else (" (met)" if got >= least else " (**not met**)")
        return f"{'-' if got is None else f'{got} {unit}'}{mark}"

    heads = "".join(f" {label} |" for label, _ in also)
    rows = [f"| part | figure | target | measured |{heads}", "|---|---|---|---|" + "---|" * len(also)]
    for part, figure, least in TARGETS:
        cells = [cell(s.get(part, {}).get(figure), least) for s in (scores, *(a for _, a in also))]
        rows.append(f"| {part} | {figure} | >= {least} % | " + " | ".join(cells) + " |")
    ceiling = scores.get("ceiling", {})
    for figure in ("background", "colour", "shape", "count") if ceiling else ():
        rows.append(f"| reference: the prompts' exact pictures through the VAE | {figure} | (no target) | "
                    f"{ceiling[figure]} % |" + " - |" * len(also))
    up = scores.get("upscale", {})
    if up:
        gain = cell(up.get("gain_db"), 2, "dB")
        rows.append(f"| upscale | gain over Lanczos | >= 2 dB | {gain} |" + " - |" * len(also))
    return rows


def card(name: str, times: dict, scores: dict, total_mb: float, notes: list[str] = (),
         also: list[tuple[str, dict]] = ()) -> str:
    minutes = round(times.get("total", 0) / 60)
    lines = [
        f"# editsuite demo model: {name}",
        "",
        "A demo, not a general model. It knows one small world: simple shapes in plain colours on a plain",
        "background, at 64x64 pixels (the upscaler: 16-32 px in, 4x out). It goes through exactly the same",
        "loading, task and conversion code as a real Stable Diffusion checkpoint.",
        "",
        f"Role: {ROLE[name]}",
        "",
        "## Training data and caption grammar",
        "Pictures drawn by `editsuite.demo.scenes`, exact at any resolution; captions follow this grammar:",
        "```" + GRAMMAR.split("Caption grammar", 1)[1].split('A size or place')[0].rstrip() + "\n```",
        "",
        "## What is held out",
        SPLIT.split("\n\n", 1)[1].strip(),
        "",
        _held(),
        "",
        "## Reproduce",
        "`python -m editsuite.demo.train` (fixed seeds, 2-core CPU), then `python -m editsuite.demo.score` and",
        "`python -m editsuite.demo.card`.",
        f"Training time of the whole family on a 2-core CPU: {minutes} minutes "
        f"({', '.join(f'{k} {round(v / 60)} min' for k, v in times.items() if k != 'total')}).",
        f"Size of the whole family (three folders, fp16 safetensors): {total_mb:.1f} MiB "
        f"({total_mb * 2**20 / 1e6:.1f} MB).",
    ] + list(notes)
    lines += ["", "## How it is scored", CASES.split("\n\n", 1)[1].strip(), "", "The evaluator's rules "
              "(`editsuite.demo.evaluate`):", "", RULES.split("\n\n", 1)[1].strip(), "", _thresholds()]
    if scores:
        lines += ["", "## Scores (`python -m editsuite.demo.score`)", *_targets(scores, also), "", "Every figure:",
                  "```", json.dumps(scores, indent=2), "```"]
        for label, more in also:
            lines += ["", f"Every figure, {label}:", "```", json.dumps(more, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("build/demo-train"), help="where train.py left times-*.json")
    ap.add_argument("--scores", type=Path, default=None)
    ap.add_argument("--note", action="append", default=[], help="a line added under the training time (how it was "
                    "measured, what it was trained on); repeatable")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=FILE",
                    help="another run's scores (another guidance, say) as a column of the targets table; repeatable")
    args = ap.parse_args(argv)
    times: dict = {}
    for f in sorted(args.work.glob("times-*.json")):  # one file per `--stage` run, or one for `all`
        times.update({k: v for k, v in json.loads(f.read_text()).items() if k != "total"})
    times = {k: times[k] for k in STAGES if k in times}  # in the recipe's order, whichever files they came from
    times["total"] = sum(times.values())
    scores = json.loads(args.scores.read_text()) if args.scores else {}
    also = []
    for label, eq, file in (a.partition("=") for a in args.also):
        if not (label and eq and Path(file).is_file()):
            ap.error(f"--also {label}{eq}{file}: give LABEL=FILE, FILE a scores JSON that exists")
        also.append((label, json.loads(Path(file).read_text())))
    folders = [ROOT / n for n in ROLE]
    total_mb = sum(folder_size(f) for f in folders) / 2**20
    for f in folders:
        (f / "README.md").write_text(card(f.name, times, scores, total_mb, args.note, also))
        print(f"wrote {f / 'README.md'}")


if __name__ == "__main__":
    main()
