"""The sweep's statistics: per-series summaries with 95% intervals, the per-layer-rank comparison,
and the issue's two targets checked on paired bootstrap intervals (:mod:`lordba_lab.demo.stats`)."""

from __future__ import annotations

import statistics

import numpy as np
import torch

from lordba_lab.demo.families import (
    AGAINST_UNIFORM,
    BPW_RANGE,
    LORA_SMALL,
    LORDBA_PTQ,
    TRAINED_LORDBA,
    TRAINED_MAX_BPW,
    TRAINING_FREE_BASELINES,
    TRAINING_FREE_LORDBA,
)
from lordba_lab.demo.stats import Draws, draws_of, interval

Series = dict[tuple[str, str], list[dict]]


def series(points: list[dict]) -> Series:
    """Points grouped by ``(family, label)``, each group in seed order."""
    groups: Series = {}
    for p in points:
        groups.setdefault((p["family"], p["label"]), []).append(p)
    return {k: sorted(v, key=lambda p: p["seed"]) for k, v in groups.items()}


def shared_draws(points: list[dict]) -> Draws | None:
    """Bootstrap draws over the run's seeds and held-out examples (``None`` without per-example results)."""
    detailed = [p for p in points if p.get("per_example")]
    if not detailed:
        return None
    seeds = sorted({p["seed"] for p in points if p["family"] != "base"}) or [0]
    return Draws.make(len(seeds), len(detailed[0]["per_example"]["loss_sum"]))


def _draws(ps: list[dict], key: str, draws: Draws | None) -> np.ndarray | None:
    if draws is None or len(ps) not in (1, draws.seeds.shape[1]):
        return None
    return draws_of(ps, key, draws)


def _mean(ps: list[dict], key: str) -> float | None:
    vals = [p[key] for p in ps if p.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _same_or_mean(vals: list) -> float | int:
    """The value every seed has (kept an int), else the mean over seeds."""
    return vals[0] if len(set(vals)) == 1 else statistics.fmean(vals)


def summarize(points: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds of each (family, label), and 95% bootstrap intervals
    (``metric_ci``, ``eval_loss_ci``; ``None`` without per-example results). ``bytes`` and ``bpw``: the mean
    over seeds where a size varies by seed (LoRAQuant-style's), ``bytes_range``: the smallest and largest."""
    draws = shared_draws(points)
    out = []
    for (family, label), ps in series(points).items():
        sizes = [p["bytes"] for p in ps]
        row = {"family": family, "label": label, "n": len(ps), "bytes": _same_or_mean(sizes),
               "bytes_range": [min(sizes), max(sizes)], "bpw": _same_or_mean([p["bpw"] for p in ps])}  # fmt: skip
        for key, stat in (("metric", "metric"), ("eval_loss", "loss")):
            vals = [p[key] for p in ps if p.get(key) is not None]
            row[f"{key}_mean"] = _mean(ps, key)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            d = _draws(ps, stat, draws) if vals else None
            row[f"{key}_ci"] = interval(d) if d is not None else None
        row["reference"] = any(p.get("reference") for p in ps)
        out.append(row)
    return sorted(out, key=lambda r: (r["family"], r["bpw"]))


def _paired(a: list[dict], b: list[dict], draws: Draws | None) -> dict:
    """``a`` minus ``b``: mean differences of loss and exact match, with paired 95% intervals."""
    out: dict = {}
    for key, stat in (("eval_loss", "loss"), ("metric", "metric")):
        ma, mb = _mean(a, key), _mean(b, key)
        out[f"{key}_diff"] = None if ma is None or mb is None else ma - mb
        da, db = _draws(a, stat, draws), _draws(b, stat, draws)
        out[f"{key}_diff_ci"] = interval(da - db) if da is not None and db is not None else None
    return out


def _sign(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "no interval"
    return "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "within the interval"


def training_free_target(points: list[dict]) -> list[dict]:
    """Per training-free baseline point in :data:`BPW_RANGE`: the training-free LoRDBA point of lowest mean
    held-out loss among those at equal or fewer bytes (in every seed), its paired loss and exact-match differences
    (LoRDBA minus baseline), and the verdict (``lower``: the loss interval is below 0); plus the
    smallest LoRDBA point whose loss is significantly lower."""
    groups, draws = series(points), shared_draws(points)
    ours = [(k, ps) for k, ps in groups.items() if k[0] in TRAINING_FREE_LORDBA]
    rows = []
    for (family, label), ps in groups.items():
        bpw = _same_or_mean([p["bpw"] for p in ps])
        if family not in TRAINING_FREE_BASELINES or not BPW_RANGE[0] - 1e-9 <= bpw <= BPW_RANGE[1] + 1e-9:
            continue
        row = {"baseline": f"{family} {label}", "baseline_bpw": bpw, "baseline_loss": _mean(ps, "eval_loss"),
               "baseline_metric": _mean(ps, "metric"), "lordba": None,
               "verdict": "no LoRDBA at <= its bytes"}  # fmt: skip
        budget = min(p["bytes"] for p in ps)  # sizes that vary by seed (LoRAQuant's): LoRDBA's largest must fit
        fits = [(k, q) for k, q in ours if max(p["bytes"] for p in q) <= budget and len(q) == len(ps)]
        if fits:
            (f, lab), best = min(fits, key=lambda kv: _mean(kv[1], "eval_loss"))
            row.update(lordba=f"{f} {lab}", lordba_bpw=best[0]["bpw"], lordba_loss=_mean(best, "eval_loss"),
                       lordba_metric=_mean(best, "metric"), **_paired(best, ps, draws))  # fmt: skip
            row["verdict"] = _sign(row["eval_loss_diff_ci"])
            winners = [(k, q) for k, q in fits if _sign(_paired(q, ps, draws)["eval_loss_diff_ci"]) == "lower"]
            row["smallest_lower"] = min(((q[0]["bpw"], f"{k[0]} {k[1]}") for k, q in winners), default=None)
        rows.append(row)
    return sorted(rows, key=lambda r: r["baseline_bpw"])


def trained_target(points: list[dict], reference: tuple[str, str]) -> list[dict]:
    """Per trained LoRDBA series against the fp16 LoRA ``reference`` (family, label): paired loss and
    exact-match differences (LoRDBA minus LoRA) with 95% intervals, the seed spread (sample std of
    each one's loss over seeds), and whether it matches: loss difference within the larger spread and
    the exact-match interval reaching 0 or above."""
    groups, draws = series(points), shared_draws(points)
    ref = groups.get(reference)
    if ref is None:
        return []
    spread = statistics.stdev(p["eval_loss"] for p in ref) if len(ref) > 1 else 0.0
    rows = []
    for (family, label), ps in sorted(groups.items(), key=lambda kv: kv[1][0]["bpw"]):
        if family not in TRAINED_LORDBA or len(ps) != len(ref):
            continue
        own = statistics.stdev(p["eval_loss"] for p in ps) if len(ps) > 1 else 0.0
        row = {"series": f"{family} {label}", "bpw": ps[0]["bpw"], "loss": _mean(ps, "eval_loss"),
               "metric": _mean(ps, "metric"), "loss_spread": max(spread, own), **_paired(ps, ref, draws)}  # fmt: skip
        metric_ci = row["metric_diff_ci"]
        loss_ok = abs(row["eval_loss_diff"]) <= row["loss_spread"] or row["eval_loss_diff"] < 0
        metric_ok = metric_ci is None or metric_ci[1] >= 0
        row["in_target_size"] = ps[0]["bpw"] <= TRAINED_MAX_BPW + 1e-9
        row["verdict"] = "matches" if loss_ok and metric_ok else "behind"
        rows.append(row)
    return rows


def trained_vs_matched_lora(points: list[dict]) -> list[dict]:
    """Per trained LoRDBA series: the fp16 LoRA trained at the nearest payload size (:data:`LORA_SMALL`,
    r=1, 2 with ``--all-sizes``), its bytes against LoRDBA's, and the paired loss and exact-match
    differences (LoRDBA minus LoRA) with 95% intervals; ``verdict``: :func:`_sign` of the loss interval.
    Empty without trained small LoRAs."""
    groups, draws = series(points), shared_draws(points)
    small = [(k, ps) for k, ps in groups.items() if k[0] == LORA_SMALL]
    rows = []
    for (family, label), ps in sorted(groups.items(), key=lambda kv: kv[1][0]["bpw"]):
        fits = [(k, q) for k, q in small if len(q) == len(ps)] if family in TRAINED_LORDBA else []
        if not fits:
            continue
        (lf, ll), lora = min(fits, key=lambda kv: abs(kv[1][0]["bytes"] - ps[0]["bytes"]))
        row = {"series": f"{family} {label}", "bpw": ps[0]["bpw"], "loss": _mean(ps, "eval_loss"),
               "lora": f"{lf} {ll}", "lora_bpw": lora[0]["bpw"], "lora_loss": _mean(lora, "eval_loss"),
               "bytes_ratio": ps[0]["bytes"] / lora[0]["bytes"], **_paired(ps, lora, draws)}  # fmt: skip
        row["verdict"] = _sign(row["eval_loss_diff_ci"])
        rows.append(row)
    return rows


def allocation_vs_uniform(points: list[dict]) -> list[dict]:
    """Per variant of :data:`AGAINST_UNIFORM` and uniform rank ``r``: the variant's conversion at r's file
    size against the uniform ptq conversion at rank r, paired by seed — held-out loss and exact match
    (variant minus uniform: negative loss is better), file bytes of each, and in how many seeds the
    variant won; ``metric_diff_mean`` None for a task without a metric."""
    by_key = {(p["seed"], p["family"], p["label"]): p for p in points}
    pairs: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for p in points:
        if p["family"] in AGAINST_UNIFORM:
            r = p["at_rank"]
            uniform = by_key.get((p["seed"], LORDBA_PTQ, f"r={r}"))
            if uniform is not None:
                pairs.setdefault((p["family"], r), []).append((p, uniform))
    order = list(AGAINST_UNIFORM)
    rows = []
    for (family, r), ps in sorted(pairs.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        d_loss = [a["eval_loss"] - u["eval_loss"] for a, u in ps]
        scored = all(a.get("metric") is not None and u.get("metric") is not None for a, u in ps)  # a corpus: none
        d_metric = [a["metric"] - u["metric"] for a, u in ps] if scored else []
        rows.append({
            "family": family, "variant": AGAINST_UNIFORM[family], "uniform_rank": r, "seeds": len(ps),
            "uniform_file_bytes": ps[0][1].get("file_bytes"), "allocated_file_bytes": ps[0][0].get("file_bytes"),
            "uniform_loss_mean": statistics.fmean(u["eval_loss"] for _, u in ps),
            "allocated_loss_mean": statistics.fmean(a["eval_loss"] for a, _ in ps),
            "loss_diff_mean": statistics.fmean(d_loss),
            "loss_diff_std": statistics.stdev(d_loss) if len(ps) > 1 else 0.0,
            "metric_diff_mean": statistics.fmean(d_metric) if d_metric else None,
            "allocated_wins": sum(d < 0 for d in d_loss),
            "uniform_rel_error": statistics.fmean(u["rel_error"] for _, u in ps),
            "allocated_rel_error": statistics.fmean(a["rel_error"] for a, _ in ps),
            "rank_histogram": ps[0][0].get("rank_histogram"),
        })  # fmt: skip
    return rows


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties share their mean rank
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-300))
