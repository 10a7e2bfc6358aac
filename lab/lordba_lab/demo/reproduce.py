"""``lordba reproduce``: the paper's quality comparisons as a sweep over adapter size, over seeds.

For each seed, on the demo's 4-bit base, task and step budget, one fp16 LoRA r=16 is trained and
then, at a range of sizes (bits per weight on the LoRA r=16 basis):

* LoRDBA ``ptq``: the trained LoRA converted at several output ranks (int8 and float16 scales);
* LoRDBA ``ptq`` allocated: the same LoRA at the file size of a uniform rank, per-layer ranks chosen
  by ``convert_lora(target_bpw=...)`` (ΔW error), judged here on held-out loss against that uniform
  rank (:func:`allocation_vs_uniform`: paired per seed);
* LoRDBA ``scales-only``: the converted signs frozen, the scales trained (the demo's scale budget);
* LoRDBA ``qat``: trained from the cold start with the same step budget as the LoRA;
* fp16 LoRA truncated by SVD to rank 1, 2, 4 (the matched-bytes fp16 adapter, no retraining);
* with ``--all-sizes``: ``qat`` and ``scales-only`` at r=4, 8, 16 (default r=16 only) and fp16 LoRA
  *trained* at rank 1 and 2 (the matched-bytes fp16 adapter, same step budget);
* RTN of the factors at 1–3 bits, LoRAQuant-style and BitDelta-style (the low-bit baselines).

Every point is evaluated on one fixed held-out set (exact match and completion loss); the summary
is mean ± standard deviation over seeds. The per-layer reconstruction error of the r=16 conversion
is set against the LoRA factors' RMR (SPEC §3) with its rank correlation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lordba._util.tables import markdown_table, print_table
from lordba.config import LoRDBAConfig
from lordba.convert import collect_input_moments, convert_lora, read_lora
from lordba.format.atomic import atomic_write_bytes
from lordba.format.sizes import size_report
from lordba.nn.model import LoRDBAModel
from lordba.train.loop import train_loop
from lordba.train.modes import build_adapter
from lordba_lab.baselines import bitdelta, loraquant, rtn, svd_truncate
from lordba_lab.demo.run import FULL, Demo, DemoSettings, _payload_lora, _train_lora, replaced_factors
from lordba_lab.demo.run import QUICK as DEMO_QUICK

LORDBA_PTQ, LORDBA_QAT, TRUNCATED = "LoRDBA ptq", "LoRDBA qat", "fp16 LoRA (SVD-truncated)"
LORDBA_PTQ_FP16 = "LoRDBA ptq (float16 scales)"
LORA, LORA_SMALL = "fp16 LoRA", "fp16 LoRA (trained at matched bytes)"
LORDBA_SCALES = "LoRDBA scales-only"
LORDBA_ALLOCATED = "LoRDBA ptq (allocated ranks)"
LORDBA_CALIBRATED = "LoRDBA ptq (calibrated)"
LORDBA_ALLOCATED_CAL = "LoRDBA ptq (allocated ranks, calibrated)"
# the variants judged against the uniform ptq rank at the same file size (allocation_vs_uniform)
AGAINST_UNIFORM = {
    LORDBA_ALLOCATED: "per-layer ranks, ΔW error",
    LORDBA_CALIBRATED: "uniform rank, activation-weighted",
    LORDBA_ALLOCATED_CAL: "per-layer ranks, output error (activation-weighted)",
}
CALIBRATION_BATCHES = 8  # training batches whose inputs give the calibration moments


@dataclass
class ReproduceSettings:
    """The sweep; each LoRA and each QAT point is trained with ``demo.steps`` steps."""

    demo: DemoSettings = field(default_factory=lambda: dataclasses.replace(FULL, measure_memory=False))
    seeds: tuple[int, ...] = (0, 1, 2)
    ptq_ranks: tuple[int, ...] = (4, 8, 16, 32)  # int8 scales (the demo's scale format)
    ptq_fp16_ranks: tuple[int, ...] = (8, 16)  # the scale-dtype axis of the sweep
    allocated_at: tuple[int, ...] = (8, 16)  # per-layer ranks at the file size of these uniform ptq ranks
    calibrated_at: tuple[int, ...] = (8, 16)  # activation-weighted: uniform, and allocated at the same size
    allocation_candidates: tuple[int, ...] = (4, 8, 16, 32)  # each candidate rank is one full conversion
    qat_ranks: tuple[int, ...] = (16,)  # each QAT point costs a full training per seed
    scales_ranks: tuple[int, ...] = (16,)  # scales-only on the int8 ptq signs, demo.scales_steps steps
    lora_small_ranks: tuple[int, ...] = ()  # fp16 LoRA trained at about LoRDBA's bytes
    truncate_ranks: tuple[int, ...] = (1, 2, 4)
    rtn_bits: tuple[int, ...] = (1, 2, 3)


QUICK = ReproduceSettings(
    demo=DEMO_QUICK,
    seeds=(0, 1),
    ptq_ranks=(4, 16),
    ptq_fp16_ranks=(16,),
    allocated_at=(4,),
    calibrated_at=(4,),
    allocation_candidates=(2, 4, 8),
    qat_ranks=(16,),
    scales_ranks=(4,),
    lora_small_ranks=(1,),
    truncate_ranks=(1,),
    rtn_bits=(1,),
)


# ``--all-sizes``: every trained family at every size (about 3x the run time: ~2.5 h on 2 cores)
ALL_SIZES = {"qat_ranks": (4, 8, 16), "scales_ranks": (4, 8, 16), "lora_small_ranks": (1, 2)}


def _config(demo: Demo, mode: str, r: int) -> LoRDBAConfig:
    s = demo.s
    return LoRDBAConfig(
        r=r,
        alpha=2.0 * r,
        target_modules=list(s.targets),
        mode=mode,
        scale_dtype=s.scale_dtype,
        base_model_name_or_path="smollm2-135m-instruct",
    )


def _one_seed(demo: Demo, settings: ReproduceSettings, seed: int) -> tuple[list[dict], list[dict]]:
    """All points of one seed, and the per-layer error/RMR of its r=16 conversion."""
    s = demo.s
    points: list[dict] = []

    def point(family: str, label: str, nbytes: int, model: torch.nn.Module, **extra: object) -> None:
        row = demo.add_row(family, label, nbytes, model)
        points.append({"seed": seed, "family": family, "label": label, **row, **extra})

    peft_model, _, _ = _train_lora(demo, s.r, f"seed {seed}: fp16 LoRA r={s.r}")
    point(LORA, f"r={s.r}", demo.lora_ref_bytes, peft_model, reference=True)
    variants = [(TRUNCATED, f"r={k}", lambda A, B, k=k: svd_truncate(A, B, k)) for k in settings.truncate_ranks]
    variants += [("RTN", f"{b}-bit g64", lambda A, B, b=b: rtn(A, B, b, 64)) for b in settings.rtn_bits]
    variants += [
        ("LoRAQuant-style", "2-bit head + 1-bit tail", lambda A, B: loraquant(A, B, 2, 0.8, 128)),
        ("BitDelta-style", "sign x 1 scale/matrix", bitdelta),
    ]
    for family, label, quantize in variants:
        with replaced_factors(peft_model, quantize) as nbytes:
            point(family, label, nbytes, peft_model)

    lora = read_lora(peft_model)
    batches = [demo.batcher.batch(k) for k in range(CALIBRATION_BATCHES)]
    calibration = collect_input_moments(peft_model, batches, list(lora.layers)) if settings.calibrated_at else None
    demo.model = peft_model.unload()
    for k in settings.lora_small_ranks:  # on the bare base again (PEFT injects into demo.model)
        small, _, _ = _train_lora(demo, k, f"seed {seed}: fp16 LoRA r={k}")
        point(LORA_SMALL, f"r={k}", _payload_lora(demo.dims, k), small)
        demo.model = small.unload()
    layers: list[dict] = []
    states = {}
    ptq = [(LORDBA_PTQ, r, s.scale_dtype) for r in settings.ptq_ranks]
    ptq += [(LORDBA_PTQ_FP16, r, "float16") for r in settings.ptq_fp16_ranks]
    ptq += [(LORDBA_ALLOCATED, r, s.scale_dtype) for r in settings.allocated_at]
    ptq += [(f, r, s.scale_dtype) for r in settings.calibrated_at for f in (LORDBA_CALIBRATED, LORDBA_ALLOCATED_CAL)]
    lora_params = sum(x.r * (x.in_features + x.out_features) for x in lora.layers.values())
    for family, r, scale_dtype in ptq:
        config = dataclasses.replace(_config(demo, "ptq", r), scale_dtype=scale_dtype)
        allocated = family in (LORDBA_ALLOCATED, LORDBA_ALLOCATED_CAL)
        kw: dict[str, object] = (
            {"calibration": calibration} if family in (LORDBA_CALIBRATED, LORDBA_ALLOCATED_CAL) else {}
        )
        if allocated:  # the uniform rank r's file size, in bits per LoRA parameter
            dims = {p: (x.in_features, x.out_features, r) for p, x in lora.layers.items()}
            uniform_bytes = size_report(dims, scale_dtype).file_bytes
            kw.update(target_bpw=8 * uniform_bytes / lora_params, rank_candidates=settings.allocation_candidates)
        state, report = convert_lora(lora, config, progress=False, **kw)
        lm = LoRDBAModel(demo.model)
        lm.load_adapter_state(state, "default")
        lm.set_adapter("default")
        size = lm.size_report()
        extra: dict[str, object] = {"file_bytes": size.file_bytes}
        if family in AGAINST_UNIFORM:
            extra["at_rank"] = r
        if allocated:
            extra["rank_histogram"] = report.allocation["rank_histogram"]
        label = f"at r={r}'s size" if allocated else f"r={r}"
        point(family, label, size.payload_bytes, lm, rel_error=report.total_rel_error, **extra)
        if family == LORDBA_PTQ and r in settings.scales_ranks:
            states[r] = state
        if r == s.r and family == LORDBA_PTQ:
            layers = [
                {"seed": seed, "module": x.path, "rmr_A": x.rmr_A, "rmr_B": x.rmr_B, "rel_error": x.rel_error}
                for x in report.layers
            ]
        demo.model = lm.unload()
    for r in settings.scales_ranks:
        lm = LoRDBAModel(demo.model)
        cfg = _config(demo, "scales-only", r)
        lm.load_adapter_state(dataclasses.replace(states[r], config=cfg), "default", is_trainable=True)
        lm.set_adapter("default")
        train_loop(lm, demo.batcher, demo.settings(s.scales_steps, s.lr_lordba), progress=demo.progress,
                   description=f"seed {seed}: scales-only r={r}")  # fmt: skip
        point(LORDBA_SCALES, f"r={r}", lm.size_report().payload_bytes, lm)
        demo.model = lm.unload()
    for r in settings.qat_ranks:
        lm, _ = build_adapter(
            demo.model,
            _config(demo, "qat", r),
            demo.batcher,
            demo.settings(s.steps, s.lr_lordba),
            out_dir=demo.out / "work" / f"qat_r{r}_seed{seed}",
            resume=False,
            progress=demo.progress,
        )
        point(LORDBA_QAT, f"r={r}", lm.size_report().payload_bytes, lm)
        demo.model = lm.unload()
    return points, layers


def summarize(points: list[dict]) -> list[dict]:
    """Mean ± std over seeds of each (family, label)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["family"], p["label"]), []).append(p)
    out = []
    for (family, label), ps in groups.items():
        row = {"family": family, "label": label, "n": len(ps), "bytes": ps[0]["bytes"], "bpw": ps[0]["bpw"]}
        for key in ("metric", "eval_loss"):
            vals = [p[key] for p in ps if p.get(key) is not None]
            row[f"{key}_mean"] = statistics.fmean(vals) if vals else None
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["reference"] = any(p.get("reference") for p in ps)
        out.append(row)
    return sorted(out, key=lambda r: (r["family"], r["bpw"]))


def allocation_vs_uniform(points: list[dict]) -> list[dict]:
    """Per variant of :data:`AGAINST_UNIFORM` and uniform rank ``r``: the variant's conversion at r's file
    size against the uniform ptq conversion at rank r, paired by seed — held-out loss and exact match
    (variant minus uniform: negative loss is better), file bytes of each, and in how many seeds the
    variant won."""
    by_key = {(p["seed"], p["family"], p["label"]): p for p in points}
    pairs: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for p in points:
        if p["family"] in AGAINST_UNIFORM:
            r = p["at_rank"]
            uniform = by_key.get((p["seed"], LORDBA_PTQ, f"r={r}"))
            if uniform is not None:
                pairs.setdefault((p["family"], r), []).append((p, uniform))
    order = list(AGAINST_UNIFORM)
    rows = []
    for (family, r), ps in sorted(pairs.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        d_loss = [a["eval_loss"] - u["eval_loss"] for a, u in ps]
        d_metric = [a["metric"] - u["metric"] for a, u in ps]
        rows.append({
            "family": family, "variant": AGAINST_UNIFORM[family], "uniform_rank": r, "seeds": len(ps),
            "uniform_file_bytes": ps[0][1].get("file_bytes"), "allocated_file_bytes": ps[0][0].get("file_bytes"),
            "uniform_loss_mean": statistics.fmean(u["eval_loss"] for _, u in ps),
            "allocated_loss_mean": statistics.fmean(a["eval_loss"] for a, _ in ps),
            "loss_diff_mean": statistics.fmean(d_loss),
            "loss_diff_std": statistics.stdev(d_loss) if len(ps) > 1 else 0.0,
            "metric_diff_mean": statistics.fmean(d_metric),
            "allocated_wins": sum(d < 0 for d in d_loss),
            "uniform_rel_error": statistics.fmean(u["rel_error"] for _, u in ps),
            "allocated_rel_error": statistics.fmean(a["rel_error"] for a, _ in ps),
            "rank_histogram": ps[0][0].get("rank_histogram"),
        })  # fmt: skip
    return rows


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties share their mean rank
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-300))


def _seed_file(out: Path, seed: int) -> Path:
    return out / "seeds" / f"seed{seed}.json"


def _settings_key(settings: ReproduceSettings) -> str:
    """What a kept seed's points depend on: every setting but the list of seeds."""
    described = dataclasses.asdict(dataclasses.replace(settings, seeds=()))
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _keep_seed(out: Path, settings: ReproduceSettings, seed: int, points: list[dict], layers: list[dict]) -> None:
    """Write one finished seed's points (atomically) so that ``resume`` can skip it."""
    record = {"settings_key": _settings_key(settings), "seed": seed, "points": points, "layers": layers}
    path = _seed_file(out, seed)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record) + "\n").encode())


def _kept_seed(out: Path, settings: ReproduceSettings, seed: int) -> tuple[list[dict], list[dict]] | None:
    """A finished seed's ``(points, layers)`` from an earlier run with the same settings, else ``None``
    (absent, unreadable, or written under other settings: that seed runs again)."""
    try:
        record = json.loads(_seed_file(out, seed).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("settings_key") != _settings_key(settings):
        return None
    return record["points"], record["layers"]


def run_reproduce(
    out: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    progress: bool = True,
    all_sizes: bool = False,
    resume: bool = False,
) -> dict:
    """Run the sweep; writes ``reproduce.json``, ``reproduce.md``, ``sweep.png`` and ``error_vs_rmr.png``.
    ``all_sizes``: QAT, scales-only and a trained fp16 LoRA at every size (:data:`ALL_SIZES`).
    Each finished seed is kept in ``out/seeds/``; ``resume``: seeds kept there under the same
    settings are read back instead of run again (a long sweep survives an interruption)."""
    from lordba_lab.bench import hardware
    from lordba_lab.demo.plots import error_vs_rmr, sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = QUICK if quick else ReproduceSettings()
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(seeds)))
    if all_sizes:
        settings = dataclasses.replace(settings, **ALL_SIZES)
    t0 = time.perf_counter()
    points: list[dict] = []
    layers: list[dict] = []
    fixed_eval = None
    for i, seed in enumerate(settings.seeds):
        kept = _kept_seed(out, settings, seed) if resume else None
        if kept is None or fixed_eval is None:
            demo = Demo(out, dataclasses.replace(settings.demo, seed=seed), progress)
        if fixed_eval is None:  # one held-out set for every seed: the seeds vary the training only
            fixed_eval = demo.eval_examples
            base = demo.add_row("base", None, 0, None)
            points.append({"seed": seed, "family": "base", "label": "", **base})
        if kept is None:
            demo.eval_examples = fixed_eval
            kept = _one_seed(demo, settings, seed)
            _keep_seed(out, settings, seed, *kept)
        points += kept[0]
        layers += kept[1]
        if progress:
            print(f"seed {seed} done ({i + 1}/{len(settings.seeds)}, {time.perf_counter() - t0:.0f} s)")
    summary = summarize(points)
    rho = spearman([0.5 * (x["rmr_A"] + x["rmr_B"]) for x in layers], [x["rel_error"] for x in layers])
    result = {
        "settings": dataclasses.asdict(settings),
        "hardware": hardware(),
        "seconds": time.perf_counter() - t0,
        "summary": summary,
        "points": points,
        "rmr_error_spearman": rho,
        "allocation_vs_uniform": allocation_vs_uniform(points),
        "conversion_layers": layers,
    }
    (out / "reproduce.json").write_text(json.dumps(result, indent=1) + "\n")
    _write_tables(out, settings, summary, rho, result)
    task = settings.demo.task
    sweep(summary, out / "sweep.png", f"{task}: exact match (held-out n={settings.demo.eval_size})")
    if layers:
        error_vs_rmr(layers, out / "error_vs_rmr.png")
    return result


def _write_tables(out: Path, settings: ReproduceSettings, summary: list[dict], rho: float, result: dict) -> None:
    def pm(row: dict, key: str) -> str:
        mean = row[f"{key}_mean"]
        return "" if mean is None else f"{mean:.4f} ± {row[f'{key}_std']:.4f}"

    columns = ["family", "variant", "bytes", "BPW", "metric (mean ± std)", "eval loss (mean ± std)", "seeds"]
    table = [
        [r["family"], r["label"], r["bytes"], r["bpw"], pm(r, "metric"), pm(r, "eval_loss"), r["n"]] for r in summary
    ]
    d = settings.demo
    title = (
        f"task {d.task}, {d.steps} steps x batch {d.batch_size}, targets {','.join(d.targets)}, 4-bit HQQ base, "
        f"held-out n={d.eval_size}, seeds {list(settings.seeds)}"
    )
    print_table(title, columns, table)
    hw = result["hardware"]
    md = [
        "# lordba reproduce: quality against adapter size\n",
        f"{title}. Run time {result['seconds']:.0f} s on {hw['cpu']} ({hw['torch_threads']} threads), "
        f"torch {hw['torch']}.\n",
        "BPW: payload bits per parameter of the fp16 LoRA r=16 basis (scales and group scales included). "
        "Metric: exact match of greedy answers; eval loss: completion cross-entropy.\n",
        markdown_table(columns, table),
        f"\nPer-layer relative reconstruction error of the r=16 PTQ conversion against the mean RMR of the "
        f"LoRA factors: Spearman ρ = {rho:.3f} over {len(result['conversion_layers'])} layers.\n",
        *_allocation_table(result["allocation_vs_uniform"]),
        "![sweep](sweep.png)\n\n![error vs RMR](error_vs_rmr.png)\n",
    ]
    (out / "reproduce.md").write_text("\n".join(md))


def _allocation_table(rows: list[dict]) -> list[str]:
    """The variants-against-uniform comparison as markdown lines (none without such points)."""
    if not rows:
        return []
    columns = ["uniform r", "variant", "file bytes (uniform / variant)", "ΔW rel. error (uniform / variant)",
               "held-out loss (uniform / variant)", "loss: variant − uniform (mean ± std)",
               "exact match: variant − uniform", "seeds variant wins", "ranks"]  # fmt: skip
    table = [
        [r["uniform_rank"], r["variant"], f"{r['uniform_file_bytes']:,} / {r['allocated_file_bytes']:,}",
         f"{r['uniform_rel_error']:.4f} / {r['allocated_rel_error']:.4f}",
         f"{r['uniform_loss_mean']:.4f} / {r['allocated_loss_mean']:.4f}",
         f"{r['loss_diff_mean']:+.4f} ± {r['loss_diff_std']:.4f}", f"{r['metric_diff_mean']:+.3f}",
         f"{r['allocated_wins']} / {r['seeds']}", r["rank_histogram"] or "uniform"]
        for r in rows
    ]  # fmt: skip
    return [
        "\n## Conversion variants against the uniform rank at the same file size\n",
        "Per-layer ranks (`target_bpw`: ΔW error, or with calibration the output error on the layers' "
        f"inputs, E[x²] over {CALIBRATION_BATCHES} training batches) and the activation-weighted solver at a uniform "
        "rank, judged on held-out loss, paired by seed (same trained LoRA, same held-out set).\n",
        markdown_table(columns, table),
        "",
    ]
