"""``lordba inspect DIR``: validate an adapter directory and show its size and checksum."""

from __future__ import annotations

import argparse
import json

from ..footprint import size_report
from ..io import read_adapter
from ..tables import print_table

NAME = "inspect"
HELP = "validate a LoRDBA adapter directory and report layers, ranks, bytes, BPW and ratio vs fp16 LoRA"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="adapter directory (adapter_config.json + lordba_model.safetensors)")
    p.add_argument("--r-ref", type=int, default=None, help="rank of the fp16 LoRA to compare with (default: same rank)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    adapter = read_adapter(args.directory)  # full validation: checksum, header, every tensor
    dims = {p: (m.in_features, m.out_features, m.r) for p, m in adapter.modules.items()}
    report = size_report(dims, adapter.config.scale_dtype, file_bytes=adapter.weights_bytes, r_ref=args.r_ref)
    checksum = (
        "ok (sha256 "
        + adapter.sha256[:16]
        + "…)"
        + (" [recovered from an interrupted save]" if adapter.recovered else "")
    )
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(args.directory),
                    "config": adapter.config.to_dict(),
                    "checksum": checksum,
                    "size": report.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    cfg = adapter.config
    print(
        f"adapter: {args.directory}\n  mode={cfg.mode} r={cfg.r} alpha={cfg.alpha:g} scale_dtype={cfg.scale_dtype} "
        f"base={cfg.base_model_name_or_path}\n  checksum: {checksum}"
    )
    rows = [
        (m.path, m.in_features, m.out_features, m.r, m.payload_bytes, m.bpw_lora, m.bpw_dw, m.ratio)
        for m in report.modules
    ]
    print_table("modules", ["module", "in", "out", "r", "bytes", "BPW (LoRA)", "BPW (dW)", "x vs fp16 LoRA"], rows)
    print_table(
        "total",
        ["", "LoRDBA", "fp16 LoRA (r_ref)", "ratio"],
        [
            ("file bytes", report.file_bytes, report.fp16_lora_file_bytes, report.ratio_file),
            ("payload bytes", report.payload_bytes, report.fp16_lora_payload_bytes, report.ratio_payload),
            ("BPW, LoRA basis (file)", report.bpw_lora, 16.0, None),
            ("BPW, dW basis (file)", report.bpw_dw, None, None),
        ],
    )
    return 0
