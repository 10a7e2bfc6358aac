"""Held-out loss of the demo's SmolLM2 r=16 PEFT LoRA converted with each scale format (issue 17).

Usage: python scripts/measure_scale_formats.py LORA_DIR [--eval-size 100]

Converts the LoRA (PTQ, default solver) with float16, int8 and int4 scales and with candidate int4
grids, loads each onto the demo's base (SmolLM2-135M-Instruct, 4-bit HQQ, as ``lordba demo``) and
prints the held-out loss of the demo's task (arithmetic, seed 0) and the weights-file size. A few
minutes of CPU; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import lordba.core.scales as scales
from lordba.convert import convert_lora
from lordba.nn.model import LoRDBAModel
from lordba.train.evaluate import heldout_loss
from lordba.train.tokenize import encode_examples

GRIDS = {  # candidate int4 code magnitudes (int8 codes), measured against the shipped one
    "int4 (linear, shipped)": scales.INT4_LEVELS,
    "int4 log 2^-1/3": (0, 32, 40, 50, 64, 80, 101, 127),
    "int4 fitted (Lloyd-Max on this adapter)": (0, 38, 53, 66, 79, 93, 106, 127),
}


@contextlib.contextmanager
def grid(levels: tuple[int, ...]) -> Iterator[None]:
    """Temporarily replace the int4 grid (only for this measurement)."""
    old = scales._INT4_MID, scales._INT4_TABLE
    scales._INT4_MID = torch.tensor([(x + y) / 2 for x, y in itertools.pairwise(levels)])
    scales._INT4_TABLE = torch.tensor(levels, dtype=torch.float32)
    try:
        yield
    finally:
        scales._INT4_MID, scales._INT4_TABLE = old


def main() -> None:
    from lordba.quant.cache import quantize_model_cached
    from lordba_lab.assets import load_model_and_tokenizer
    from lordba_lab.assets.models import resolve_model_path
    from lordba_lab.tasks import get_task

    p = argparse.ArgumentParser()
    p.add_argument("lora")
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--only", nargs="*", help="names of the runs to do (default: all)")
    args = p.parse_args()
    model, tok = load_model_and_tokenizer()
    quantize_model_cached(model, resolve_model_path(None), "hqq", 4, 64, progress=False)
    rows = encode_examples(tok, get_task("arithmetic").examples("eval", args.eval_size, 0), 96)
    pad = tok.pad_token_id or 0
    runs = [("float16", None), ("int8", None)] + [(name, levels) for name, levels in GRIDS.items()]
    for name, levels in runs:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        dtype = name if levels is None else "int4"
        with grid(levels) if levels else contextlib.nullcontext():
            t0 = time.perf_counter()
            state, report = convert_lora(args.lora, scale_dtype=dtype, progress=False)
            secs = time.perf_counter() - t0
            lm = LoRDBAModel(model)
            lm.load_adapter_state(state, "default")
            lm.set_adapter("default")
            with torch.no_grad():
                loss = heldout_loss(lm, rows, pad_id=pad)
            size3 = -1
            if levels in (None, scales.INT4_LEVELS):  # only the shipped formats can be saved
                with tempfile.TemporaryDirectory() as tmp:
                    v3 = state.save_pretrained(Path(tmp) / "v3")
                    size3 = (v3 / "lordba_model.safetensors").stat().st_size
            rep = lm.size_report()
            model = lm.unload()
        print(
            f"{name:42s} held-out loss {loss:.4f}  mean rel dW error {report.mean_rel_error:.4f}  payload "
            f"{rep.payload_bytes:,} B  BPW {rep.bpw_lora:.3f}  file {size3:,} B  convert {secs:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
