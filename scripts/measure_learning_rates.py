"""Held-out loss and exact match of LoRDBA training modes at several learning rates (docs/training.md,
"Learning rate").

Usage: python scripts/measure_learning_rates.py OUT [--modes qat-from-lora] [--lrs 1e-3,3e-4,1e-4] [--quick]

``lordba demo``'s setting: SmolLM2-135M-Instruct on the 4-bit HQQ base (g64), all 7 linear targets, r=16,
int8 scales, 60 steps of batch 8 on the arithmetic task, held-out n=100, seed 0. Each (mode, lr) point
trains a fresh adapter with ``build_adapter`` (the LoRA seed of ``qat-from-lora`` warms up for 10% of the
steps at LoRA's lr 1e-3, as the demo does) and is evaluated as the demo evaluates. Writes
``OUT/learning_rates.json`` and prints a table. About 5 minutes a point on 2 cores; not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from lordba._util.tables import print_table
from lordba.train.modes import build_adapter
from lordba_lab.bench import hardware
from lordba_lab.demo.run import FULL, QUICK, Demo, _lordba_config


def main() -> None:
    """Train and evaluate every (mode, lr) point in turn on one quantized base; write the points."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--modes", default="qat-from-lora", help="comma-separated training modes")
    p.add_argument("--lrs", default="1e-3,3e-4,1e-4", help="comma-separated LoRDBA learning rates")
    p.add_argument("--quick", action="store_true", help="the demo's quick settings: a smoke run")
    args = p.parse_args()
    settings = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    demo = Demo(args.out, dataclasses.replace(settings, measure_memory=False), progress=True)
    points: list[dict] = []
    for mode in args.modes.split(","):
        for lr in (float(v) for v in args.lrs.split(",")):
            t0 = time.perf_counter()
            lm, _ = build_adapter(
                demo.model,
                _lordba_config(demo, mode),
                demo.batcher,
                demo.settings(settings.steps, lr),
                out_dir=None,
                lora_lr=settings.lr_lora,
                resume=False,
                progress=True,
            )
            row = demo.add_row("LoRDBA", mode, 0, lm, time.perf_counter() - t0)
            points.append({"mode": mode, "lr": lr, "eval_loss": row["eval_loss"], "metric": row["metric"]})
            demo.model = lm.unload()
    result = {"settings": dataclasses.asdict(demo.s), "hardware": hardware(), "points": points}
    (args.out / "learning_rates.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(
        f"LoRDBA learning rates ({demo.s.task}, {demo.s.steps} steps, held-out n={demo.s.eval_size})",
        ["mode", "lr", "held-out loss", "exact match"],
        [[p["mode"], p["lr"], p["eval_loss"], p["metric"]] for p in points],
    )


if __name__ == "__main__":
    main()
