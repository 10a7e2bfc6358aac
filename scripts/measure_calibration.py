"""Held-out loss of the activation-weighted conversion and allocation against the uniform rank
(docs/conversion.md, ``--target-bpw`` with ``calibration``).

Usage: OMP_NUM_THREADS=1 python scripts/measure_calibration.py OUT [--seeds 2] [--quick]

Per seed, ``lordba demo``'s SmolLM2-135M-Instruct fp16 LoRA r=16 on the 4-bit HQQ base (arithmetic, 60
steps, the seed's own held-out set of 100) is trained and converted (PTQ, int8 scales) at a uniform r=8 and
r=16 and, at each of those file sizes, with per-layer ranks on ΔW error, with the activation-weighted
solver at the uniform rank and with per-layer ranks on the output error (moments from 8 training
batches): ``lordba reproduce``'s per-seed sweep with every other family switched off. Writes
``OUT/calibration.json`` (the points) and prints the losses. About 12
minutes a seed on 2 shared cores at one torch thread; not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from lordba_lab.bench import hardware
from lordba_lab.demo.reproduce import ReproduceSettings, _one_seed
from lordba_lab.demo.run import FULL, Demo

SETTINGS = ReproduceSettings(
    demo=dataclasses.replace(FULL, measure_memory=False, task="arithmetic"),
    ptq_ranks=(8, 16),
    ptq_fp16_ranks=(),
    ptq_int4_ranks=(),
    allocated_at=(8, 16),
    calibrated_at=(8, 16),
    allocation_candidates=(4, 8, 16, 32),
    qat_ranks=(),
    qat_int4_ranks=(),
    scales_ranks=(),
    scales_int4_ranks=(),
    lora_small_ranks=(),
    truncate_ranks=(),
    rtn_bits=(),
    low_bit_baselines=False,
)


def main() -> None:
    """Run the seeds one after another (each with its own held-out set) and write the points."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 training steps, 16 held-out examples: a smoke run")
    args = p.parse_args()
    demo_settings = SETTINGS.demo
    if args.quick:
        demo_settings = dataclasses.replace(demo_settings, steps=3, eval_size=16)
    args.out.mkdir(parents=True, exist_ok=True)
    points: list[dict] = []
    seconds: dict[int, float] = {}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        demo = Demo(args.out, dataclasses.replace(demo_settings, seed=seed), progress=True)
        seed_points, _ = _one_seed(demo, SETTINGS, seed)
        seconds[seed] = time.perf_counter() - t0
        for point in seed_points:
            print(f"seed {seed} {point['family']} {point['label']}: loss {point['eval_loss']:.4f}", flush=True)
        points += seed_points
    result = {"hardware": hardware(), "torch_threads": torch.get_num_threads(), "seconds": seconds, "points": points}
    (args.out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
