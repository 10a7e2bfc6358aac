"""``lordba reproduce``: the paper's quality comparisons as a sweep over adapter size, over seeds.

For each seed, on the sweep's model, 4-bit base, task and step budget (:data:`SWEEP_DEMO`:
SmolLM2-135M, the q4 base, ``reverse_words``, held-out n=500), one fp16 LoRA r=16 is trained and
then, at a range of sizes (bits per weight on the LoRA r=16 basis):

* LoRDBA ``ptq``: the trained LoRA converted at several output ranks (int8, int4 and float16 scales);
* LoRDBA ``ptq`` allocated: the same LoRA at the file size of a uniform rank, per-layer ranks chosen
  by ``convert_lora(target_bpw=...)`` (ΔW error, or output error with calibration), judged here on
  held-out loss against that uniform rank (:func:`~lordba_lab.demo.analysis.allocation_vs_uniform`);
* LoRDBA ``scales-only``: the converted signs frozen, the scales trained (the demo's scale budget);
* LoRDBA ``qat``: trained from the cold start with the same step budget as the LoRA (int8, int4 scales);
* fp16 LoRA truncated by SVD to rank 1, 2 (the matched-bytes fp16 adapter, no retraining);
* with ``--all-sizes``: ``qat`` and ``scales-only`` at r=4, 8, 16 (default r=16 only) and fp16 LoRA
  *trained* at rank 1 and 2 (the matched-bytes fp16 adapter, same step budget); ``--sizes-only`` runs just
  those additions (with the LoRA r=16 and the ptq points they start from), to read beside a default sweep;
* RTN of the factors at 1–2 bits, LoRAQuant-style and BitDelta-style (the low-bit baselines).

Every point is evaluated on one fixed held-out set, per example (exact match and completion loss);
the summary is mean ± standard deviation over seeds with 95% bootstrap intervals, and the issue's
two targets are checked on paired intervals (:mod:`lordba_lab.demo.analysis`). The per-layer
reconstruction error of the r=16 conversion is set against the LoRA factors' RMR (SPEC §3) with
its rank correlation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lordba.config import LoRDBAConfig
from lordba.convert import collect_input_moments, convert_lora, read_lora
from lordba.format.atomic import atomic_write_bytes
from lordba.format.sizes import size_report
from lordba.nn.model import LoRDBAModel
from lordba.train.loop import train_loop
from lordba.train.modes import build_adapter
from lordba_lab.baselines import bitdelta, loraquant, rtn, svd_truncate
from lordba_lab.demo.analysis import (
    allocation_vs_uniform,
    spearman,
    summarize,
    trained_target,
    trained_vs_matched_lora,
    training_free_target,
)
from lordba_lab.demo.families import (
    AGAINST_UNIFORM,
    BITDELTA,
    LORA,
    LORA_SMALL,
    LORAQUANT,
    LORDBA_ALLOCATED,
    LORDBA_ALLOCATED_CAL,
    LORDBA_CALIBRATED,
    LORDBA_PTQ,
    LORDBA_PTQ_FP16,
    LORDBA_PTQ_INT4,
    LORDBA_QAT,
    LORDBA_QAT_INT4,
    LORDBA_SCALES,
    LORDBA_SCALES_INT4,
    RTN,
    TRUNCATED,
)
from lordba_lab.demo.run import replaced_factors
from lordba_lab.demo.session import FULL, Demo, DemoSettings, _payload_lora, _train_lora
from lordba_lab.demo.session import QUICK as DEMO_QUICK
from lordba_lab.demo.sweep_report import CALIBRATION_BATCHES, write_tables
from lordba_lab.outputs import write_text


@dataclass
class ReproduceSettings:
    """The sweep; each LoRA and each QAT point is trained with ``demo.steps`` steps."""

    demo: DemoSettings = field(default_factory=lambda: SWEEP_DEMO)
    seeds: tuple[int, ...] = (0, 1, 2)
    ptq_ranks: tuple[int, ...] = (4, 8, 16, 32)  # int8 scales (the demo's scale format)
    ptq_fp16_ranks: tuple[int, ...] = (16,)  # the scale-dtype axis of the sweep
    ptq_int4_ranks: tuple[int, ...] = (8, 16, 32)
    allocated_at: tuple[int, ...] = (8, 16)  # per-layer ranks at the file size of these uniform ptq ranks
    calibrated_at: tuple[int, ...] = (16,)  # activation-weighted: uniform, and allocated at the same size
    allocation_candidates: tuple[int, ...] = (4, 8, 16, 32)  # each candidate rank is one full conversion
    qat_ranks: tuple[int, ...] = (16,)  # each QAT point costs a full training per seed
    qat_int4_ranks: tuple[int, ...] = (16,)
    scales_ranks: tuple[int, ...] = (16,)  # scales-only on the int8 ptq signs, demo.scales_steps steps
    scales_int4_ranks: tuple[int, ...] = (16,)  # on the int4 ptq signs
    lora_small_ranks: tuple[int, ...] = ()  # fp16 LoRA trained at about LoRDBA's bytes
    truncate_ranks: tuple[int, ...] = (1, 2)
    rtn_bits: tuple[int, ...] = (1, 2)
    low_bit_baselines: bool = True  # LoRAQuant-style and BitDelta-style
    # scales-only trains on the batches after the fp16 LoRA's (which its signs came from), not on the LoRA's
    # first ones again: on a corpus, re-reading them memorises (docs/results/reproduce_sotu)
    scales_fresh_batches: bool = False


# The sweep's task: reverse_words (base 0.5% exact match, fp16 LoRA r=16 90%: where fidelity shows),
# held-out n=500, on the q4 base (the library's default, 1.7x faster to evaluate than HQQ here).
SWEEP_DEMO = dataclasses.replace(
    FULL, measure_memory=False, task="reverse_words", eval_size=500, eval_batch=64, base="q4"
)
QUICK = ReproduceSettings(
    demo=DEMO_QUICK,
    seeds=(0, 1),
    ptq_ranks=(4, 16),
    ptq_fp16_ranks=(16,),
    ptq_int4_ranks=(4,),
    allocated_at=(4,),
    calibrated_at=(4,),
    allocation_candidates=(2, 4, 8),
    qat_ranks=(16,),
    qat_int4_ranks=(),
    scales_ranks=(4,),
    scales_int4_ranks=(4,),
    lora_small_ranks=(1,),
    truncate_ranks=(1,),
    rtn_bits=(1,),
)


# ``--r16-only``: the points at r=16 (the second model's sweep)
R16_ONLY = {"ptq_ranks": (16,), "ptq_fp16_ranks": (), "ptq_int4_ranks": (16,), "allocated_at": (), "calibrated_at": (),
            "qat_ranks": (16,), "qat_int4_ranks": (16,), "scales_ranks": (16,), "scales_int4_ranks": (16,),
            "lora_small_ranks": ()}  # fmt: skip
# ``--all-sizes``: every trained family at every size (about 3x the run time: ~2.5 h on 2 cores)
ALL_SIZES = {"qat_ranks": (4, 8, 16), "scales_ranks": (4, 8, 16), "lora_small_ranks": (1, 2)}
# ``--sizes-only``: only the trained points ``--all-sizes`` adds to the default sweep, with the fp16 LoRA r=16
# they are judged against and the ptq points scales-only starts from (no training-free baselines: the
# default sweep's, same seeds and held-out set; its LoRA and ptq points recur here, a check of the pairing)
SIZES_ONLY = {"ptq_ranks": (4, 8), "ptq_fp16_ranks": (), "ptq_int4_ranks": (), "allocated_at": (), "calibrated_at": (),
              "qat_ranks": (4, 8), "qat_int4_ranks": (), "scales_ranks": (4, 8), "scales_int4_ranks": (),
              "lora_small_ranks": (1, 2), "truncate_ranks": (), "rtn_bits": (), "low_bit_baselines": False}  # fmt: skip


def _config(demo: Demo, mode: str, r: int, scale_dtype: str | None = None) -> LoRDBAConfig:
    s = demo.s
    return LoRDBAConfig(
        r=r,
        alpha=2.0 * r,
        target_modules=list(s.targets),
        mode=mode,
        scale_dtype=scale_dtype or s.scale_dtype,
        base_model_name_or_path=s.model,
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
    variants += [(RTN, f"{b}-bit g64", lambda A, B, b=b: rtn(A, B, b, 64)) for b in settings.rtn_bits]
    if settings.low_bit_baselines:
        variants += [
            (LORAQUANT, "2-bit head + 1-bit tail", lambda A, B: loraquant(A, B, 2, 0.8, 128)),
            (BITDELTA, "sign x 1 scale/matrix", bitdelta),
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
    scales_from = {(LORDBA_PTQ, r): (LORDBA_SCALES, s.scale_dtype) for r in settings.scales_ranks}
    scales_from |= {(LORDBA_PTQ_INT4, r): (LORDBA_SCALES_INT4, "int4") for r in settings.scales_int4_ranks}
    ptq = [(LORDBA_PTQ, r, s.scale_dtype) for r in settings.ptq_ranks]
    ptq += [(LORDBA_PTQ_FP16, r, "float16") for r in settings.ptq_fp16_ranks]
    ptq += [(LORDBA_PTQ_INT4, r, "int4") for r in settings.ptq_int4_ranks]
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
        if (family, r) in scales_from:
            states[family, r] = state
        if r == s.r and family == LORDBA_PTQ:
            layers = [
                {"seed": seed, "module": x.path, "rmr_A": x.rmr_A, "rmr_B": x.rmr_B, "rel_error": x.rel_error}
                for x in report.layers
            ]
        demo.model = lm.unload()
    for (ptq_family, r), (family, scale_dtype) in scales_from.items():
        lm = LoRDBAModel(demo.model)
        cfg = _config(demo, "scales-only", r, scale_dtype)
        lm.load_adapter_state(dataclasses.replace(states[ptq_family, r], config=cfg), "default", is_trainable=True)
        lm.set_adapter("default")
        first = s.steps if settings.scales_fresh_batches else 0  # the LoRA read batches 0 .. s.steps - 1
        train = dataclasses.replace(demo.settings(s.scales_steps, s.lr_lordba), first_batch=first)
        train_loop(lm, demo.batcher, train, progress=demo.progress, description=f"seed {seed}: {family} r={r}")
        point(family, f"r={r}", lm.size_report().payload_bytes, lm)
        demo.model = lm.unload()
    qat = [(LORDBA_QAT, r, s.scale_dtype) for r in settings.qat_ranks]
    qat += [(LORDBA_QAT_INT4, r, "int4") for r in settings.qat_int4_ranks]
    for family, r, scale_dtype in qat:
        lm, _ = build_adapter(
            demo.model,
            _config(demo, "qat", r, scale_dtype),
            demo.batcher,
            demo.settings(s.steps, s.lr_lordba),
            out_dir=demo.out / "work" / f"qat_{scale_dtype}_r{r}_seed{seed}",
            resume=False,
            progress=demo.progress,
        )
        point(family, f"r={r}", lm.size_report().payload_bytes, lm)
        demo.model = lm.unload()
    return points, layers


def _seed_file(out: Path, seed: int) -> Path:
    return out / "seeds" / f"seed{seed}.json"


_ADDED_LATER = {"low_bit_baselines": True, "scales_fresh_batches": False}  # settings added after seeds were kept


def _settings_key(settings: ReproduceSettings) -> str:
    """What a kept seed's points depend on: every setting but the list of seeds."""
    described = dataclasses.asdict(dataclasses.replace(settings, seeds=()))
    for name, default in _ADDED_LATER.items():  # at their defaults left out, so that kept seeds stay valid
        if described[name] == default:
            del described[name]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _keep_seed(
    out: Path, settings: ReproduceSettings, seed: int, points: list[dict], layers: list[dict], seconds: float = 0.0
) -> None:
    """Write one finished seed's points (atomically) so that ``resume`` can skip it; ``seconds``: its run time."""
    record = {"settings_key": _settings_key(settings), "seed": seed, "points": points, "layers": layers}
    record["seconds"] = seconds
    path = _seed_file(out, seed)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record) + "\n").encode())


def _kept_record(out: Path, settings: ReproduceSettings, seed: int) -> dict | None:
    """A finished seed's record (``points``, ``layers``, ``seconds`` where recorded) from an earlier run with
    the same settings, else ``None`` (absent, unreadable, or written under other settings: that seed runs
    again)."""
    try:
        record = json.loads(_seed_file(out, seed).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("settings_key") != _settings_key(settings):
        return None
    return record


def _kept_seed(out: Path, settings: ReproduceSettings, seed: int) -> tuple[list[dict], list[dict]] | None:
    """A finished seed's ``(points, layers)`` (:func:`_kept_record`), else ``None``."""
    record = _kept_record(out, settings, seed)
    return None if record is None else (record["points"], record["layers"])


def run_reproduce(
    out: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    progress: bool = True,
    all_sizes: bool = False,
    resume: bool = False,
    r16_only: bool = False,
    model: str | None = None,
    task: str | None = None,
    sizes_only: bool = False,
    scales_fresh_batches: bool = False,
) -> dict:
    """Run the sweep; writes ``reproduce.json``, ``reproduce.md``, ``sweep.png`` and ``error_vs_rmr.png``.
    ``all_sizes``: QAT, scales-only and a trained fp16 LoRA at every size (:data:`ALL_SIZES`);
    ``r16_only``: the points at r=16 only (:data:`R16_ONLY`); ``sizes_only``: only what ``all_sizes`` adds
    (:data:`SIZES_ONLY`, read beside the default sweep's results); ``model``, ``task``: instead of the
    sweep's (an embedded model's name or a folder; a built-in task); ``scales_fresh_batches``: scales-only
    trains on the batches after the fp16 LoRA's (:attr:`ReproduceSettings.scales_fresh_batches`).
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
    if r16_only:
        settings = dataclasses.replace(settings, **R16_ONLY)
    if sizes_only:
        settings = dataclasses.replace(settings, **SIZES_ONLY)
    if scales_fresh_batches:
        settings = dataclasses.replace(settings, scales_fresh_batches=True)
    if model is not None or task is not None:
        demo = dataclasses.replace(settings.demo, model=model or settings.demo.model, task=task or settings.demo.task)
        settings = dataclasses.replace(settings, demo=demo)
    t0 = time.perf_counter()
    points: list[dict] = []
    layers: list[dict] = []
    fixed_eval = None
    seed_seconds: dict[int, float | None] = {}
    for i, seed in enumerate(settings.seeds):
        record = _kept_record(out, settings, seed) if resume else None
        kept = None if record is None else (record["points"], record["layers"])
        if kept is None or fixed_eval is None:
            demo = Demo(out, dataclasses.replace(settings.demo, seed=seed), progress)
            demo.keep_details = True
        if fixed_eval is None:  # one held-out set for every seed: the seeds vary the training only
            fixed_eval = demo.eval_examples
            base = demo.add_row("base", None, 0, None)
            points.append({"seed": seed, "family": "base", "label": "", **base})
        if kept is None:
            demo.eval_examples = fixed_eval
            t_seed = time.perf_counter()
            kept = _one_seed(demo, settings, seed)
            seed_seconds[seed] = time.perf_counter() - t_seed
            _keep_seed(out, settings, seed, *kept, seed_seconds[seed])
        else:
            seed_seconds[seed] = record.get("seconds")  # None: kept before its time was recorded
        points += kept[0]
        layers += kept[1]
        if progress:
            print(f"seed {seed} done ({i + 1}/{len(settings.seeds)}, {time.perf_counter() - t0:.0f} s)")
    summary = summarize(points)
    rmr = [0.5 * (x["rmr_A"] + x["rmr_B"]) for x in layers]
    rho = spearman(rmr, [x["rel_error"] for x in layers]) if layers else None
    result = {
        "settings": dataclasses.asdict(settings),
        "hardware": hardware(),
        "seconds": time.perf_counter() - t0,
        "seed_seconds": seed_seconds,  # None: read back from seeds/ without a recorded time
        "summary": summary,
        "training_free_target": training_free_target(points),
        "trained_target": trained_target(points, (LORA, f"r={settings.demo.r}")),
        "trained_vs_matched_lora": trained_vs_matched_lora(points),
        "points": points,
        "rmr_error_spearman": rho,
        "allocation_vs_uniform": allocation_vs_uniform(points),
        "conversion_layers": layers,
    }
    write_text(out / "reproduce.json", json.dumps(result, indent=1) + "\n")
    write_tables(out, result)
    d = settings.demo
    sweep(summary, out / "sweep.png", f"exact match (held-out n={d.eval_size})", f"{d.task} on {d.model}")
    if layers:
        error_vs_rmr(layers, out / "error_vs_rmr.png")
    return result
