"""Conversion quality: gauges and sign solvers, the RMR theory check, ranks, scale dtypes, budgets.

Adapters measured:

* ``gaussian``: 8 layers 1024×1024 with i.i.d. Gaussian factors (r = 16; the worst case, ρ ≈ 0.6);
* ``decaying``: one Llama-7B block (7 layers) from :func:`lordba_lab.bench.convert.write_lora`;
* ``trained``: a PEFT LoRA (r = 16, α = 32, all linear layers) trained on SmolLM2-135M for
  150 steps (``--quick``: 10) of movie-review sentiment (batch 8, lr 1e-3); cached under
  ``$LORDBA_CACHE/bench``.

Writes ``convert_quality.json``, ``.md`` and ``convert_quality_rmr.png`` (error against RMR).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lordba_lab.bench import hardware
from lordba_lab.cached import cached_folder
from lordba_lab.outputs import save_figure, write_text

SUITE = "convert-quality"
HELP = "conversion quality: gauges x solvers, RMR theory check, ranks, scale dtypes, budget vs uniform"
DEFAULT = False

SOLVERS = {  # name: SolverOptions fields
    "svd / Eq. 7 only": {"gauge": "svd", "method": "init"},
    "svd / bcd": {"gauge": "svd", "method": "bcd"},
    "svd / admm (20) + bcd (default)": {"gauge": "svd"},
    "svd / admm (20)": {"gauge": "svd", "method": "admm"},
    "svd / DBF admm (60 x 3 inner)": {"gauge": "svd", "method": "admm", "admm_iters": 60, "admm_inner": 3},
    "svd / admm (60) + bcd": {"gauge": "svd", "admm_iters": 60},
    "lora / closed form (SVID per factor)": {"gauge": "lora", "method": "init"},
    "lora / bcd": {"gauge": "lora", "method": "bcd"},
    "lora / admm (20) + bcd": {"gauge": "lora"},
    "rotation / closed form": {"gauge": "rotation", "method": "init"},
    "rotation / bcd": {"gauge": "rotation", "method": "bcd"},
    "rotation / admm (20) + bcd": {"gauge": "rotation"},
    "best(svd, lora) / admm (20) + bcd": {"gauge": "best"},
}


def train_lora(out: Path, steps: int, seed: int = 0) -> Path:
    """Train a PEFT LoRA on SmolLM2 (movie-review sentiment) and save it; cached by ``out`` (trained and saved into
    a folder of this run's own, moved to ``out`` whole; one run trains it at a time, the others wait and take it:
    :func:`lordba_lab.cached.cached_folder`)."""
    return cached_folder(out, lambda work: _train_lora(work, steps, seed), done="adapter_config.json")


def _train_lora(out: Path, steps: int, seed: int) -> None:
    """Train the LoRA :func:`train_lora` caches and save it into ``out``."""
    from peft import LoraConfig, get_peft_model

    from lordba_lab.assets import ensure_vader_movies, load_model_and_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model_and_tokenizer()
    recs = [json.loads(line) for line in ensure_vader_movies().read_text().splitlines()]
    recs = [r for r in recs if abs(r["rating"]) >= 0.5]
    rng.shuffle(recs)
    texts = [f"Review: {r['text']}\nSentiment: {'positive' if r['rating'] > 0 else 'negative'}" for r in recs]
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    tok.padding_side = "right"
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="training the LoRA to convert"):
        enc = tok(texts[step * 8 : (step + 1) * 8], return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        pm(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(out)


def _gaussian(directory: Path, layers: int = 8, dim: int = 1024, r: int = 16) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        tensors[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(r, dim, generator=g)
        tensors[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(dim, r, generator=g)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r}))
    return directory


def _convert(source: Any, **kwargs: Any) -> tuple[float, float, Any]:
    from lordba.convert import SolverOptions, convert_lora

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in SolverOptions.__dataclass_fields__}
    t0 = time.perf_counter()
    _, report = convert_lora(source, progress=False, options=SolverOptions(**options), **kwargs)
    return report.total_rel_error, time.perf_counter() - t0, report


def _theory(quick: bool) -> list[dict[str, float]]:
    """Factors = sign × non-negative rank-1 envelope + noise of growing size (RMR 0 → 0.6)."""
    from lordba.convert import SolverOptions, convert_factors

    g = torch.Generator().manual_seed(0)
    out, inn, k = (256, 192, 8) if quick else (1024, 768, 16)

    def structured(rows: int, cols: int) -> torch.Tensor:
        u, v = torch.rand(rows, 1, generator=g) + 0.5, torch.rand(1, cols, generator=g) + 0.5
        return u * torch.where(torch.randn(rows, cols, generator=g) >= 0, 1.0, -1.0) * v

    B0, A0 = structured(out, k), structured(k, inn)
    NB, NA = torch.randn(out, k, generator=g), torch.randn(k, inn, generator=g)
    rows = []
    for eps in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 4.0):
        B, A = B0 + eps * B0.abs().mean() * NB, A0 + eps * A0.abs().mean() * NA
        res = convert_factors(A, B, k, options=SolverOptions(dtype="float64"))
        naive_B = torch.where(B >= 0, 1.0, -1.0) * B.abs().mean()
        naive_A = torch.where(A >= 0, 1.0, -1.0) * A.abs().mean()
        naive = ((B @ A - naive_B @ naive_A).norm() / (B @ A).norm()).item()
        rows.append(
            {
                "noise": eps,
                "rmr_A": res.rmr_A,
                "rmr_B": res.rmr_B,
                "rel_error": res.rel_error,
                "rel_error_init": res.rel_error_init,
                "naive_sign_mean_abs": naive,
            }
        )
    return rows


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba._util.cachedir import cache_dir
    from lordba._util.tables import markdown_table, print_table

    steps = 10 if quick else 150
    results: dict[str, Any] = {"suite": SUITE, "quick": quick, "hardware": hardware(), "train_steps": steps}
    md = [f"# Conversion quality ({'quick' if quick else 'full'})\n"]
    with tempfile.TemporaryDirectory() as tmp:
        from lordba_lab.bench.convert import write_lora

        decaying = Path(tmp) / "decaying"
        write_lora(decaying, 1)
        adapters = {
            "gaussian": _gaussian(Path(tmp) / "gaussian", layers=4 if quick else 8),
            "decaying": decaying,
            "trained": train_lora(cache_dir() / "bench" / f"smollm2-lora-r16-sentiment-{steps}steps", steps),
        }
        # 1. gauges x solvers
        columns = ["solver (gauge / method)", *[f"{a} err" for a in adapters], *[f"{a} s" for a in adapters]]
        rows, table = [], {}
        solvers = dict(list(SOLVERS.items())[:3]) if quick else SOLVERS
        for name, opts in solvers.items():
            errs, secs = {}, {}
            for adapter, path in adapters.items():
                errs[adapter], secs[adapter], _ = _convert(path, **opts)
            table[name] = {"rel_error": errs, "seconds": secs}
            rows.append([name, *errs.values(), *secs.values()])
        print_table("relative error of ΔW (‖ΔW‖-weighted), r = 16, fp16 scales", columns, rows)
        results["solvers"] = table
        md += ["## Gauges and sign solvers (r = 16, fp16 scales)\n", markdown_table(columns, rows)]
        # 2. per-layer RMR of the trained LoRA and the default conversion
        _, _, report = _convert(adapters["trained"])
        layers = report.layers
        results["trained_rmr"] = {
            "rmr_A_mean": sum(lr.rmr_A for lr in layers) / len(layers),
            "rmr_B_mean": sum(lr.rmr_B for lr in layers) / len(layers),
            "rmr_A_gauge_mean": sum(lr.rmr_A_gauge for lr in layers) / len(layers),
            "rmr_B_gauge_mean": sum(lr.rmr_B_gauge for lr in layers) / len(layers),
            "rel_error": report.total_rel_error,
        }
        # 3. ranks and scale dtypes on the trained LoRA
        rows = []
        for r in (4, 8, 16, 24, 32):
            for dtype in ("float16", "int8") if r == 16 or not quick else ("float16",):
                err, sec, rep = _convert(adapters["trained"], r=r, scale_dtype=dtype)
                rows.append([r, dtype, err, rep.bpw_lora, rep.lora_fp16_file_bytes / rep.size.file_bytes, sec])
        columns = ["r", "scale dtype", "rel err", "BPW (LoRA basis)", "x smaller than fp16 LoRA", "seconds"]
        print_table("trained LoRA: rank and scale dtype", columns, rows)
        results["ranks"] = [dict(zip(columns, row)) for row in rows]
        md += ["\n## Trained LoRA (SmolLM2, r = 16): LoRDBA rank and scale dtype\n", markdown_table(columns, rows)]
        # 4. budget vs uniform
        rows = []
        for adapter in ("trained", "decaying"):
            for bpw in (1.5, 2.0, 2.5) if not quick else (2.0,):
                _, sec, rep = _convert(adapters[adapter], target_bpw=bpw)
                a = rep.allocation
                rows.append(
                    [
                        adapter,
                        bpw,
                        a["total_rel_error"],
                        a["bpw_lora"],
                        a["uniform_rank"],
                        a["uniform_total_rel_error"],
                        a["uniform_bpw_lora"],
                        json.dumps(a["rank_histogram"]),
                        sec,
                    ]
                )
        columns = ["adapter", "target BPW", "allocated err", "allocated BPW", "uniform r", "uniform err",
                   "uniform BPW", "ranks", "seconds"]  # fmt: skip
        print_table("budget: per-layer ranks vs a uniform rank at the same bytes (fp16 scales)", columns, rows)
        results["budget"] = [dict(zip(columns, row)) for row in rows]
        md += ["\n## Per-layer ranks at a byte budget vs the uniform rank\n", markdown_table(columns, rows)]
    # 5. theory
    theory = _theory(quick)
    results["theory"] = theory
    columns = list(theory[0])
    print_table("RMR theory check", columns, [list(t.values()) for t in theory])
    md += [
        "\n## RMR theory check (sign × rank-1 envelope + noise)\n",
        markdown_table(columns, [list(t.values()) for t in theory]),
    ]
    files = [out_dir / "convert_quality.json", out_dir / "convert_quality.md"]
    write_text(files[0], json.dumps(results, indent=2) + "\n")
    write_text(files[1], "\n".join(md) + f"\nHardware: {results['hardware']}\n")
    files.append(_plot(theory, out_dir / "convert_quality_rmr.png"))
    return files


def _plot(theory: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho = [max(t["rmr_A"], t["rmr_B"]) for t in theory]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rho, [t["rel_error"] for t in theory], "o-", label="LoRDBA PTQ (default solver)")
    ax.plot(rho, [t["rel_error_init"] for t in theory], "s--", label="Eq. 7 init")
    ax.plot(rho, [t["naive_sign_mean_abs"] for t in theory], "^:", label="sign x mean|.| per factor")
    ax.set_xlabel("RMR of the LoRA factors (max of A, B)")
    ax.set_ylabel("relative error of ΔW")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
