"""``lordba bench --suite train-memory``: peak memory and time of one training step, fp32 LoRA vs LoRDBA.

Same real model (SmolLM2-135M-Instruct), same 4-bit HQQ base, same rank and targets, same batch of
real data. Peak = resident tensors before the step (base weights, adapter parameters, optimizer
state) + the highest live bytes during forward, backward and the optimizer step (measured by
:class:`~lordba_lab.bench._memory.LiveTensorBytes`, measured on the second step, when the optimizer
state exists). Step times are medians of interleaved repeats.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware
from lordba_lab.bench._memory import resident_bytes, step_memory
from lordba_lab.outputs import write_text

SUITE = "train-memory"
HELP = "peak memory and step time of a training step: fp32 LoRA vs LoRDBA on the same 4-bit base"
DEFAULT = False
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(tok, batch_size: int, length: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from lordba_lab.tasks import get_task

    texts = [
        e.messages[-1][1] + " " + e.completion for e in get_task("sentiment").examples("train", batch_size * 4, seed=0)
    ]
    enc = tok(texts[:batch_size], return_tensors="pt", padding="max_length", truncation=True, max_length=length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba.config import LoRDBAConfig
    from lordba.nn.model import get_lordba_model
    from lordba.quant.cache import quantize_model_cached
    from lordba.train.lora import add_lora
    from lordba_lab.assets import load_model_and_tokenizer
    from lordba_lab.assets.models import resolve_model_path

    batch_size, length, repeats = (4, 64, 2) if quick else (8, 256, 5)
    r = 16
    model, tok = load_model_and_tokenizer()
    quantize_model_cached(model, resolve_model_path(None), "hqq", 4, 64, progress=True)
    batch = _batch(tok, batch_size, length)
    base_resident = resident_bytes(model)

    methods = {
        "lora-fp32": lambda m: add_lora(m, r, 32.0, TARGETS),
        "lordba-fp32-latents": lambda m: get_lordba_model(m, LoRDBAConfig(r=r, target_modules=TARGETS)),
        "lordba-bf16-latents": lambda m: get_lordba_model(
            m, LoRDBAConfig(r=r, target_modules=TARGETS, latent_dtype="bfloat16")
        ),
    }
    results: dict[str, dict] = {}
    for name, make in methods.items():
        torch.manual_seed(0)
        wrapped = make(model)
        results[name] = step_memory(wrapped, batch)
        model = wrapped.unload()
    # step time: interleaved repeats, each method re-attached (cheap) so rounds alternate
    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(repeats):
        for name, make in methods.items():
            torch.manual_seed(0)
            wrapped = make(model)
            opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
            _step(wrapped, opt, batch)
            t0 = time.perf_counter()
            _step(wrapped, opt, batch)
            times[name].append(time.perf_counter() - t0)
            model = wrapped.unload()

    lora = results["lora-fp32"]
    rows, table = [], []
    for name, res in results.items():
        row = {
            "method": name,
            "trainable_params": res["trainable_params"],
            "resident_bytes": res["resident_bytes"],
            "step_peak_live_bytes": res["step_peak_live_bytes"],
            "peak_bytes": res["peak_bytes"],
            "peak_ratio_vs_lora": res["peak_bytes"] / lora["peak_bytes"],
            "above_base_ratio_vs_lora": (res["peak_bytes"] - base_resident) / (lora["peak_bytes"] - base_resident),
            "step_s_median": statistics.median(times[name]),
            "step_time_ratio_vs_lora": statistics.median(times[name]) / statistics.median(times["lora-fp32"]),
        }
        rows.append(row)
        table.append(
            [
                name,
                row["trainable_params"],
                row["peak_bytes"] / 2**20,
                row["peak_ratio_vs_lora"],
                row["above_base_ratio_vs_lora"],
                row["step_s_median"],
                row["step_time_ratio_vs_lora"],
            ]
        )
    best = min((r for r in rows if r["method"].startswith("lordba")), key=lambda r: r["peak_bytes"])
    report = {
        "lora_peak_bytes": lora["peak_bytes"],
        "lordba_peak_bytes": rows[1]["peak_bytes"],
        "ratio": rows[1]["peak_ratio_vs_lora"],
        "best_lordba": best["method"],
        "best_ratio": best["peak_ratio_vs_lora"],
        "base_resident_bytes": base_resident,
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "base": "HQQ 4-bit g64",
            "r": r,
            "targets": TARGETS,
            "batch": batch_size,
            "tokens": length,
            "repeats": repeats,
        },
        "hardware": hardware(),
        "rows": rows,
    }
    columns = ["method", "trainable params", "peak MiB", "peak / LoRA", "above-base / LoRA", "step s", "time / LoRA"]
    print_table(f"training step, r={r}, batch {batch_size}x{length} tokens, 4-bit HQQ base", columns, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "train_memory.json", json.dumps(report, indent=1) + "\n")
    write_text(
        out_dir / "train_memory.md",
        f"# Training-step memory and time\n\n{json.dumps(report['setup'])}\n\n"
        + markdown_table(columns, table)
        + f"\nStep times (medians of interleaved repeats) measured on: {json.dumps(report['hardware'])}\n",
    )
    return [out_dir / "train_memory.json", out_dir / "train_memory.md"]
