"""``lordba bench --suite ste``: which straight-through estimator trains LoRDBA better (SPEC §3).

The sign of a latent factor has no useful derivative; QAT replaces it in the backward pass by a
surrogate (:mod:`lordba.core.ste`): ``smoothsign`` (``d/dx tanh(k x)``, k = 100, the author-side port's
choice) or the clipped ``identity`` (BinaryConnect). This suite measures which one gives the lower
held-out loss at the same budget: mode ``qat`` from the cold start on the real model
(SmolLM2-135M-Instruct, 4-bit HQQ base as ``lordba train`` uses), the same data, rank, targets,
optimiser and steps for both, over several seeds. Runs are paired: for one seed both estimators
start from the same latents and see the same batches, so the per-seed difference is the measure.

Writes ``ste.json``, ``ste.md`` and ``ste.png`` (training curves and held-out losses).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware
from lordba_lab.outputs import save_figure, write_text

SUITE = "ste"
HELP = "straight-through estimator choice: held-out loss of LoRDBA qat, smoothsign vs identity (real model)"
DEFAULT = False
KINDS = ("smoothsign", "identity")


@dataclasses.dataclass(frozen=True)
class Setup:
    """One comparison's budget (identical for every estimator)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 48
    batch_size: int = 4
    lr: float = 1e-3
    r: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    task: str = "arithmetic"
    train_size: int = 400
    eval_size: int = 48
    max_length: int = 64


FULL = Setup()
QUICK = Setup(seeds=(0,), steps=3, batch_size=2, train_size=16, eval_size=4, max_length=48)


def compare(
    model: torch.nn.Module,
    train_rows: list[dict],
    eval_rows: list[dict],
    setup: Setup,
    pad_id: int = 0,
    kinds: tuple[str, ...] = KINDS,
    progress: bool = True,
) -> dict:
    """Train ``qat`` once per (seed, estimator) on ``model`` (left unchanged) and return
    ``{"base_eval_loss", "runs": [{"seed", "ste", "eval_loss", "train_loss": [...]}, ...]}``."""
    from lordba.config import LoRDBAConfig
    from lordba.nn.model import get_lordba_model
    from lordba.train import TrainSettings, train_loop
    from lordba.train.evaluate import heldout_loss
    from lordba.train.tokenize import Batcher

    base_loss = heldout_loss(model, eval_rows, pad_id=pad_id)
    runs = []
    bar = tqdm(total=len(setup.seeds) * len(kinds), desc="ste runs", disable=not progress)
    for seed in setup.seeds:  # seed-major: both estimators see the same machine state in turn
        for kind in kinds:
            config = LoRDBAConfig(r=setup.r, alpha=2.0 * setup.r, target_modules=list(setup.targets), ste=kind)
            torch.manual_seed(seed)  # same initial latents for every estimator of this seed
            lm = get_lordba_model(model, config)
            settings = TrainSettings(steps=setup.steps, batch_size=setup.batch_size, lr=setup.lr, seed=seed)
            result = train_loop(
                lm, Batcher(train_rows, setup.batch_size, seed=seed, pad_id=pad_id), settings, None, progress=False
            )
            runs.append(
                {
                    "seed": seed,
                    "ste": kind,
                    "eval_loss": heldout_loss(lm, eval_rows, pad_id=pad_id),
                    "train_loss": [e["loss"] for e in result.log],
                    "seconds": result.seconds,
                }
            )
            model = lm.unload()
            bar.update()
    bar.close()
    return {"base_eval_loss": base_loss, "runs": runs}


def summarize(runs: list[dict], kinds: tuple[str, ...] = KINDS) -> dict:
    """Per estimator: mean, sample standard deviation, min and max of the held-out loss; and the
    paired per-seed differences against the first estimator. ``favours`` names the estimator
    that is better on every seed, or is ``None`` when the seeds disagree."""
    per_kind = {}
    for kind in kinds:
        losses = [r["eval_loss"] for r in runs if r["ste"] == kind]
        per_kind[kind] = {
            "eval_loss_mean": statistics.fmean(losses),
            "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "eval_loss_min": min(losses),
            "eval_loss_max": max(losses),
            "n": len(losses),
        }
    ref, other = kinds[0], kinds[1]
    by_seed = {(r["seed"], r["ste"]): r["eval_loss"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    diffs = [by_seed[(s, other)] - by_seed[(s, ref)] for s in seeds]
    favours = ref if all(d > 0 for d in diffs) else other if all(d < 0 for d in diffs) else None
    return {
        "per_ste": per_kind,
        "paired_difference": {
            "definition": f"eval_loss[{other}] - eval_loss[{ref}] per seed (> 0: {ref} better)",
            "per_seed": dict(zip(map(str, seeds), diffs)),
            "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        },
        "favours": favours,
    }


def write(out_dir: Path, report: dict) -> list[Path]:
    """``ste.json``, ``ste.md`` and ``ste.png`` in ``out_dir``; prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["ste", "held-out loss mean", "± std", "min", "max", "seeds"]
    table = [
        [k, s["eval_loss_mean"], s["eval_loss_std"], s["eval_loss_min"], s["eval_loss_max"], s["n"]]
        for k, s in report["summary"]["per_ste"].items()
    ]
    diff = report["summary"]["paired_difference"]
    verdict = report["summary"]["favours"] or "no estimator better on every seed"
    title = f"LoRDBA qat, held-out loss after {report['setup']['steps']} steps (base {report['base_eval_loss']:.4f})"
    print_table(title, columns, table)
    print(f"paired difference {diff['definition']}: mean {diff['mean']:+.4f} ± {diff['std']:.4f}; favours: {verdict}")
    json_path, md_path = out_dir / "ste.json", out_dir / "ste.md"
    write_text(json_path, json.dumps(report, indent=1) + "\n")
    write_text(
        md_path,
        f"# Straight-through estimator\n\n{title}\n\nsetup: `{json.dumps(report['setup'])}`\n\n"
        + markdown_table(columns, table)
        + f"\nPaired difference, {diff['definition']}: mean {diff['mean']:+.4f} ± {diff['std']:.4f} "
        f"(per seed {', '.join(f'{v:+.4f}' for v in diff['per_seed'].values())}). Favours: **{verdict}**.\n\n"
        f"Hardware: `{json.dumps(report['hardware'])}`\n",
    )
    return [json_path, md_path, _plot(report, out_dir / "ste.png")]


def _plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"smoothsign": "tab:red", "identity": "tab:blue"}
    for run in report["runs"]:
        steps = range(1, len(run["train_loss"]) + 1)
        curves.plot(steps, run["train_loss"], color=colors.get(run["ste"]), alpha=0.6, lw=1)
    for kind, color in colors.items():
        curves.plot([], [], color=color, label=kind)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (one line per seed)")
    curves.set_yscale("log")
    curves.legend()
    curves.grid(alpha=0.3)
    for i, (kind, s) in enumerate(report["summary"]["per_ste"].items()):
        losses = [r["eval_loss"] for r in report["runs"] if r["ste"] == kind]
        bars.bar(i, s["eval_loss_mean"], yerr=s["eval_loss_std"], color=colors.get(kind), alpha=0.5, capsize=6)
        bars.scatter([i] * len(losses), losses, color="black", s=14, zorder=3)
    bars.set_xticks(range(len(report["summary"]["per_ste"])), list(report["summary"]["per_ste"]))
    bars.set_ylabel("held-out loss (mean ± std, dots: seeds)")
    bars.grid(alpha=0.3, axis="y")
    fig.suptitle(f"STE choice: LoRDBA qat, {report['setup']['task']}, r={report['setup']['r']}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba.quant.cache import quantize_model_cached
    from lordba.train.tokenize import encode_examples
    from lordba_lab.assets import load_model_and_tokenizer
    from lordba_lab.assets.models import resolve_model_path
    from lordba_lab.tasks import get_task

    setup = QUICK if quick else FULL
    model, tok = load_model_and_tokenizer()
    quantize_model_cached(model, resolve_model_path(None), "hqq", 4, 64, progress=True)
    task = get_task(setup.task)
    train_rows = encode_examples(tok, task.examples("train", setup.train_size, 0), setup.max_length)
    eval_rows = encode_examples(tok, task.examples("eval", setup.eval_size, 0), setup.max_length)
    measured = compare(model, train_rows, eval_rows, setup, pad_id=tok.pad_token_id or 0)
    about = {"model": "SmolLM2-135M-Instruct", "base": "HQQ 4-bit g64", "quick": quick}
    return write(out_dir, build_report(setup, measured, **about))


def build_report(setup: Setup, measured: dict, **about: object) -> dict:
    """The suite's JSON: setup (plus ``about``), base loss, summary, every run, hardware."""
    from lordba.config import LoRDBAConfig

    defaults = LoRDBAConfig()
    return {
        "setup": {
            **dataclasses.asdict(setup),
            **about,
            "mode": "qat",
            "alpha": 2.0 * setup.r,
            "ste_k": defaults.ste_k,
            "ste_clip": defaults.ste_clip,
        },
        "base_eval_loss": measured["base_eval_loss"],
        "summary": summarize(measured["runs"]),
        "runs": measured["runs"],
        "hardware": hardware(),
    }
