"""``lordba reproduce``'s tables: the sweep with 95% intervals, the per-layer-rank comparison and the
issue's two targets, printed and written as ``reproduce.md``."""

from __future__ import annotations

from pathlib import Path

from lordba._util.tables import markdown_table, print_table
from lordba_lab.outputs import write_text

CALIBRATION_BATCHES = 8  # training batches whose inputs give the calibration moments


def _ci(ci: list | tuple | None, digits: int = 4) -> str:
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _pm(row: dict, key: str) -> str:
    mean = row[f"{key}_mean"]
    if mean is None:
        return ""
    return f"{mean:.4f} ± {row[f'{key}_std']:.4f} {_ci(row.get(f'{key}_ci'))}".rstrip()


def _bytes(row: dict) -> int | str:
    """The bytes column: the size, or its mean over seeds and range where it varies by seed."""
    lo, hi = row.get("bytes_range") or (row["bytes"], row["bytes"])
    return row["bytes"] if lo == hi else f"{row['bytes']:,.0f} ({lo:,d}–{hi:,d})"


def _title(settings: dict) -> str:
    d = settings["demo"]
    scales = f"scales-only {d['scales_steps']} step{'s' if d['scales_steps'] != 1 else ''}"
    if settings.get("scales_fresh_batches"):
        scales += " on the batches after the fp16 LoRA's"
    return (
        f"task {d['task']}, model {d['model']}, {d['steps']} steps x batch {d['batch_size']} ({scales}), "
        f"targets {','.join(d['targets'])}, 4-bit {d['base']} base, held-out n={d['eval_size']}, "
        f"seeds {list(settings['seeds'])}"
    )


def write_tables(out: Path, result: dict) -> None:
    """Print the sweep's table and write ``out/reproduce.md`` from ``result`` (reproduce.json's content)."""
    columns = ["family", "variant", "bytes", "BPW", "metric: mean ± std [95% CI]", "eval loss: mean ± std [95% CI]",
               "seeds"]  # fmt: skip
    summary = result["summary"]
    table = [[r["family"], r["label"], _bytes(r), r["bpw"], _pm(r, "metric"), _pm(r, "eval_loss"), r["n"]]
             for r in summary]  # fmt: skip
    title = _title(result["settings"])
    print_table(title, columns, table)
    hw = result["hardware"]
    md = [
        "# lordba reproduce: quality against adapter size\n",
        f"{title}. {_run_time(result)} on {hw['cpu']} ({hw['torch_threads']} threads), torch {hw['torch']}.\n",
        "BPW: payload bits per parameter of the fp16 LoRA r=16 basis (scales and group scales included). "
        "Metric: exact match of greedy answers; eval loss: completion cross-entropy. Intervals: 95%, a "
        "bootstrap over seeds and held-out examples (`lordba_lab.demo.stats`); differences are paired "
        "(same seeds, same examples).\n",
        markdown_table(columns, table),
        *_targets(result),
        *_matched_lora_table(result.get("trained_vs_matched_lora") or []),
        *_rmr_lines(result),
        *_allocation_table(result["allocation_vs_uniform"]),
        "![sweep](sweep.png)\n",
    ]
    if result["conversion_layers"]:
        md.append("![error vs RMR](error_vs_rmr.png)\n")
    write_text(out / "reproduce.md", "\n".join(md))


def _rmr_lines(result: dict) -> list[str]:
    """The RMR-against-error sentence (none where the run has no r=16 conversion)."""
    if not result["conversion_layers"]:
        return []
    return [
        f"\nPer-layer relative reconstruction error of the r=16 PTQ conversion against the mean RMR of the "
        f"LoRA factors: Spearman ρ = {result['rmr_error_spearman']:.3f} over "
        f"{len(result['conversion_layers'])} layers.\n"
    ]


def _matched_lora_table(rows: list[dict]) -> list[str]:
    """Trained LoRDBA against the fp16 LoRA trained at the nearest size, as markdown lines (none without)."""
    if not rows:
        return []
    columns = ["trained LoRDBA", "BPW", "loss", "fp16 LoRA trained at the nearest size", "BPW", "loss",
               "bytes: LoRDBA / LoRA", "loss: LoRDBA − LoRA [95% CI]", "exact match: LoRDBA − LoRA [95% CI]",
               "LoRDBA's loss is"]  # fmt: skip
    table = [[r["series"], r["bpw"], r["loss"], r["lora"], r["lora_bpw"], r["lora_loss"], f"{r['bytes_ratio']:.3f}",
              _diff(r, "eval_loss"), _diff(r, "metric"), r["verdict"]] for r in rows]  # fmt: skip
    return [
        "\n## Trained LoRDBA against an fp16 LoRA trained at about its size\n",
        "Each trained LoRDBA series against the fp16 LoRA trained (same steps) at the rank of nearest payload "
        "size; `lower`: the paired 95% interval of the loss difference lies below 0.\n",
        markdown_table(columns, table),
    ]


def _run_time(result: dict) -> str:
    """This invocation's time, and each seed's (kept seeds read back from ``seeds/`` say so)."""
    per_seed = result.get("seed_seconds") or {}
    seeds = ", ".join(f"seed {k}: {'not recorded' if v is None else f'{v:.0f} s'}" for k, v in per_seed.items())
    return f"Run time {result['seconds']:.0f} s for this invocation" + (f" (per seed: {seeds})" if seeds else "")


def _signed(value: float | None, digits: int) -> str:
    """``value`` with its sign, or nothing where there is none (a task without a metric)."""
    return "" if value is None else f"{value:+.{digits}f}"


def _diff(row: dict, key: str) -> str:
    d = row.get(f"{key}_diff")
    return "" if d is None else f"{d:+.4f} {_ci(row.get(f'{key}_diff_ci'))}".rstrip()


def _targets(result: dict) -> list[str]:
    """The two targets as markdown sections (none where the run has no such points)."""
    lines: list[str] = []
    free = result.get("training_free_target") or []
    if free:
        columns = ["baseline", "BPW", "loss", "best LoRDBA at ≤ its bytes", "BPW", "loss",
                   "loss: LoRDBA − baseline [95% CI]", "exact match: LoRDBA − baseline [95% CI]", "LoRDBA's loss is",
                   "smallest LoRDBA significantly lower"]  # fmt: skip
        table = [[r["baseline"], r["baseline_bpw"], r["baseline_loss"], r["lordba"] or "", r.get("lordba_bpw"),
                  r.get("lordba_loss"), _diff(r, "eval_loss"), _diff(r, "metric"), r["verdict"],
                  f"{r['smallest_lower'][1]} ({r['smallest_lower'][0]:.3g} BPW)" if r.get("smallest_lower") else ""]
                 for r in free]  # fmt: skip
        lines += [
            "\n## Target 1: training-free LoRDBA against the training-free baselines\n",
            "For each baseline between 0.75 and 2.5 BPW: the training-free LoRDBA point (any conversion variant) "
            "with the lowest mean held-out loss among those at equal or fewer bytes. `lower`: the paired 95% "
            "interval of the loss difference lies below 0.\n",
            markdown_table(columns, table),
        ]
    trained = result.get("trained_target") or []
    if trained:
        columns = ["trained LoRDBA", "BPW", "loss", "exact match", "loss − fp16 LoRA r=16 [95% CI]", "seed spread",
                   "exact match − fp16 LoRA r=16 [95% CI]", "≤ 1.5 BPW", "verdict"]  # fmt: skip
        table = [[r["series"], r["bpw"], r["loss"], r["metric"], _diff(r, "eval_loss"), r["loss_spread"],
                  _diff(r, "metric"), "yes" if r["in_target_size"] else "no", r["verdict"]]
                 for r in trained]  # fmt: skip
        lines += [
            "\n## Target 2: trained LoRDBA against the fp16 LoRA r=16\n",
            "`matches`: the loss difference is within the seed spread (the larger sample std over seeds of the "
            "two) or negative, and the exact-match interval reaches 0 or above.\n",
            markdown_table(columns, table),
        ]
    return lines


def _allocation_table(rows: list[dict]) -> list[str]:
    """The variants-against-uniform comparison as markdown lines (none without such points)."""
    if not rows:
        return []
    columns = ["uniform r", "variant", "file bytes (uniform / variant)", "ΔW rel. error (uniform / variant)",
               "held-out loss (uniform / variant)", "loss: variant − uniform (mean ± std)",
               "exact match: variant − uniform", "seeds variant wins", "ranks"]  # fmt: skip
    table = [
        [r["uniform_rank"], r["variant"], f"{r['uniform_file_bytes']:,} / {r['allocated_file_bytes']:,}",
         f"{r['uniform_rel_error']:.4f} / {r['allocated_rel_error']:.4f}",
         f"{r['uniform_loss_mean']:.4f} / {r['allocated_loss_mean']:.4f}",
         f"{r['loss_diff_mean']:+.4f} ± {r['loss_diff_std']:.4f}", _signed(r["metric_diff_mean"], 3),
         f"{r['allocated_wins']} / {r['seeds']}", r["rank_histogram"] or "uniform"]
        for r in rows
    ]  # fmt: skip
    return [
        "\n## Conversion variants against the uniform rank at the same file size\n",
        "Per-layer ranks (`target_bpw`: ΔW error, or with calibration the output error on the layers' "
        f"inputs, E[x²] over {CALIBRATION_BATCHES} training batches) and the activation-weighted solver at a uniform "
        "rank, judged on held-out loss, paired by seed (same trained LoRA, same held-out set).\n",
        markdown_table(columns, table),
        "",
    ]
