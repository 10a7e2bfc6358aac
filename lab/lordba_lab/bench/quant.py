"""``lordba bench --suite quant``: the quantized-base backends side by side on the demo model's layers.

For each backend (fp32, HQQ 4/3/2-bit, bitsandbytes NF4) on SmolLM2's real weights: relative weight
error, storage bits per weight, and forward and forward+backward time relative to fp32 at a decode
(1 token) and a training (batch 8 × 64 tokens) shape, measured interleaved.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware

SUITE = "quant"
HELP = "quantized base backends (HQQ, bitsandbytes NF4): weight error, bits, forward/backward time vs fp32"
DEFAULT = False
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")


def _time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba.quant import resolve_backend
    from lordba.quant.bnb import quantize_linear_bnb
    from lordba.quant.hqq import quantize_linear_hqq
    from lordba_lab.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer()
    repeats = 3 if quick else 10
    backends = {
        "fp32": lambda lin: lin,
        "hqq-4bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 4, 64, torch.float32),
        "hqq-3bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 3, 64, torch.float32),
        "hqq-2bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 2, 64, torch.float32),
        "bnb-nf4": lambda lin: quantize_linear_bnb(copy.deepcopy(lin), torch.float32),
    }
    shapes = {"decode": (1, 1), "train": (8, 64)}
    rows, table = [], []
    for path in LAYERS[:1] if quick else LAYERS:
        linear: nn.Linear = model.get_submodule(path)
        layers = {name: make(linear) for name, make in backends.items()}
        times: dict[str, dict[str, list[float]]] = {
            n: {s: [] for s in ("decode", "train", "train_bwd")} for n in layers
        }
        for _ in range(repeats):  # interleave the backends within each round
            for name, layer in layers.items():
                for shape_name, (b, t) in shapes.items():
                    x = torch.randn(b, t, linear.in_features)
                    with torch.no_grad():
                        times[name][shape_name].append(_time(lambda: layer(x), 1))  # noqa: B023
                xg = torch.randn(8, 64, linear.in_features, requires_grad=True)
                times[name]["train_bwd"].append(_time(lambda: layer(xg).sum().backward(), 1))  # noqa: B023
        for name, layer in layers.items():
            backend = resolve_backend(layer)
            w = backend.dequantize(layer)
            err = float((w - linear.weight.float()).norm() / linear.weight.float().norm())
            med = {k: statistics.median(v) for k, v in times[name].items()}
            ref = {k: statistics.median(v) for k, v in times["fp32"].items()}
            row = {
                "layer": path,
                "backend": name,
                "bits_per_weight": backend.bits_per_weight(layer),
                "rel_weight_error": err,
                **{f"{k}_s": v for k, v in med.items()},
                **{f"{k}_ratio_vs_fp32": med[k] / ref[k] for k in med},
            }
            rows.append(row)
            table.append(
                [
                    path.split(".", 2)[-1],
                    name,
                    row["bits_per_weight"],
                    err,
                    row["decode_ratio_vs_fp32"],
                    row["train_ratio_vs_fp32"],
                    row["train_bwd_ratio_vs_fp32"],
                ]
            )
    columns = ["layer", "backend", "bits", "weight error", "decode / fp32", "train fwd / fp32", "fwd+bwd / fp32"]
    print_table("quantized base layers (SmolLM2 weights)", columns, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant.json").write_text(json.dumps({"hardware": hardware(), "rows": rows}, indent=1) + "\n")
    (out_dir / "quant.md").write_text("# Quantized base backends\n\n" + markdown_table(columns, table))
    return [out_dir / "quant.json", out_dir / "quant.md"]
