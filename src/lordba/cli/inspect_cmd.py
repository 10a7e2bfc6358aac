"""``lordba inspect DIR``: validate an adapter directory and show its size and checksum, modules in
natural order (``layers.2`` before ``layers.10``), and how to use it where LoRDBA is not known."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

from lordba._util.tables import print_table
from lordba.config import COMPACT_FORMAT_VERSION, FORMAT_VERSION
from lordba.format.adapter import read_adapter
from lordba.format.sizes import SizeReport, adapter_file_bytes, lora_file_bytes, size_report

NAME = "inspect"
HELP = "validate a LoRDBA adapter directory and report layers, ranks, bytes, BPW and ratio vs fp16 LoRA"

COMPAT_HINT = (
    "this is a LoRDBA adapter, not a PEFT LoRA: transformers' load_adapter, PeftModel.from_pretrained and "
    "AutoPeftModelForCausalLM cannot read it (KeyError: 'LORDBA'). Load it with lordba "
    "(LoRDBAModel.from_pretrained(base_model, DIR) or AutoLoRDBAModelForCausalLM.from_pretrained(DIR)), or run "
    "`lordba export-lora DIR OUT` to get a plain PEFT LoRA for PEFT, vLLM and other LoRA runtimes."
)


def natural_key(name: str) -> tuple:
    """Sort key of a module path with its numbers compared as numbers (``layers.2`` < ``layers.10``).

    Args:
        name: a dotted module path.

    Returns:
        A tuple that orders paths naturally (text parts and numbers never compared with each other). A run of
        ASCII digits is compared as a number by its length and digits without leading zeros, never converted
        with ``int`` (a run longer than Python's 4300-digit limit, or a non-ASCII digit such as ``²`` that
        ``str.isdigit`` accepts, raised ``ValueError``).
    """
    parts = re.split(r"([0-9]+)", name)
    return tuple((0, len(p.lstrip("0")), p.lstrip("0")) if i % 2 else (1, 0, p) for i, p in enumerate(parts))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="adapter directory (adapter_config.json + lordba_model.safetensors)")
    from lordba.cli import positive_int

    p.add_argument(
        "--r-ref",
        type=positive_int,
        default=None,
        help="rank of the fp16 LoRA to compare with (default: the source LoRA's ranks that `lordba convert` recorded "
        "in conversion_report.json, else the adapter's own ranks)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    adapter = read_adapter(args.directory)  # full validation: checksum, header, every tensor
    dims = {p: (m.in_features, m.out_features, m.r) for p, m in adapter.modules.items()}
    # tensors trained in full (modules_to_save, biases) are counted apart, as `lordba convert` and size_report do:
    # the sizes, BPW and ratios are the LoRDBA branches' (the fp16 LoRA compared with has no such tensors either)
    extra_bytes = sum(t.numel() * t.element_size() for t in adapter.extras.values())
    file_bytes = adapter.weights_bytes
    if adapter.extras:  # the same file without them (version 2 is version 1 with extras)
        layout = COMPACT_FORMAT_VERSION if adapter.format_version == COMPACT_FORMAT_VERSION else FORMAT_VERSION
        file_bytes = adapter_file_bytes(dims, adapter.config.scale_dtype, layout)
    # the whole digest: docs/security.md has users pin an adapter by comparing it with a trusted one
    checksum = f"ok (sha256 {adapter.sha256})" + (" [recovered from an interrupted save]" if adapter.recovered else "")
    conversion = _conversion_sidecar(args.directory, adapter.sha256)
    # as `lordba convert` printed it: BPW and ratios against the source LoRA's ranks, where the sidecar records them
    lora_ranks = None if args.r_ref is not None else _source_lora_ranks(conversion, dims)
    if lora_ranks is None:
        report = size_report(dims, adapter.config.scale_dtype, file_bytes=file_bytes, r_ref=args.r_ref)
        r_ref = "--r-ref" if args.r_ref is not None else "the adapter's own ranks"
    else:
        report = _size_against(dims, adapter.config.scale_dtype, file_bytes, lora_ranks)
        r_ref = "the source LoRA's ranks (conversion_report.json)"
    report = dataclasses.replace(report, modules=sorted(report.modules, key=lambda m: natural_key(m.path)))
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(args.directory),
                    "config": adapter.config.to_dict(adapter.format_version),  # the file's version
                    "checksum": checksum,
                    "sha256": adapter.sha256,
                    "size": report.to_dict(),
                    "r_ref": r_ref,
                    "extra_tensor_bytes": extra_bytes,
                    "weights_file_bytes": adapter.weights_bytes,
                    "hint": COMPAT_HINT,
                    **({"conversion": conversion} if conversion is not None else {}),
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
    print(f"fp16 LoRA compared with (r_ref): {r_ref}" + ("" if args.r_ref is not None else "; --r-ref N for rank N"))
    if extra_bytes:
        print(
            f"plus {extra_bytes:,} bytes of tensors trained in full (modules_to_save, biases): "
            f"the weights file is {adapter.weights_bytes:,} bytes"
        )
    if conversion is not None:
        _print_conversion(conversion)
    print(f"note: {COMPAT_HINT}")
    return 0


def _source_lora_ranks(conversion: dict | None, dims: dict[str, tuple[int, int, int]]) -> dict[str, int] | None:
    """The source LoRA's rank of each module (``r_lora``) that the conversion sidecar records; None unless it
    records a positive integer for every module of the adapter."""
    layers = conversion.get("layers") if conversion is not None else None
    if not isinstance(layers, list):
        return None
    recorded = {lr.get("path"): lr.get("r_lora") for lr in layers if isinstance(lr, dict)}
    ranks = {path: recorded.get(path) for path in dims}
    ok = all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks.values())
    return ranks if ok else None


def _size_against(
    dims: dict[str, tuple[int, int, int]], scale_dtype: str, file_bytes: int, ranks: dict[str, int]
) -> SizeReport:
    """:func:`size_report` against an fp16 LoRA of rank ``ranks[path]`` for each module (one ``r_ref`` each), as
    :mod:`lordba.convert.report` counts a LoRA whose layers have different ranks."""
    whole = size_report(dims, scale_dtype, file_bytes=file_bytes)
    modules = [size_report({m.path: dims[m.path]}, scale_dtype, 1, ranks[m.path]).modules[0] for m in whole.modules]
    lora_payload = sum(m.fp16_lora_bytes for m in modules)
    lora_file = lora_file_bytes({m.path: (m.in_features, m.out_features, m.r_ref) for m in modules})
    return dataclasses.replace(
        whole,
        modules=modules,
        fp16_lora_payload_bytes=lora_payload,
        fp16_lora_file_bytes=lora_file,
        bpw_lora=8 * file_bytes / sum(m.r_ref * (m.in_features + m.out_features) for m in modules),
        ratio_payload=lora_payload / whole.payload_bytes,
        ratio_file=lora_file / file_bytes,
    )


def _conversion_sidecar(directory: str, sha256: str) -> dict | None:
    """The ``conversion_report.json`` written by ``lordba convert``, if present (informational: an
    unreadable one is reported, never fatal); one recording another weights file's ``weights_sha256`` (the
    adapter was saved again into the folder since: trained, re-converted) is reported as stale, not shown."""
    from pathlib import Path

    from lordba._util.jsonio import read_json_file
    from lordba.errors import LoRDBAError

    path = Path(directory) / "conversion_report.json"
    if not path.is_file():
        return None
    try:
        report = read_json_file(path, max_bytes=16 << 20)
    except LoRDBAError as err:
        return {"error": str(err)}
    recorded = report.get("weights_sha256") if isinstance(report, dict) else None
    if recorded is not None and recorded != sha256:
        return {
            "stale": "left out: it describes another weights file (the adapter was saved again since it was converted)"
        }
    return report


def _print_conversion(conv: dict) -> None:
    if "stale" in conv:
        print(f"conversion report: {conv['stale']}")
        return
    if "error" in conv or not isinstance(conv.get("layers"), list):
        print(f"conversion report: unreadable ({conv.get('error', 'no layers')})")
        return
    rows = [
        (lr.get("path"), lr.get("r_lora"), lr.get("r"), lr.get("rel_error"), lr.get("rmr_A"), lr.get("rmr_B"))
        for lr in sorted(
            (lr for lr in conv["layers"] if isinstance(lr, dict)), key=lambda lr: natural_key(str(lr.get("path")))
        )
    ]
    print_table("conversion (stored errors of ΔW)", ["module", "r LoRA", "r", "rel err", "RMR A", "RMR B"], rows)
    totals = conv.get("totals")
    totals = totals if isinstance(totals, dict) else {}
    print(f"conversion from {conv.get('source')}: relative error of ΔW {totals.get('rel_error')}")
