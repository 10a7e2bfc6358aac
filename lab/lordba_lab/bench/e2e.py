"""End to end on a device: lordba on its 4-bit bases side by side with llama.cpp (issue 18).

SmolLM2-135M-Instruct, one process, one thread count for everyone (``threads``, default 2: this
project's machine has 2 cores; ``$LORDBA_BENCH_THREADS`` or ``python -m lordba_lab.bench.e2e
--threads N``), one prompt (:data:`._e2e_models.TEXT` repeated to the length). Variants:

* lordba / PyTorch, on the base in float32 (``fp32``), ``q4`` (lordba's 4-bit kernels) and ``hqq``
  (4-bit g64), each plain, ``+LoRDBA`` (r=16, the seven projections, int8 scales, loaded packed
  from its file) and ``+LoRA`` (the same adapter exported by ``lordba export-lora``, run by PEFT);
* llama.cpp (llama-cpp-python, the optional extra ``lordba-lab[llamacpp]``) on the wheel's GGUF
  requantized to Q4_0, plain and ``+LoRA`` (that PEFT export converted by llama.cpp's own
  ``convert_lora_to_gguf.py``, f16). Without llama-cpp-python these rows are skipped with a message
  naming the extra; the rest runs.
* ``<base> aot`` and ``<base>+LoRDBA aot`` for the bases of ``aot`` (default q4): the eager
  models' decode step compiled ahead of time (:class:`lordba.nn.aot.AotDecode`, ``lordba generate
  --aot``), on a static cache of the prompt + 8 positions (float16, AotDecode's default); decode only;
* ``<base> compiled`` and ``<base>+LoRDBA compiled`` for the bases of ``compiled`` (default q4):
  the decode step ``torch.compile``'d (inductor) on a static KV cache, as ``lordba generate
  --compile`` runs it; decode only (their prefill is the eager model's), compiled before the timing
  (compile time and compiled-vs-eager logits in ``checks.compiled``).

Cases: ``prefill`` (the prompt from an empty cache; only the last position's logits, as generation
computes them: ``logits_to_keep=1``, llama.cpp likewise) and ``decode`` (one token after the
prompt; every step is cropped back, so each sees the same context). Interleaved rounds (the order
rotated), one untimed warm-up each; medians, interquartile ranges and paired ratios; then each base
timed again alternated only with its own adapters, for the adapters' overheads. Last, ``decode_run``:
decode as generation runs it, each variant making :data:`RUN_STEPS` steps in a row per round (the
single steps above each follow another model's step, whose weights have pushed this one's out of the
caches). Checks: the
llama.cpp LoRA changes llama.cpp's logits (it was applied) in the direction of lordba's adapter,
and each 4-bit base with LoRDBA stays close to the float32 base with LoRDBA. ``quick``: a 64-token
prompt and few rounds (about a minute). Writes ``bench.json`` (rows, checks, targets, hardware,
load), ``bench.md`` and ``e2e.png``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lordba._util.modules import cache_keyword, output_cache
from lordba.errors import LoRDBAError
from lordba_lab.bench import _e2e_models as M
from lordba_lab.bench import _llama_cpp, hardware
from lordba_lab.bench._e2e_report import plot, report, targets
from lordba_lab.bench._timing import (
    Stats,
    interleaved,
    load,
    median_ci,
    paired_ratio,
    stats,
    timed_runs,
    torch_threads,
)
from lordba_lab.outputs import write_text

SUITE = "e2e"
HELP = "SmolLM2 end to end: prefill and decode on fp32 / q4 / hqq bases, LoRDBA vs LoRA, beside llama.cpp"
DEFAULT = False
R = 16
LLAMA, LLAMA_LORA = "llama.cpp Q4_0", "llama.cpp Q4_0+LoRA"
RUN_STEPS = 12  # decode steps a variant makes in a row in the `decode_run` case (at least 10 rounds of them)


def load_model() -> tuple[torch.nn.Module, object | None, Path | None]:
    """``(model, tokenizer, folder)`` of the demo model, SmolLM2-135M-Instruct (the tests replace it)."""
    from lordba_lab.assets import load_model_and_tokenizer
    from lordba_lab.assets.models import resolve_model_path

    model, tok = load_model_and_tokenizer()
    return model, tok, Path(resolve_model_path(None))


def _llama_runners(peft_dir: Path, source: Path | None, threads: int, n_ctx: int) -> tuple[dict, str]:
    """``({name: LlamaRunner}, note)``: llama.cpp plain and with the converted LoRA, or no runner
    and the reason (no llama-cpp-python, not SmolLM2, a failed conversion)."""
    note = _llama_cpp.missing()
    if note is None and source is None:
        note = "llama.cpp rows skipped: they need SmolLM2-135M-Instruct (its GGUF), not this model"
    if note is not None:
        return {}, note
    try:  # each needs llama.cpp's tools (downloaded once with pip): a failure skips the rows, it does not end the run
        gguf = _llama_cpp.q4_0_gguf(threads)
        lora = _llama_cpp.lora_gguf(peft_dir, source)
    except LoRDBAError as e:
        return {}, f"llama.cpp rows skipped: {e}"
    runners = {
        LLAMA: _llama_cpp.LlamaRunner(gguf, threads, n_ctx),
        LLAMA_LORA: _llama_cpp.LlamaRunner(gguf, threads, n_ctx, lora=lora),
    }
    return runners, f"llama.cpp: {gguf.name}, LoRA {lora.name} ({lora.stat().st_size:,} B)"


def _checks(models: dict, runners: dict, ids: list[int]) -> dict:
    """Logits at the prompt's last position: each base (and base+LoRDBA) against the float32 one,
    the PEFT export against LoRDBA, and what llama.cpp's LoRA changes."""
    logits = {k: M.last_logits(m, ids) for k, m in models.items()}
    out: dict = {"lordba": {}}
    delta = None
    if "fp32" in logits:
        delta = logits["fp32+LoRDBA"] - logits["fp32"]
        out["adapter_change_rel_l2"] = float(delta.norm() / logits["fp32"].norm())
    for name in (k for k in models if "+" not in k):  # the bases
        row = {"lora_export_vs_lordba": M.closeness(logits[f"{name}+LoRA"], logits[f"{name}+LoRDBA"])}
        if "fp32" in logits and name != "fp32":
            row["base_vs_fp32"] = M.closeness(logits[name], logits["fp32"])
            row["lordba_vs_fp32_lordba"] = M.closeness(logits[f"{name}+LoRDBA"], logits["fp32+LoRDBA"])
            change = logits[f"{name}+LoRDBA"] - logits[name]  # the same adapter on another base
            row["adapter_change_cosine_vs_fp32"] = M.closeness(change, delta)["cosine"]
        if f"{name}+LoRDBA{M.FAST}" in logits:  # the prompt's branch in bfloat16 against float32
            row["fast_vs_exact"] = M.closeness(logits[f"{name}+LoRDBA{M.FAST}"], logits[f"{name}+LoRDBA"])
        out["lordba"][name] = row
    if runners:
        got = {}
        for k, runner in runners.items():
            runner.prefill(ids)
            got[k] = torch.from_numpy(runner.logits()).float()
        change = got[LLAMA_LORA] - got[LLAMA]
        out["llama_cpp"] = {
            "lora_max_abs_change": float(change.abs().max()),
            "lora_change_rel_l2": float(change.norm() / got[LLAMA].norm()),
            "lora_applied": bool(change.abs().max() > 1e-3),
            "base_vs_fp32": M.closeness(got[LLAMA], logits["fp32"]) if "fp32" in logits else None,
        }
        if delta is not None:
            out["llama_cpp"]["lora_change_cosine_vs_lordba"] = M.closeness(change, delta)["cosine"]
    return out


def _compile_steps(
    models: dict, compiled: dict, x: torch.Tensor, tok: torch.Tensor, aot: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """``({name: StaticDecode or AotStep}, checks)`` for the compiled variants (``torch.compile``'d
    models of ``compiled``; ahead-of-time compiled steps of the eager models named in ``aot``):
    each step compiled before the timing (its compile time in the checks) and its logits against its
    eager model's on the same static cache."""
    steps, checks = {}, {}
    length = x.shape[1] + 8  # as llama.cpp's context (the CLI rounds up to a power of two)
    for name, model in compiled.items():
        eager = models[name.removesuffix(M.COMPILED)]
        steps[name] = M.StaticDecode(model, x, length, prefill=eager)
        want = M.StaticDecode(eager, x, length).step(tok)[0, -1].float()
        graphs, start = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        got = steps[name].step(tok)[0, -1].float()
        checks[name] = {"compile_s": time.perf_counter() - start, "vs_eager": M.closeness(got, want),
                        "max_abs_diff": float((got - want).abs().max()),
                        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs}  # fmt: skip
        steps[name].back()
    for plain in aot:
        name = f"{plain}{M.AOT}"
        want = M.StaticDecode(models[plain], x, length).step(tok)[0, -1].float()
        start = time.perf_counter()
        steps[name] = M.AotStep(models[plain], x, length)
        got = steps[name].step(tok)[0, -1].float()
        d = steps[name].decode
        checks[name] = {"compile_s": d.compile_seconds, "export_s": d.export_seconds,
                        "setup_s": time.perf_counter() - start, "vs_eager": M.closeness(got, want),
                        "max_abs_diff": float((got - want).abs().max()),
                        "kv_dtype": str(d.kv_dtype).removeprefix("torch.")}  # fmt: skip
        steps[name].back()
    return steps, checks


def _time(
    models: dict, runners: dict, ids: list[int], quick: bool, steps: dict | None = None
) -> tuple[dict[str, dict[str, Stats]], dict[str, dict[str, Stats]]]:
    """``(timed, pairs)``: ``{"prefill": stats, "decode": stats}`` of every variant, all interleaved,
    and the same cases timed again per :func:`pair_groups` group (each base alternated with its own
    adapters only: the adapters' overheads); ``steps``: the compiled variants'
    :class:`._e2e_models.StaticDecode` (decode only: their prefill is the eager model's)."""
    steps = steps or {}
    prompt, step = ids[:-1], ids[-1]
    x, tok = torch.tensor([prompt]), torch.tensor([[step]])
    fns: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        for k, m in models.items():
            fns[k] = lambda m=m: m(input_ids=x, use_cache=False, logits_to_keep=1)
        for k, r in runners.items():
            fns[k] = lambda r=r: r.prefill(prompt)
        prefill = interleaved(fns, 10.0 if quick else 150.0, min_reps=3 if quick else 10, max_reps=40)
        # the pairs' prefill: 45 s a group (~30 rounds of fp32's three variants; 20 s gave intervals of ±3-5%)
        pairs = {"prefill": _pairs(fns, 2.0 if quick else 45.0, min_reps=3 if quick else 10, max_reps=80)}
        caches = {k: output_cache(m(input_ids=x, use_cache=True)) for k, m in models.items()}
        for r in runners.values():
            r.prefill(prompt)
        kvs = {k: {cache_keyword(m): caches[k]} for k, m in models.items()}  # (looked up once, not timed)
        fns = {k: (lambda m=m, kv=kvs[k]: m(input_ids=tok, use_cache=True, **kv)) for k, m in models.items()}
        fns.update({k: (lambda r=r: r.decode(len(prompt), step)) for k, r in runners.items()})
        fns.update({k: (lambda s=s: s.step(tok)) for k, s in steps.items()})

        def after(k: str) -> None:  # every step undone: each sees the same context
            if k in caches:
                caches[k].crop(-1)
            elif k in steps:
                steps[k].back()

        decode = interleaved(fns, 8.0 if quick else 90.0, min_reps=5 if quick else 30, max_reps=150, after=after)
        pairs["decode"] = _pairs(fns, 2.0 if quick else 15.0, min_reps=5 if quick else 40, max_reps=300, after=after)
        runs = _runs(fns, decode, quick, after)
    return {"prefill": prefill, "decode": decode, "decode_run": runs}, pairs


def run_steps(quick: bool) -> int:
    """Decode steps a variant makes in a row in the ``decode_run`` case: :data:`RUN_STEPS`, 3 when ``quick``."""
    return 3 if quick else RUN_STEPS


def _runs(
    fns: dict[str, Callable[[], object]], decode: dict[str, Stats], quick: bool, after: Callable[[str], None]
) -> dict[str, Stats]:
    """Decode as generation runs it: rounds in which each variant makes ``RUN_STEPS`` steps in a row (every
    step undone), the order rotated; one time per variant and round, the median of its steps after the first
    (:func:`._timing.timed_runs`). About 90 s, 10 to 30 rounds (quick: two rounds of 3 steps), sized from
    ``decode``'s medians.
    The interleaved single steps follow another model's step, whose weights have pushed this one's out of the
    caches: lordba's ``--aot`` steps measured ~20% slower that way, llama.cpp's ~10% (docs/kernels.md, stop 53)."""
    steps = run_steps(quick)
    per_round = steps * sum(st.median for st in decode.values())
    reps = 2 if quick else int(min(30, max(10, 90.0 / max(per_round, 1e-9))))
    return {k: stats(v) for k, v in timed_runs(fns, steps, reps, after).items()}


def _parts(name: str) -> tuple[str, str, str, str]:
    """``(plain, suffix, base, adapter)`` of a variant's name: ``"q4+LoRDBA aot"`` →
    ``("q4+LoRDBA", " aot", "q4", "LoRDBA")`` (``adapter`` empty for a base); its own base variant
    is ``base + suffix``."""
    plain = name.removesuffix(M.COMPILED).removesuffix(M.AOT)
    base, _, adapter = plain.partition("+")
    return plain, name[len(plain) :], base, adapter


def pair_groups(names: list[str]) -> dict[str, list[str]]:
    """``{base: [base, base+adapter, ...]}`` for every variant of ``names`` that has an adapter and
    whose base is timed too (compiled / ahead-of-time variants with their own base: ``q4 aot`` with
    ``q4+LoRDBA aot``; llama.cpp with its LoRA)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        _, suffix, base, _ = _parts(name)
        groups.setdefault(base + suffix, []).append(name)
    return {b: g for b, g in groups.items() if b in g and len(g) > 1}


def _pairs(fns: dict[str, Callable[[], object]], budget_s: float, **kw: object) -> dict[str, Stats]:
    """Every :func:`pair_groups` group of ``fns`` timed again on its own (``budget_s`` each): a base
    alternated only with its adapters, so each adapter's paired ratio compares calls made right after
    one another. Interleaved among every variant instead, a call follows whichever variant came before
    it in the round, and the same code's overhead measured 1.03 in the full suite and 1.08 with the
    q4 variants alone (stop 37)."""
    out: dict[str, Stats] = {}
    for group in pair_groups(list(fns)).values():
        out.update(interleaved({k: fns[k] for k in group}, budget_s, **kw))
    return out


def _rows(timed: dict[str, dict[str, Stats]], pairs: dict[str, dict[str, Stats]] | None = None) -> list[dict]:
    """One row per variant: medians, IQRs, ratios against fp32 and llama.cpp, and the adapter's
    overhead over its own base (paired: from ``pairs``' run of its group where given, else from
    ``timed``)."""
    rows = []
    for name in timed["decode"]:
        engine = "llama.cpp" if name.startswith("llama.cpp") else "lordba"
        plain, suffix, base, adapter = _parts(name)
        row: dict = {"variant": name, "engine": engine, "base": base, "adapter": adapter or "none"}
        row["compiled"] = bool(suffix)
        for case, st in ((c, st) for c, st in timed.items() if name in st):
            row[f"{case}_s"], row[f"{case}_iqr_s"], row[f"{case}_n"] = st[name].median, st[name].iqr, st[name].n
            for ref, key in (("fp32", "fp32"), (LLAMA, "llama"), (LLAMA_LORA, "llama_lora")):
                if ref in st:
                    row[f"{case}_vs_{key}"] = st[name].median / st[ref].median
            if adapter:
                own = (pairs or {}).get(case, {})
                src = own if name in own and base + suffix in own else st
                ratios = paired_ratio(src[name], src[base + suffix])
                row[f"{case}_overhead_paired"] = ratios.median
                row[f"{case}_overhead_ci"] = list(median_ci(ratios.samples))
            if suffix:
                row[f"{case}_vs_eager_paired"] = paired_ratio(st[name], st[plain]).median
        rows.append(row)
    return rows


def run(
    out_dir: Path,
    quick: bool,
    threads: int | None = None,
    bases: tuple[str, ...] = M.BASES,
    compiled: tuple[str, ...] = ("q4",),
    aot: tuple[str, ...] = ("q4",),
) -> list[Path]:
    """Measure, print and write ``bench.json``, ``bench.md`` and ``e2e.png`` into ``out_dir`` (see
    the module docstring); returns the files written. ``threads``: torch's and llama.cpp's threads
    (default ``$LORDBA_BENCH_THREADS`` or 2); ``bases``: a subset of :data:`._e2e_models.BASES`;
    ``compiled``: the bases (of ``bases``) also timed with a compiled decode step, plain and
    ``+LoRDBA`` (inductor takes 1-2 min per variant on 2 cores the first time); ``aot``: the bases
    (of ``bases``) also timed with an ahead-of-time compiled decode step (``lordba generate --aot``;
    export ~30 s and compile ~50 s per variant, the compile once per machine).

    Raises :class:`~lordba.errors.ConfigError` for an unknown base."""
    threads = threads or int(os.environ.get("LORDBA_BENCH_THREADS", "2"))
    with torch_threads(threads):
        return _run(Path(out_dir), quick, threads, bases, compiled, aot)


def _run(
    out_dir: Path, quick: bool, threads: int, bases: tuple[str, ...], compiled: tuple[str, ...], aot: tuple[str, ...]
) -> list[Path]:
    """:func:`run`'s measurement, with torch's threads set."""
    from lordba import kernels
    from lordba.kernels.q4 import amx_prefill_available, default_compute, native_bfloat16

    kernels.cpu_available()  # build (or load) the kernels before anything is timed
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = 64 if quick else 512
    model, tok, source = load_model()
    ids = M.prompt_ids(tok, prompt + 1, model.get_input_embeddings().num_embeddings)
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        lordba_dir, peft_dir = M.save_adapters(model, R, Path(tmp))
        models = M.variants(model, tuple(bases), lordba_dir, peft_dir, source)
        runners, note = _llama_runners(peft_dir, source, threads, prompt + 8)
        print(note)
        fast = M.compiled_variants(model, tuple(b for b in bases if b in compiled), lordba_dir, source)
        try:
            checks = _checks(models, runners, ids[:-1])
            with torch.inference_mode():
                ahead = tuple(f"{M.base_label(b)}{a}" for b in bases if b in aot for a in ("", "+LoRDBA"))
                steps, checks["compiled"] = _compile_steps(
                    models, fast, torch.tensor([ids[:-1]]), torch.tensor([[ids[-1]]]), ahead
                )
            timed, pairs = _time(models, runners, ids, quick, steps)
        finally:
            for r in runners.values():
                r.close()
    rows = _rows(timed, pairs)
    result = {
        "rows": rows,
        "checks": checks,
        "targets": targets(rows),
        "llama_cpp": note,
        "hardware": hardware(),
        "kernels": {"isa": kernels.cpu_isa(), "cpu_ext": kernels.cpu_available()},
        "settings": {"quick": quick, "threads": threads, "prompt_tokens": prompt, "r": R, "bases": list(bases),
                     "decode_run_steps": run_steps(quick),
                     "compiled": [b for b in bases if b in compiled], "aot": [b for b in bases if b in aot],
                     "lordba_scale_dtype": M.SCALE_DTYPE, "activation_dtype": "float32",
                     "q4_compute": default_compute(), "native_bfloat16": native_bfloat16(),
                     "branch_compute": kernels.branch_compute(), "tile_unit": amx_prefill_available(),
                     "llama_cpp_python": _llama_cpp.installed()},
        "load_avg_before": load_before,
        "load_avg_after": load(),
    }  # fmt: skip
    files = [out_dir / "bench.json", out_dir / "bench.md"]
    write_text(files[0], json.dumps(result, indent=1) + "\n")
    write_text(files[1], report(result))
    png = plot(rows, out_dir / "e2e.png")
    return [*files, *([png] if png else [])]


def main(argv: list[str] | None = None) -> int:
    """``python -m lordba_lab.bench.e2e [--quick] [--threads N] [--out DIR]``."""
    import argparse

    p = argparse.ArgumentParser(description=HELP)
    p.add_argument("--quick", action="store_true", help="64-token prompt, few rounds (about a minute)")
    p.add_argument("--threads", type=int, default=None, help="threads of torch and llama.cpp (default 2)")
    p.add_argument("--out", default="results/bench", help="output directory")
    args = p.parse_args(argv)
    for f in run(Path(args.out), args.quick, threads=args.threads):
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
