"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) offline, for every shipped config folder.

Stable Diffusion 1.x and 2.x both use the OpenAI CLIP byte-level BPE vocabulary (49408 tokens). Its only
source data is `bpe_simple_vocab_16e6.txt.gz` (MIT License, Copyright (c) 2021 OpenAI), which the
`open_clip_torch` wheel on PyPI ships. Get it without installing open_clip:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o -j /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python editsuite/configs/make_tokenizer.py /tmp/oc/bpe_simple_vocab_16e6.txt.gz

The vocabulary is built exactly the way OpenAI's `SimpleTokenizer` builds it:
  merges = lines[1 : 49152 - 256 - 2 + 1]                       (48894 merges)
  vocab  = the 256 byte-unicode characters, then each + "</w>", then each merge joined,
           then "<|startoftext|>", "<|endoftext|>"               (49408 entries)
and written in the layout `transformers.CLIPTokenizer` reads (merges.txt starts with "#version: 0.2").

SD 1.x pads with "<|endoftext|>"; SD 2.x (OpenCLIP) pads with "!" (id 0). Only the derived files are
committed, not the .gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
# folder -> pad token
FOLDERS = {
    "sd-v1": EOS,
    "sd-v1-inpainting": EOS,
    "sd-v2": "!",
    "sd-v2-inpainting": "!",
}


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"{bpe_gz}: not a CLIP BPE merges file")
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != VOCAB_SIZE:
        raise SystemExit(f"expected {VOCAB_SIZE} vocabulary entries, got {len(encoder)}")
    return encoder, [" ".join(p) for p in pairs]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_folder(out: Path, encoder: dict[str, int], merges: list[str], pad: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special_tokens_map = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": _special(pad) if pad == EOS else pad,
        "unk_token": _special(EOS),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--root", type=Path, default=CONFIG_ROOT, help="config root holding the sd-* folders")
    args = parser.parse_args(argv)
    encoder, merges = build(args.bpe_gz)
    for folder, pad in FOLDERS.items():
        write_folder(args.root / folder / "tokenizer", encoder, merges, pad)
        print(f"wrote {args.root / folder / 'tokenizer'} ({len(encoder)} tokens, {len(merges)} merges, pad {pad!r})")


if __name__ == "__main__":
    main()
