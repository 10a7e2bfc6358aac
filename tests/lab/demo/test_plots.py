"""The sweep plot: a loss-only panel for tasks without a metric, and an axis the adapters stay readable on."""

import matplotlib.pyplot as plt
import pytest

from lordba_lab.demo import plots


def row(family, label, bpw, loss, metric=None, reference=False):
    return {"family": family, "label": label, "bpw": bpw, "eval_loss_mean": loss, "eval_loss_std": 0.01,
            "eval_loss_ci": [loss - 0.02, loss + 0.02], "metric_mean": metric, "metric_std": None,
            "metric_ci": None, "reference": reference}  # fmt: skip


@pytest.fixture
def figures(monkeypatch):
    kept, close = [], plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def corpus_summary():
    return [row("base", "", 0.0, 4.46), row("fp16 LoRA", "r=16", 16.0, 3.74, reference=True),
            row("LoRDBA ptq", "r=16", 1.5, 3.75), row("RTN", "1-bit g64", 1.5, 6.83),
            row("RTN", "2-bit g64", 2.5, 3.747)]  # fmt: skip


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_task_without_a_metric_gets_the_loss_panel_only_with_worse_than_base_points_off_scale(figures, tmp_path):
    plots.sweep(corpus_summary(), tmp_path / "sweep.png", "exact match", "sotu")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_ylabel().startswith("held-out loss")
    low, top = ax.get_ylim()
    assert 4.46 < top < 6.83 and low < 3.74 - 0.02  # the base shown, 1-bit RTN (worse than no adapter) is not
    assert "RTN 1-bit g64: 6.83 (off scale)" in legend_texts(ax)


def test_a_task_with_a_metric_keeps_both_panels(figures, tmp_path):
    summary = [{**r, "metric_mean": 0.5, "metric_std": 0.05} for r in corpus_summary()]
    plots.sweep(summary, tmp_path / "sweep.png", "exact match", "task")
    assert [ax.get_ylabel() for ax in figures[0].axes[:2]] == ["exact match", "held-out loss (lower is better)"]


def test_the_demo_figure_names_the_payload_bytes_it_plots(figures, tmp_path):
    """The rows' ``bytes`` are the tensor payload (the file's size is ``file_bytes``): the axis said "on disk"."""
    lora = {"method": "fp16 LoRA r=16", "mode": None, "bytes": 9000, "file_bytes": 9500, "metric": 0.5, "eval_loss": 1}
    rows = [lora, {"method": "base", "mode": None, "bytes": 0, "metric": 0.1, "eval_loss": 2.0}]
    plots.quality_vs_bytes(rows, tmp_path / "q.png", "exact match")
    labels = [ax.get_xlabel() for ax in figures[0].axes]
    assert all("payload" in lab and "on disk" not in lab for lab in labels)
