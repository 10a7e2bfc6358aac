"""The conversion report: per layer and in total, as a terminal table, JSON and Markdown.

Errors are relative Frobenius errors of ΔW computed on the stored adapter. The total is weighted by
‖ΔW‖: ``sqrt(Σ_l ε_l² ‖ΔW_l‖² / Σ_l ‖ΔW_l‖²)`` (the relative error of all layers stacked). BPW on the
LoRA basis divides by the *source LoRA's* parameters, ``Σ_l r_lora,l (in_l + out_l)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lordba._util.tables import markdown_table, print_table
from lordba.format.atomic import atomic_write_bytes
from lordba.format.sizes import SizeReport

SIDECAR_NAME = "conversion_report.json"
_LAYER_COLUMNS = ["module", "in", "out", "r LoRA", "r", "rel err", "init err", "RMR A", "RMR B", "RMR A*", "RMR B*",
                  "iters", "bytes", "BPW (LoRA)"]  # fmt: skip


@dataclass
class LayerReport:
    """One converted layer (RMR ``*``: of the pair seeding the solver, in the gauge used)."""

    path: str
    in_features: int
    out_features: int
    r_lora: int
    r: int
    lora_scaling: float
    delta_norm: float  # ‖ΔW‖_F of the LoRA
    rel_error: float
    rel_error_float: float
    rel_error_init: float
    rel_error_weighted: float | None
    rmr_A: float
    rmr_B: float
    rmr_A_gauge: float
    rmr_B_gauge: float
    gauge: str
    iterations: int
    payload_bytes: int
    bpw_lora: float
    bpw_dw: float

    def row(self) -> list[Any]:
        """This layer's values in the order of the report table's columns."""
        return [self.path, self.in_features, self.out_features, self.r_lora, self.r, self.rel_error,
                self.rel_error_init, self.rmr_A, self.rmr_B, self.rmr_A_gauge, self.rmr_B_gauge, self.iterations,
                self.payload_bytes, self.bpw_lora]  # fmt: skip


@dataclass
class ConversionReport:
    """Everything measured by one conversion."""

    source: str
    scale_dtype: str
    solver: dict[str, Any]
    layers: list[LayerReport]
    size: SizeReport
    bpw_lora: float  # file bits per source-LoRA parameter
    lora_fp16_file_bytes: int  # the source LoRA re-saved in fp16 at its own ranks
    allocation: dict[str, Any] | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # bytes of the tensors trained in full (modules_to_save, biases) stored beside the LoRDBA tensors: not in
    # ``size`` nor in a --target-bpw budget (stored as they are, whatever the budget)
    extra_tensor_bytes: int = 0

    @property
    def total_rel_error(self) -> float:
        """‖ΔW‖-weighted relative error over all layers."""
        num = sum((lr.rel_error * lr.delta_norm) ** 2 for lr in self.layers)
        den = sum(lr.delta_norm**2 for lr in self.layers)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def mean_rel_error(self) -> float:
        """Unweighted mean of the layers' relative errors (0 without layers)."""
        return sum(lr.rel_error for lr in self.layers) / max(len(self.layers), 1)

    def totals(self) -> dict[str, Any]:
        """Whole-adapter figures: errors, bytes, size ratio and BPW (of the LoRDBA tensors and their header), and
        the bytes of the tensors trained in full stored beside them, as a dict."""
        return {
            "layers": len(self.layers),
            "rel_error": self.total_rel_error,
            "mean_rel_error": self.mean_rel_error,
            "max_rel_error": max((lr.rel_error for lr in self.layers), default=0.0),
            "file_bytes": self.size.file_bytes,
            "payload_bytes": self.size.payload_bytes,
            "lora_fp16_file_bytes": self.lora_fp16_file_bytes,
            "ratio_vs_lora_fp16_file": self.lora_fp16_file_bytes / self.size.file_bytes,
            "bpw_lora": self.bpw_lora,
            "bpw_dw": self.size.bpw_dw,
            "extra_tensor_bytes": self.extra_tensor_bytes,
        }

    def to_dict(self, timing: bool = True) -> dict[str, Any]:
        """JSON-ready; ``timing=False`` leaves out run-dependent fields (for the deterministic sidecar)."""
        out = {
            "source": self.source,
            "scale_dtype": self.scale_dtype,
            "solver": self.solver,
            "totals": self.totals(),
            "allocation": self.allocation,
            "layers": [asdict(lr) for lr in self.layers],
            "size": self.size.to_dict(),
            **self.extra,
        }
        if timing:
            out["seconds"] = self.seconds
        return out

    def write_json(self, path: str | Path, timing: bool = True, weights_sha256: str | None = None) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``, whole or not at all (an earlier file there stays as
        it was if the write fails), and return it; ``weights_sha256`` (the sidecar's: the converted weights
        file's digest, so that ``lordba inspect`` shows the report only beside those weights) is added where
        given. ``OSError`` if it cannot be written, ``LoRDBAError`` if its folder cannot be made."""
        path = Path(path)
        data = self.to_dict(timing) | ({"weights_sha256": weights_sha256} if weights_sha256 else {})
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    def write_markdown(self, path: str | Path) -> Path:
        """Write :meth:`to_markdown` to ``path`` as :meth:`write_json` writes the JSON; returns it."""
        path = Path(path)
        atomic_write_bytes(path, self.to_markdown().encode())
        return path

    def _total_rows(self) -> list[list[Any]]:
        t = self.totals()
        rows = [
            ["layers", t["layers"]],
            ["relative error of ΔW (‖ΔW‖-weighted)", t["rel_error"]],
            ["mean / max layer relative error", f"{t['mean_rel_error']:.4f} / {t['max_rel_error']:.4f}"],
            ["file bytes (LoRDBA)", t["file_bytes"]],
            ["file bytes (source LoRA in fp16)", t["lora_fp16_file_bytes"]],
            ["size ratio (files)", t["ratio_vs_lora_fp16_file"]],
            ["BPW, LoRA basis (file)", t["bpw_lora"]],
            ["BPW, ΔW basis (file)", t["bpw_dw"]],
        ]
        if self.allocation:
            a = self.allocation
            rows += [
                ["budget: target BPW (LoRA basis)", a["target_bpw"]],
                [f"budget: allocated ranks, total rel. {a.get('objective', 'ΔW error')}", a["total_rel_error"]],
                [f"budget: uniform rank {a['uniform_rank']}, same", a["uniform_total_rel_error"]],
            ]
        if self.seconds is not None:
            rows.append(["seconds", self.seconds])
        return rows

    def to_markdown(self) -> str:
        """The report as Markdown: a totals table and a per-layer table."""
        return (
            f"# LoRDBA conversion of {self.source}\n\n## Total\n\n"
            + markdown_table(["", "value"], self._total_rows())
            + "\n## Layers\n\n"
            + markdown_table(_LAYER_COLUMNS, [lr.row() for lr in self.layers])
        )

    def print(self, max_layers: int = 40) -> None:
        """Print the per-layer table (the worst ``max_layers`` by error if there are more) and totals."""
        layers = self.layers
        title = "layers"
        if len(layers) > max_layers:
            layers = sorted(layers, key=lambda lr: -lr.rel_error)[:max_layers]
            title = f"layers (the {max_layers} with the largest error of {len(self.layers)})"
        print_table(title, _LAYER_COLUMNS, [lr.row() for lr in layers])
        print_table(f"conversion total (scale_dtype={self.scale_dtype})", ["", "value"], self._total_rows())
