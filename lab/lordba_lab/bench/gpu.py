"""``lordba bench --suite gpu``: the Triton path on a CUDA GPU — the branch beside PEFT LoRA and the base,
and whole models (SmolLM2-135M and Llama-7B shapes, random bfloat16 weights) with each adapter.

* **branch** rows: one adapted linear layer, bfloat16 activations, r ∈ {16, 64}, tokens ∈ {1, 16, 64,
  256, 2048}, the layer shapes of SmolLM2-135M and Llama-7B. Variants: ``base`` (the bfloat16
  ``F.linear``), ``lora`` (``base + lora_B(lora_A(x)) · s`` as PEFT computes it, bfloat16 factors),
  ``lordba`` (:func:`lordba.kernels.packed_branch` as a packed layer calls it on a GPU: its int8 scale
  codes decoded once and kept, ``auto`` dispatch, the add into the base output fused), and ``sign`` /
  ``unpack`` (the two Triton strategies forced: where they cross sets ``DECODE_MAX_TOKENS``). Each in
  ``eager`` (Python launches) and ``graph`` (the same calls replayed from a CUDA graph) modes. Weights
  small enough stay in the GPU's L2 cache between calls, alike for every variant.
* **model** rows: prefill of 1 × 512 and 4 × 512 tokens (last position's logits) and one decode
  step of 1 and 16 sequences after a 512-token cache, eager; and the decode step of one sequence
  on a static cache replayed from a CUDA graph (measured last: a failed capture can end the process).
  Base alone, + PEFT LoRA r = 16 (bfloat16), + LoRDBA r = 16 (int8 scales, loaded packed from its
  file), on q/k/v/o/gate/up/down. The LoRDBA model's
  logits are checked against the pure-PyTorch reference of the same adapter (on a float32 copy).

Ratios are paired (per round) over the base; absolute times come with the GPU's name. Writes
``gpu.json``, ``gpu.md`` and ``gpu_overhead.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from lordba._util.tables import markdown_table, print_table
from lordba.errors import LoRDBAError
from lordba_lab.bench import hardware
from lordba_lab.bench._gpu_models import MODEL_SHAPES, RANK, build, model_rows
from lordba_lab.bench._gpu_timing import captured, interleaved_gpu
from lordba_lab.bench._timing import paired_ratio
from lordba_lab.outputs import save_figure, write_text

SUITE = "gpu"
HELP = "the Triton kernels on a CUDA GPU: branch and whole models (bf16), LoRDBA vs PEFT LoRA vs the base"
DEFAULT = False
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = (16, 64)
TOKENS = (1, 16, 64, 256, 2048)
VARIANTS = ("base", "lora", "lordba", "sign", "unpack")
PARTS = ("branch", "models")


def _branch_fns(in_f: int, out_f: int, r: int, tokens: int, device: str) -> dict:
    """The variants of one branch case, as functions of no arguments (inputs made here, seeded)."""
    import torch.nn.functional as F

    from lordba import kernels
    from lordba.core.packing import pack_signs
    from lordba.core.scales import get_codec
    from lordba.kernels import triton as tri

    g = torch.Generator().manual_seed(in_f * 7 + out_f + r + tokens)
    bf = torch.bfloat16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x = rand(tokens, in_f).to(device, bf)
    weight = (rand(out_f, in_f) / in_f**0.5).to(device, bf)
    lora_A, lora_B = (rand(r, in_f) / in_f**0.5).to(device, bf), (rand(out_f, r) / r).to(device, bf)
    sA, sB = pack_signs(rand(r, in_f)).to(device), pack_signs(rand(out_f, r)).to(device)
    b, m, a = torch.rand(in_f, generator=g) + 0.5, rand(r), torch.rand(out_f, generator=g) * 0.1
    codec = get_codec("int8")  # the adapter's scales as stored, decoded as a packed layer keeps them on a GPU
    b, m, a = (t.to(device) for t in codec.decode(*codec.encode(b, m, a)))
    s = 2.0
    return {
        "base": lambda: F.linear(x, weight),
        "lora": lambda: F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * s,
        "lordba": lambda: kernels.packed_branch(x, sA, sB, b, m, a, s, F.linear(x, weight)),
        "sign": lambda: tri.packed_branch(x, sA, sB, b, m, a, s, "sign", F.linear(x, weight)),
        "unpack": lambda: tri.packed_branch(x, sA, sB, b, m, a, s, "unpack", F.linear(x, weight)),
    }


def _branch_case(in_f: int, out_f: int, r: int, tokens: int, rounds: int, device: str) -> list[dict]:
    """Rows (eager, and graph on CUDA) of one branch case: per-call time of the base and each
    variant's paired ratio over it."""
    fns = _branch_fns(in_f, out_f, r, tokens, device)
    calls = 20
    modes = {"eager": (fns, {})}
    if device == "cuda":
        modes["graph"] = ({k: captured(f, calls) for k, f in fns.items()}, dict.fromkeys(fns, calls))
    rows = []
    for mode, (run, per_round) in modes.items():
        timed = interleaved_gpu(run, rounds, calls, per_round)
        row = {"case": "branch", "in": in_f, "out": out_f, "r": r, "tokens": tokens, "mode": mode}
        row["base_us"] = timed["base"].median * 1e6
        for name in VARIANTS[1:]:
            row[f"{name}_x"] = paired_ratio(timed[name], timed["base"]).median
        rows.append(row)
    return rows


def run(out_dir: Path, quick: bool, device: str | None = None, parts: tuple[str, ...] = PARTS) -> list[Path]:
    """Measure, print and write the suite's files into ``out_dir`` (module docstring).

    ``device``: ``cuda`` (default); ``cpu`` runs the same code through Triton's interpreter (set
    ``TRITON_INTERPRET=1`` before anything imports triton; tiny, for checking the suite itself);
    ``parts``: ``branch`` and / or ``models``.

    Raises :class:`~lordba.errors.LoRDBAError` when no CUDA GPU with Triton is present."""
    from lordba import kernels

    device = device or "cuda"
    if device == "cuda" and not kernels.triton_available():
        raise LoRDBAError(
            "the gpu suite needs a CUDA GPU and triton (pip install 'lordba[gpu]'); this machine has "
            f"{'no CUDA device' if not torch.cuda.is_available() else 'no triton'}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    smoke = device != "cuda"
    shapes, ranks, tokens = (SHAPES[:2], RANKS[:1], TOKENS[:2]) if smoke else (SHAPES, RANKS, TOKENS)
    rounds = 3 if smoke else (8 if quick else 15)
    cells = [(i, o, r, t) for (i, o) in shapes for r in ranks for t in tokens] if "branch" in parts else []
    rows: list[dict] = []
    errors: dict[str, str] = {}
    settings = {"quick": quick, "device": device, "parts": list(parts), "rounds": rounds, "shapes": shapes,
                "ranks": ranks, "tokens": tokens, "model_rank": RANK}  # fmt: skip
    for cell in tqdm(cells, desc="branch"):
        rows += _branch_case(*cell, rounds, device)
        _report(rows, errors, out_dir, settings)  # partial results survive a run cut short

    def done(row: dict) -> None:
        rows.append(row)
        _report(rows, errors, out_dir, settings)

    built = {}
    for name in (["tiny"] if smoke else list(MODEL_SHAPES)) if "models" in parts else []:
        built[name] = build(name, device, errors)
        if built[name] is not None:
            model_rows(name, built[name], rounds, errors, done)
    # Last: a CUDA graph that captured something it should not can fail the whole process.
    for name, models in built.items():
        if models is not None and device == "cuda":
            model_rows(name, models, rounds, errors, done, graph=True)
    files = _report(rows, errors, out_dir, settings)
    _print(rows, errors)
    return files


def _report(rows: list[dict], errors: dict[str, str], out_dir: Path, settings: dict | None = None) -> list[Path]:
    """Write ``gpu.json``, ``gpu.md`` and (with matplotlib) ``gpu_overhead.png``; return their paths.
    ``settings``: what the run measured (quick, rounds, cases), recorded in ``gpu.json``'s ``meta``."""
    meta = {"hardware": hardware(), "triton": _version("triton"), "settings": settings, "errors": errors}
    json_path = out_dir / "gpu.json"
    write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = out_dir / "gpu.md"
    tables = "\n\n".join(f"## {title}\n\n{markdown_table(cols, table)}" for title, cols, table in _tables(rows))
    write_text(md, f"# Triton kernels on a GPU\n\n{_conditions(meta)}\n\n{tables}\n{_failures(errors)}")
    png = _plot(rows, out_dir / "gpu_overhead.png")
    return [json_path, md, *([png] if png else [])]


def _conditions(meta: dict) -> str:
    """The line naming what the absolute times (``base µs``, ``base ms``) were measured on."""
    hw = meta["hardware"]
    return (
        f"GPU: {hw.get('cuda') or 'none (Triton interpreter on the CPU)'}; CPU: {hw.get('cpu')}; "
        f"torch {hw.get('torch')}, triton {meta['triton']}."
    )


def _failures(errors: dict[str, str]) -> str:
    """The cases that failed (their rows are missing from the tables), each with its error's last line."""
    if not errors:
        return ""
    lines = [f"- {name}: FAILED: {(err.strip().splitlines() or [''])[-1]}\n" for name, err in errors.items()]
    return "\n## Failed cases (no row above; tracebacks in gpu.json)\n\n" + "".join(lines)


def _tables(rows: list[dict]) -> list[tuple[str, list[str], list[list]]]:
    branch = [r for r in rows if r["case"] == "branch"]
    model = [r for r in rows if r["case"] != "branch"]
    cols_b = ["in→out", "r", "tokens", "mode", "base µs", *(f"{v} ×" for v in VARIANTS[1:])]
    table_b = [
        [f"{r['in']}→{r['out']}", r["r"], r["tokens"], r["mode"], r["base_us"], *(r[f"{v}_x"] for v in VARIANTS[1:])]
        for r in branch
    ]
    cols_m = ["model", "case", "mode", "base ms", "lora ×", "lordba ×", "lordba vs lora", "logits rel. diff"]
    table_m = [
        [r["model"], r["case"], r["mode"], r["base_ms"], r["lora_x"], r["lordba_x"], r["lordba_vs_lora"], r["check"]]
        for r in model
    ]
    return [("branch (per call; × = paired ratio over the base)", cols_b, table_b), ("models", cols_m, table_m)]


def _print(rows: list[dict], errors: dict[str, str]) -> None:
    for title, cols, table in _tables(rows):
        print_table(title, cols, table)
    for name, err in errors.items():
        print(f"{name}: FAILED: {err}")


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the lab's dependencies
        return None
    branch = [r for r in rows if r["case"] == "branch" and r["r"] == 16]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    shapes = sorted({(r["in"], r["out"]) for r in branch})
    colors = plt.get_cmap("tab10")
    for ax, mode in zip(axes, ("eager", "graph")):
        for variant, style in (("lora", "--"), ("lordba", "-")):
            for k, shape in enumerate(shapes):
                pts = sorted(
                    (r["tokens"], r[f"{variant}_x"])
                    for r in branch
                    if r["mode"] == mode and (r["in"], r["out"]) == shape
                )
                if pts:
                    label = f"{variant} {shape[0]}→{shape[1]}"
                    ax.plot(*zip(*pts), style, color=colors(k), marker="o", ms=3, label=label)
        ax.set(xscale="log", xlabel="tokens", title=f"branch, r=16, {mode}", ylabel="(base + branch) / base")
        ax.axhline(1.0, color="grey", lw=0.5)
    if branch:
        axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m lordba_lab.bench.gpu [--quick] [--device cuda|cpu] [--out DIR]``."""
    import argparse

    p = argparse.ArgumentParser(description=HELP)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--device", default=os.environ.get("LORDBA_BENCH_DEVICE", "cuda"), help="cuda, or cpu (smoke)")
    p.add_argument("--parts", default=",".join(PARTS), help="branch and / or models, comma-separated")
    p.add_argument("--out", default="results/bench", help="output directory")
    args = p.parse_args(argv)
    for f in run(Path(args.out), args.quick, args.device, tuple(args.parts.split(","))):
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
