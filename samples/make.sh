#!/usr/bin/env bash
# Rebuild every file in samples/: inputs drawn by the demo world's renderer, outputs made by the CLI
# with the built-in demo model. Run from the repository root with editsuite installed.
# studio.png, the studio's page after an inpaint, comes from its browser test:
#   EDITSUITE_STUDIO_SCREENSHOT=$PWD/samples/studio.png python -m pytest tests/test_studio.py -k paints_a_mask
set -euo pipefail
cd "$(dirname "$0")"
scene="a small red circle at the left and a green square, on a blue background"
python -m editsuite.demo.draw "$scene" -o scene.png
python -m editsuite.demo.draw "$scene" --mask 1 -o scene-mask.png
python -m editsuite.demo.draw "a yellow triangle on a black background" --size 32 -o small.png
mkdir -p batch/masks  # inputs of the example recipes in tasks/
python -m editsuite.demo.draw "a large red circle on a blue background" -o batch/red-circle.png
python -m editsuite.demo.draw "a large yellow square on a black background" -o batch/yellow-square.png
python -m editsuite.demo.draw "a large white triangle on a green background" -o batch/white-triangle.png
python -m editsuite.demo.draw "a large red circle on a blue background" --mask 0 -o batch/masks/red-circle.png
python -m editsuite.demo.draw "a large yellow square on a black background" --mask 0 -o batch/masks/yellow-square.png
python -m editsuite.demo.draw "a large white triangle on a green background" --mask 0 -o batch/masks/white-triangle.png
o="--seed 1 --overwrite -q"
editsuite txt2img -p "a red circle on a blue background" -o txt2img.png $o
editsuite img2img scene.png -p "a small red circle at the left and a green square, on a white background" \
  --strength 0.7 -o img2img.png $o
editsuite inpaint scene.png --mask scene-mask.png \
  -p "a small red circle at the left and a yellow triangle, on a blue background" -o inpaint.png $o
editsuite outpaint scene.png -p "$scene" --right 32 -o outpaint.png $o
editsuite upscale small.png -o upscale.png $o
