"""Median load time of one adapter saved as format version 1 and as version 3 (issue 17).

Usage: python scripts/measure_load_time.py LORA_DIR [--repeats 40] [--scale-dtype int8]

Converts the PEFT LoRA (the demo's SmolLM2-135M r=16, all linear layers), saves it in both
versions, and times (median of ``--repeats``, one thread) ``read_adapter`` (validate + read) and
``LoRDBAModel.load_adapter`` onto SmolLM2 holding a resident adapter (what the server's cold
load does) then ``delete_adapter``. Prints file and header sizes. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lordba.convert import convert_lora
from lordba.format.adapter import read_adapter
from lordba.nn.model import LoRDBAModel


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    from lordba_lab.assets import load_model_and_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("lora")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--scale-dtype", default="int8")
    args = p.parse_args()
    torch.set_num_threads(1)
    state, _ = convert_lora(args.lora, scale_dtype=args.scale_dtype, progress=False)
    model, _ = load_model_and_tokenizer()
    lm = LoRDBAModel(model)
    with tempfile.TemporaryDirectory() as tmp:
        versions = (1, 3) if args.scale_dtype != "int4" else (3,)
        for version in versions:
            directory = state.save_pretrained(Path(tmp) / f"v{version}", format_version=version)
            weights = directory / "lordba_model.safetensors"
            size = weights.stat().st_size
            header = struct.unpack("<Q", weights.read_bytes()[:8])[0]

            def load(d: Path = directory) -> None:
                lm.load_adapter(d, "x")
                lm.delete_adapter("x")

            if not lm.peft_config:  # a resident adapter: the layers exist, as in a serving process
                lm.load_adapter(directory, "resident")
            read_ms = _median_ms(lambda d=directory: read_adapter(d), args.repeats)
            load(), load()  # warm-up: kernels, caches of the model's structure
            load_ms = _median_ms(load, args.repeats)
            print(
                f"version {version} ({args.scale_dtype}): file {size:,} B, header {header:,} B "
                f"({100 * header / (size - header - 8):.2f}% of the payload); read_adapter median {read_ms:.2f} ms; "
                f"load_adapter + delete_adapter median {load_ms:.2f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
