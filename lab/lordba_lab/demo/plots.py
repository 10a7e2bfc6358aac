"""The demo's and the reproduction's figures (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lordba_lab.outputs import save_figure

_FAMILY_STYLE = {
    "LoRDBA": ("tab:red", "o"),
    "fp16 LoRA": ("tab:blue", "s"),
    "RTN": ("tab:gray", "v"),
    "LoRAQuant-style": ("tab:green", "^"),
    "BitDelta-style": ("tab:purple", "D"),
    "base": ("black", "x"),
}


_SWEEP_STYLE = {
    "LoRDBA ptq (float16 scales)": ("tab:orange", "o"),
    "LoRDBA qat": ("darkred", "*"),
    "LoRDBA scales-only": ("magenta", "P"),
    "LoRDBA ptq (allocated ranks)": ("saddlebrown", "h"),
    "LoRDBA ptq (int4 scales)": ("gold", "o"),
    "LoRDBA qat (int4 scales)": ("chocolate", "*"),
    "LoRDBA scales-only (int4 scales)": ("orchid", "P"),
    "LoRDBA ptq (calibrated)": ("olive", "o"),
    "LoRDBA ptq (allocated ranks, calibrated)": ("darkkhaki", "h"),
    "fp16 LoRA (trained at matched bytes)": ("navy", "s"),
}


def _family(method: str) -> str:
    return next((f for f in _FAMILY_STYLE if method.startswith(f)), "base")


def quality_vs_bytes(rows: list[dict], path: Path, metric_name: str) -> Path:
    """Task metric against adapter bytes (log scale): the paper's Fig. 1."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in ((axes[0], "metric", metric_name), (axes[1], "eval_loss", "held-out loss (lower is better)")):
        for row in rows:
            if row.get(key) is None or not row.get("bytes"):
                continue
            color, marker = _FAMILY_STYLE[_family(row["method"])]
            ax.scatter(row["bytes"], row[key], color=color, marker=marker, s=55, zorder=3)
            text = row["method"] + (f" ({row['mode']})" if row.get("mode") else "")
            ax.annotate(text, (row["bytes"], row[key]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        base = next((r for r in rows if r["method"] == "base"), None)
        values = [r[key] for r in rows if r.get(key) is not None and r.get("bytes")]
        if base is not None and base.get(key) is not None:
            if key == "eval_loss" and values and base[key] > 1.5 * max(values):  # keep the adapters readable
                ax.plot([], [], " ", label=f"base model: {base[key]:.3g} (off scale)")
            else:
                ax.axhline(base[key], color="black", lw=0.8, ls="--", label="base model")
            ax.legend(loc="best", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("adapter payload bytes (tensors incl. scales; log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Quality vs adapter size (same task, same budget, 4-bit base)")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path


def error_vs_rmr(layers: list[dict], path: Path) -> Path:
    """Per-layer relative reconstruction error of a PTQ conversion against the factors' RMR."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    x = [0.5 * (r["rmr_A"] + r["rmr_B"]) for r in layers]
    y = [r["rel_error"] for r in layers]
    kinds = sorted({r["module"].rsplit(".", 1)[-1] for r in layers})
    cmap = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        pts = [(a, b) for a, b, r in zip(x, y, layers) if r["module"].endswith(kind)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=cmap(i % 10), label=kind)
    ax.set_xlabel("mean residual-to-magnitude ratio of the LoRA factors (A, B)")
    ax.set_ylabel("relative reconstruction error of ΔW")
    ax.set_title("PTQ conversion: error is governed by the RMR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path


def _error_bars(rows: list[dict], key: str) -> list | list[list[float]]:
    """Asymmetric 95% intervals where every row has one, else the standard deviations."""
    if all(r.get(f"{key}_ci") for r in rows):
        return [
            [r[f"{key}_mean"] - r[f"{key}_ci"][0] for r in rows],
            [r[f"{key}_ci"][1] - r[f"{key}_mean"] for r in rows],
        ]
    return [r[f"{key}_std"] for r in rows]


def _zoom_loss(ax: plt.Axes, summary: list[dict], lines: list[dict]) -> None:
    """Keep the adapters near the fp16 LoRA readable: the loss axis stops at 2x the LoRA's loss, or a
    little above the base model's where that is lower (an adapter worse than none is off the scale), and
    the points above it are named in the legend with their value."""
    ref = next((r for r in summary if r.get("reference") and r["eval_loss_mean"] is not None), None)
    if ref is None:
        return
    top = 2.0 * ref["eval_loss_mean"]
    base = next((r["eval_loss_mean"] for r in summary if r["family"] == "base"), None)
    if base is not None and ref["eval_loss_mean"] < base < top:
        top = base + 0.3 * (base - ref["eval_loss_mean"])
    above = [r for r in lines if r["eval_loss_mean"] is not None and r["eval_loss_mean"] > top]
    if not above:
        return
    shown = [r for r in lines if r["eval_loss_mean"] is not None and r["eval_loss_mean"] <= top]
    low = min([(r.get("eval_loss_ci") or [r["eval_loss_mean"]])[0] for r in shown] + [ref["eval_loss_mean"]])
    ax.set_ylim(max(0.0, low - 0.05 * (top - low)), top)  # down to the lowest interval shown
    for r in above:
        ax.plot([], [], " ", label=f"{r['family']} {r['label']}: {r['eval_loss_mean']:.3g} (off scale)")


def sweep(summary: list[dict], path: Path, metric_name: str, setting: str = "") -> Path:
    """The BPW sweep (the paper's Fig. 3): metric and held-out loss against bits per weight, one line
    per method family, error bars = the 95% intervals where the summary has them (else the standard
    deviation over seeds); the fp16 LoRA r=16 and the base model as horizontal references. A task
    without a metric (a text corpus) gets the loss panel only."""
    panels = [("metric", metric_name), ("eval_loss", "held-out loss (lower is better)")]
    panels = [(k, lab) for k, lab in panels if any(r[f"{k}_mean"] is not None for r in summary)] or panels[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3 * (len(panels) == 1), 6.2), squeeze=False)
    axes = list(axes[0])
    for ax, (key, label) in zip(axes, panels):
        lines = [r for r in summary if r["family"] != "base" and not r.get("reference")]
        for family in dict.fromkeys(r["family"] for r in lines):
            pts = sorted(
                (r for r in lines if r["family"] == family and r[f"{key}_mean"] is not None), key=lambda r: r["bpw"]
            )
            if not pts:
                continue
            color, marker = _SWEEP_STYLE.get(family, _FAMILY_STYLE[_family(family)])
            ls = "--" if "qat" in family else "-"
            ax.errorbar(
                [r["bpw"] for r in pts],
                [r[f"{key}_mean"] for r in pts],
                yerr=_error_bars(pts, key),
                marker=marker,
                ls=ls,
                capsize=3,
                label=family,
                color=color,
            )
        for ref, style, name in (("reference", ("tab:blue", ":"), "fp16 LoRA r=16"), ("base", ("black", "--"), "base")):
            row = next(
                (r for r in summary if (r.get("reference") if ref == "reference" else r["family"] == "base")), None
            )
            if row is not None and row[f"{key}_mean"] is not None:
                top = max((r[f"{key}_mean"] for r in lines if r[f"{key}_mean"] is not None), default=0.0)
                if key == "eval_loss" and row[f"{key}_mean"] > 1.5 * top:  # keep the adapters readable
                    ax.plot([], [], " ", label=f"{name}: {row[f'{key}_mean']:.3g} (off scale)")
                    continue
                ax.axhline(row[f"{key}_mean"], color=style[0], ls=style[1], lw=1, label=name)
        if key == "eval_loss":
            _zoom_loss(ax, summary, lines)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight (LoRA r=16 basis, payload; log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # the series once, below the panels; each panel keeps its own notes (references, off-scale points)
    handles, labels = axes[0].get_legend_handles_labels()
    refs = ("base", "fp16 LoRA r=16")
    series = [(h, lab) for h, lab in zip(handles, labels) if lab not in refs and "off scale" not in lab]
    if series:
        fig.legend(*zip(*series), loc="lower center", ncol=4 if len(axes) > 1 else 3, fontsize=7, frameon=False)
    for ax in axes:
        notes = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in {x for _, x in series}]
        if notes:
            ax.legend(*zip(*notes), fontsize=7, loc="upper right")
    intervals = all(r.get("eval_loss_ci") for r in summary if r["family"] != "base")
    what = f"{setting}: quality" if setting else "Quality"
    fig.suptitle(f"{what} against adapter size (mean over seeds, {'95% interval' if intervals else '± std'})")
    fig.tight_layout(rect=(0, (0.17 if len(axes) > 1 else 0.14) if series else 0, 1, 1))
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path
