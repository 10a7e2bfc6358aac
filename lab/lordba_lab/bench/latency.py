"""Latency of the adapter branch and of the demo model: packed LoRDBA vs fp16 LoRA vs the base alone.

Cases (rows of ``bench.json``):

* ``branch-decode`` (≤ 16 tokens) / ``branch-prefill`` (more): the branch alone on the layer
  shapes of SmolLM2-135M (576→576, 576→192, 576→1536, 1536→576) and Llama-7B (4096→4096,
  4096→11008, 11008→4096), r ∈ {8, 16, 32, 64}, tokens ∈ {1, 16, 128, 512, 2048}. LoRDBA: the
  layer's inference entry point (:func:`lordba.kernels.packed_branch`, ``auto`` mode); LoRA:
  ``lora_B(lora_A(x)) · s`` as PEFT computes it; base: the ``nn.Linear`` alone, for the overhead
  ratio ``(base + branch) / base``.
* ``model-prefill`` (512 tokens, no cache) and ``model-decode`` (one token after a 512-token
  context, with a KV cache): SmolLM2-135M with the same adapters on q/k/v/o/gate/up/down, on the
  4-bit HQQ base the product trains on (the set-up's cached one); the full run adds the
  unquantized base at r=16.

All variants of a case are timed in one process, interleaved (:mod:`._timing`); reported are
medians and interquartile ranges, ``ratio_vs_lora`` (ratio of the medians) and ``ratio_paired``
(median of the round-by-round ratios, robust to drift). Activations are float32 (the demo
model's dtype on CPU), and the LoRA factors are held in float32 as PEFT does (fp16 is their
*file* format). A prefill profile (:func:`._latency_model.prefill_profile`) splits the adapted
layers' time into base and adapter per target module. Writes ``bench.json`` (a list of rows),
``prefill_profile.json``, ``latency_meta.json`` (hardware, settings, load), ``bench.md`` and
``latency_overhead.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware
from lordba_lab.bench._latency_model import SCALE_DTYPE
from lordba_lab.bench._timing import interleaved, load, paired_ratio, torch_threads
from lordba_lab.outputs import save_figure, write_text

SUITE = "latency"
HELP = "adapter latency: packed LoRDBA vs fp16 LoRA vs base, branch alone and SmolLM2 end to end"
DEFAULT = True

DEMO_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = (8, 16, 32, 64)
TOKENS = (1, 16, 128, 512, 2048)
DECODE_MAX = 16


def _branch_case(in_f: int, out_f: int, r: int, tokens: int, budget_s: float) -> dict:
    from lordba import kernels
    from lordba.core.scales import get_codec
    from lordba.core.ste import STE
    from lordba.nn.adapter import TrainableAdapter

    torch.manual_seed(r + tokens)
    s = 2.0
    x = torch.randn(tokens, in_f)
    base = nn.Linear(in_f, out_f, bias=False)
    lora_A, lora_B = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=False)
    # packed signs, float32 scales decoded once (the branch alone; served adapters hold int8 codes)
    adapter = TrainableAdapter(in_f, out_f, r, s, get_codec(SCALE_DTYPE), STE(), init="random").freeze_signs()
    adapter.requires_grad_(False)
    fns = {"base": lambda: base(x), "lora": lambda: lora_B(lora_A(x)) * s, "lordba": lambda: adapter(x)}
    with torch.inference_mode():
        st = interleaved(fns, budget_s)
    limit = kernels.sign_max_tokens(in_f, out_f, r, torch.float32) if kernels.cpu_available() else -1
    lordba_mem = (r * in_f + 7) // 8 + (out_f * r + 7) // 8 + 4 * (in_f + r + out_f)
    return {
        "case": "branch-decode" if tokens <= DECODE_MAX else "branch-prefill",
        "shape": f"{in_f}x{out_f}",
        "in": in_f,
        "out": out_f,
        "r": r,
        "tokens": tokens,
        "path": "sign" if tokens <= limit else "unpack" if limit >= 0 else "torch",
        **_timings(st),
        "overhead_lordba": (st["base"].median + st["lordba"].median) / st["base"].median,
        "overhead_lora": (st["base"].median + st["lora"].median) / st["base"].median,
        "lordba_mem_bytes": lordba_mem,
        "lora_mem_bytes": 4 * r * (in_f + out_f),
        "lordba_disk_bytes": lordba_mem - 3 * (in_f + out_f),  # int8 b and a, float32 m on disk
        "lora_disk_bytes": 2 * r * (in_f + out_f),
    }


def _timings(st: dict) -> dict:
    row = {}
    for k in ("lordba", "lora", "base"):
        row[f"{k}_s"] = st[k].median
        row[f"{k}_iqr_s"] = st[k].iqr
        row[f"{k}_n"] = st[k].n
    row["ratio_vs_lora"] = st["lordba"].median / st["lora"].median
    paired = paired_ratio(st["lordba"], st["lora"])
    row["ratio_paired"], row["ratio_paired_iqr"] = paired.median, paired.iqr
    return row


def _model_rows(ranks: tuple[int, ...], base: str, quick: bool, profile: list | None = None) -> list[dict]:
    """Rows of the whole-model cases; with ``profile`` (a list), the r=16 prefill profile is
    appended to it."""
    from lordba_lab.assets import load_model_and_tokenizer
    from lordba_lab.assets.models import resolve_model_path
    from lordba_lab.bench._latency_model import adapter_bytes, prefill_profile, time_model, variants

    model, _ = load_model_and_tokenizer()
    rows = []
    for r in tqdm(ranks, desc=f"demo model, base {base}", leave=False):
        models = variants(model, r, base, source=resolve_model_path(None))
        timed = time_model(models, prompt=512, budget_s=20.0 if quick else 60.0, quick=quick)
        if profile is not None and r == 16:
            profile += [{"base": base, "r": r, **x} for x in prefill_profile(models, 512, reps=3 if quick else 8)]
        sizes = adapter_bytes(models)
        for case, st in timed.items():
            rows.append(
                {
                    "case": case,
                    "shape": f"SmolLM2-135M base={base}",
                    "r": r,
                    "tokens": 512 if case == "model-prefill" else 1,
                    **_timings(st),
                    "overhead_lordba": st["lordba"].median / st["base"].median,
                    "overhead_lora": st["lora"].median / st["base"].median,
                    **sizes,
                }
            )
        del models
    return rows


def run(out_dir: Path, quick: bool, base: str | None = None, threads: int | None = None) -> list[Path]:
    """Measure, print and write the suite's files into ``out_dir`` (see the module docstring).

    ``base``: quantization of the demo model's base (``none``, ``hqq``, ``bnb``; default
    ``$LORDBA_BENCH_BASE`` or ``hqq``; the full run adds ``none`` at r=16); ``threads``: torch
    threads (default ``$LORDBA_BENCH_THREADS``, else torch's). On a machine shared with other
    processes use 1: with 2 threads every parallel region waits for a thread the scheduler has
    parked, and the times jump by whole time slices.
    """
    from lordba.quant.quantize import DEFAULT_BACKEND

    base = base or os.environ.get("LORDBA_BENCH_BASE", DEFAULT_BACKEND)
    with torch_threads(threads or int(os.environ.get("LORDBA_BENCH_THREADS", "0"))):
        return _run(Path(out_dir), quick, base)


def _run(out_dir: Path, quick: bool, base: str) -> list[Path]:
    """:func:`run`'s measurement, with torch's threads set."""
    from lordba import kernels

    kernels.cpu_available()  # build (or load) the kernels before anything is timed
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = DEMO_SHAPES if quick else DEMO_SHAPES + LLAMA_SHAPES
    ranks, tokens = ((16,), (1, 16, 512)) if quick else (RANKS, TOKENS)
    load_before = load()
    cells = [(i, o, r, t) for (i, o) in shapes for r in ranks for t in tokens]
    rows = [_branch_case(i, o, r, t, 0.3 if quick else 1.5) for i, o, r, t in tqdm(cells, desc="branch")]
    profile: list[dict] = []
    rows += _model_rows((16,) if quick else RANKS, base, quick, profile)
    if not quick and base != "none":
        rows += _model_rows((16,), "none", quick, profile)
    meta = {
        "hardware": hardware(),
        "kernels": {"isa": kernels.cpu_isa(), "cpu_ext": kernels.cpu_available(), "mode": kernels.get_mode()},
        "settings": {
            "quick": quick,
            "base": base,
            "activation_dtype": "float32",
            "lora_dtype_in_memory": "float32",
            "lordba_scale_dtype": SCALE_DTYPE,
        },
        "load_avg_before": load_before,
        "load_avg_after": load(),
    }
    files = [
        out_dir / "bench.json",
        out_dir / "prefill_profile.json",
        out_dir / "latency_meta.json",
        out_dir / "bench.md",
    ]
    write_text(files[0], json.dumps(rows, indent=1) + "\n")
    write_text(files[1], json.dumps(profile, indent=1) + "\n")
    write_text(files[2], json.dumps(meta, indent=1) + "\n")
    write_text(files[3], report(rows, meta, profile))
    png = _plot(rows, out_dir / "latency_overhead.png")
    return [*files, *([png] if png else [])]


COLUMNS = [
    "case",
    "shape",
    "r",
    "tokens",
    "path",
    "LoRDBA ms",
    "LoRA ms",
    "base ms",
    "LoRDBA/LoRA",
    "paired",
    "IQR %",
    "ovh LoRDBA",
    "ovh LoRA",
]


def _table_rows(rows: list[dict]) -> list[list]:
    out = []
    for x in rows:
        spread = 100 * max(x[f"{k}_iqr_s"] / x[f"{k}_s"] for k in ("lordba", "lora", "base"))
        out.append(
            [x["case"], x["shape"], x["r"], x["tokens"], x.get("path", ""), 1e3 * x["lordba_s"], 1e3 * x["lora_s"],
             1e3 * x["base_s"], x["ratio_vs_lora"], f"{x['ratio_paired']:.3f} ± {x['ratio_paired_iqr'] / 2:.3f}",
             spread, x["overhead_lordba"], x["overhead_lora"]]
        )  # fmt: skip
    return out


PROFILE_COLUMNS = ["base", "target", "base ms", "LoRA adds ms", "LoRDBA adds ms", "LoRDBA/LoRA adds", "% of LoRA model"]


def _profile_rows(profile: list[dict]) -> list[list]:
    return [
        [x["base"], x["target"], 1e3 * x["lora_base_s"], 1e3 * x["lora_adapter_s"], 1e3 * x["lordba_adapter_s"],
         x["adapter_ratio"], 100 * (x["lordba_adapter_s"] - x["lora_adapter_s"]) / x["lora_model_s"]]
        for x in profile
    ]  # fmt: skip


def report(rows: list[dict], meta: dict, profile: list[dict] | None = None) -> str:
    """``bench.md``: the tables, the prefill profile, the adapter bytes and the conditions of the run."""
    models = [x for x in rows if x["case"].startswith("model")]
    branch16 = [x for x in rows if x["case"].startswith("branch") and x["r"] == 16]
    print_table("latency: whole model", COLUMNS, _table_rows(models))
    print_table("latency: branch alone, r=16", COLUMNS, _table_rows(branch16))
    hw = meta["hardware"]
    lines = [
        "# Latency: packed LoRDBA vs fp16 LoRA vs base\n",
        f"CPU: {hw['cpu']} ({hw['cores']} cores, torch threads {hw['torch_threads']}), torch {hw['torch']}, "
        f"kernels: {meta['kernels']}; base: {meta['settings']['base']}; activations float32; "
        f"LoRDBA scales {meta['settings']['lordba_scale_dtype']}. "
        f"Load average before/after: {meta['load_avg_before'][0]:.2f} / {meta['load_avg_after'][0]:.2f}.\n",
        "Medians of interleaved runs; `LoRDBA/LoRA`: ratio of the medians; `paired`: median of the round-by-round "
        "ratios ± half their IQR; `IQR %`: the largest interquartile range of the three, relative to its median; "
        "`ovh`: (base + adapter) / base.\n",
        "## Whole model (SmolLM2-135M)\n",
        markdown_table(COLUMNS, _table_rows(models)),
        "\nAdapter bytes (model and base, r: LoRDBA memory / LoRA memory, LoRDBA file / fp16 LoRA file):\n",
    ]
    for x in {(x["shape"], x["r"]): x for x in models}.values():  # one line per variant measured
        lines.append(
            f"- {x['shape']}, r={x['r']}: memory {x['lordba_mem_bytes']:,} / {x['lora_mem_bytes']:,} B, "
            f"disk {x['lordba_disk_bytes']:,} / {x['lora_disk_bytes']:,} B "
            f"({x['lora_disk_bytes'] / x['lordba_disk_bytes']:.1f}× smaller)\n"
        )
    if profile:
        print_table("prefill profile, r=16", PROFILE_COLUMNS, _profile_rows(profile))
        lines += [
            "\n## Prefill profile, r=16 (512 tokens)\n\n",
            "Wall time of the adapted layers split by forward hooks into their base layer and what the adapter adds "
            "(layer − base), summed over the 30 blocks, medians of interleaved prefills; the last column is the "
            "difference LoRDBA − LoRA as a share of the LoRA model's prefill time.\n\n",
            markdown_table(PROFILE_COLUMNS, _profile_rows(profile)),
        ]
    lines += [
        "\n## Branch alone, all cases\n",
        markdown_table(COLUMNS, _table_rows([x for x in rows if x not in models])),
    ]
    return "".join(lines)


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        return None
    branch = [x for x in rows if x["case"].startswith("branch")]
    rank = 16 if any(x["r"] == 16 for x in branch) else branch[0]["r"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for shape in dict.fromkeys(x["shape"] for x in branch):
        pts = sorted((x["tokens"], x) for x in branch if x["shape"] == shape and x["r"] == rank)
        ts = [t for t, _ in pts]
        (line,) = ax.plot(ts, [x["overhead_lordba"] for _, x in pts], marker="o", label=f"LoRDBA {shape}")
        ax.plot(ts, [x["overhead_lora"] for _, x in pts], ls="--", color=line.get_color(), label=f"LoRA {shape}")
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("(base + adapter) / base")
    ax.set_title(f"Adapter overhead per layer, r={rank} (solid: LoRDBA packed, dashed: fp16 LoRA)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
