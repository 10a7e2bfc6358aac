"""``lordba cache``: where lordba's on-disk caches are and how large, and clearing the quantized bases.

The quantized-base cache (:mod:`lordba.quant.cache`) keeps one entry per model folder, settings and lordba
version and never evicts (a SmolLM2-135M entry is 67-90 MB, a 7B model's several GB): ``--clear-quantized``
removes its entries (the next load of a model quantizes it again). The other folders (compiled kernels,
compiled decode steps, the lab's models and data) are listed with their sizes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "cache"
HELP = "show lordba's on-disk caches and their sizes; --clear-quantized removes the quantized bases"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clear-quantized",
        action="store_true",
        help="remove every quantized-base entry (a model is quantized again at its next load)",
    )


def _size(folder: Path) -> int:
    """The bytes of the files under ``folder`` (links not followed; files removed meanwhile skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from lordba._util.cachedir import cache_dir
    from lordba.quant.cache import cache_entries, clear_cache

    root = cache_dir()
    print(f"lordba cache: {root} ($LORDBA_CACHE, else $XDG_CACHE_HOME/lordba, else ~/.cache/lordba)")
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        print(f"  {folder.name + '/':<12} {_mb(_size(folder)):>12}")
    entries = cache_entries()
    print(
        f"quantized bases: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {_mb(sum(s for _, s in entries))}"
    )
    if args.clear_quantized:
        print(f"removed the quantized bases: {_mb(clear_cache())} freed")
    return 0
