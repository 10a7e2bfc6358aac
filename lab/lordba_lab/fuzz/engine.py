"""Run a fuzzing engine against the adapter loader for a time budget and report the outcome.

Engines: ``atheris``, coverage-guided (libFuzzer) over lordba's code, with the structure-aware
mutators as its custom mutator and libFuzzer's byte mutations on one file at a time;
``hypothesis``, random structure-aware cases drawn by Hypothesis; ``mutate``, the same mutators
driven by a seeded ``random.Random`` (no extra dependency). Each case runs in a worker process
(:mod:`.worker`) and is judged by the oracle (:mod:`.oracle`); the processes are started, watched and
stopped by :mod:`.supervise`.

**atheris: libFuzzer supervises.** :func:`fuzz` starts one libFuzzer process in ``-jobs`` mode
(``-jobs=K -workers=W``): each job is a worker process, which libFuzzer starts through a small
script in the state directory (it runs its ``argv[0]`` with ``sh``). libFuzzer enforces the
per-input ``-timeout`` (atheris prints the Python stacks first) and ``-rss_limit_mb``, bounds each
job with ``-max_total_time``, and saves the input of a crash, timeout or OOM under
``-artifact_prefix``; a finding ends its job, and the next job goes on with the corpus directory,
where libFuzzer keeps what earlier jobs found, so one finding does not stop the run. Why ``-jobs``
and not ``-fork=N`` with ``-ignore_crashes/-ignore_timeouts/-ignore_ooms``: fork mode restarts
every job after 1, 2, 3... (up to 300) seconds and runs a merge process after each, and a worker
takes seconds to start (torch, instrumenting lordba: about 5 s here): with a target that slept
5 s at start, ``-fork=1 -max_total_time=60`` fuzzed for 21 s of its 62 s over 6 jobs. ``-jobs``
restarts a worker only after a finding.

**hypothesis, mutate: a small supervisor** (:func:`.supervise._run_workers`), since without libFuzzer nothing
else notices a hung or dead process: one worker at a time, killed when a case runs past
``case_timeout`` (after SIGUSR1: its Python stacks to its log), the next started until time is up.

**Ours for every engine, because libFuzzer's flags cannot give it:**

* The address-space cap (:func:`.worker.cap_memory`, ``mem_mb`` above what a worker maps at
  start). ``-rss_limit_mb`` polls the resident set once a second, and ``-malloc_limit_mb`` needs a
  sanitizer's malloc hooks, which CPython with atheris lacks: an allocation for an unchecked size
  that is never touched (``torch.empty(n)``) is not resident and passes both, and a touched one
  runs a second ahead (a 6 GiB ``bytes(n)`` passed ``-malloc_limit_mb=512``; 1.1 GiB was resident
  when ``-rss_limit_mb=1024`` stopped it). Under the cap the allocation itself fails, visibly:
  the oracle reports that case with the allocation's traceback. ``-rss_limit_mb`` is still set
  (``mem_mb`` above the job's resident set at start): a backstop, and the limit where the cap
  cannot be set (no ``/proc``).
* The report's counts and histograms: libFuzzer only knows whether an input crashed. Each worker
  counts the oracle's verdicts (refused / loaded / unclean, per reason and kind) in its slot of
  the state directory; the engine adds one unclean case for each worker that died in a case.
* Unclean oracle verdicts are saved by the worker, with the oracle's kind and detail, and it
  goes on: as crashes, each would end a job, and a job costs a worker start.
* The run's deadline: ``-max_total_time`` is per job and jobs restart, so a worker ends itself at
  the deadline and the job script starts nothing after it (the ``K`` jobs allow a finding every
  2 s, more than worker starts allow).
* The failures directory: libFuzzer's artifacts are saved as ``<kind>-<sha>.case`` with the
  job's log as detail, like the rest, for ``lordba fuzz --replay``.

The report counts cases tried, refused cleanly, loaded validly and failed uncleanly, with the
refusal reasons, and lists the saved failing inputs (replay them with :func:`replay`).
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lordba.errors import ConfigError
from lordba.format.atomic import atomic_write_bytes
from lordba_lab.fuzz.supervise import _run_libfuzzer, _run_workers, _watch
from lordba_lab.fuzz.worker import load_target, read_counters, save_failure

ENGINES = ("atheris", "hypothesis", "mutate")
_LIBFUZZER_STATUS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S*/(crash|timeout|oom|leak)-\w+)")


def default_engine() -> str:
    """``atheris`` where it is installed, else ``mutate``."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "mutate"
    return "atheris"


def _check_installed(engine: str) -> None:
    """Refuse an engine whose package is not installed here, naming it, before any worker starts (the worker's
    ImportError read as its failing to start: an internal error)."""
    if engine == "mutate":
        return
    try:
        importlib.import_module(engine)
    except ImportError:
        hint = "pip install atheris" if engine == "atheris" else "pip install hypothesis, or lordba's dev extra"
        raise ConfigError(f"the {engine} engine needs {engine} ({hint}); or use --engine mutate") from None


def engine_version(engine: str) -> str:
    """The engine and its version, for the report."""
    if engine == "mutate":
        from lordba._version import __version__

        return f"lordba {__version__}"
    try:
        return f"{engine} {metadata.version(engine)}"
    except metadata.PackageNotFoundError:
        return f"{engine} (not installed)"


def fuzz(
    seconds: float,
    engine: str = "mutate",
    out: str | Path | None = None,
    failures_dir: str | Path = "fuzz-failures",
    corpus_dir: str | Path | None = None,
    seed: int = 0,
    mem_mb: int = 1024,
    case_timeout: float = 20.0,
    target: str = "lordba_lab.fuzz.oracle:run_case",
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Fuzz the loader for ``seconds`` with ``engine``; returns (and writes to ``out``) the report.
    ``workers`` > 1 (atheris only) runs that many libFuzzer jobs at once."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    _check_installed(engine)
    if workers != 1 and (engine != "atheris" or workers < 1):
        raise ConfigError(f"workers must be 1, or (atheris only: libFuzzer runs them) more; got {workers}")
    out = _writable_out(out)
    failures = Path(failures_dir)
    earlier = set(failures.glob("*.case")) if failures.exists() else set()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    state = Path(tempfile.mkdtemp(prefix="lordba-fuzz-", dir=shm))
    start = time.time()
    deadline = start + seconds
    cmd = [sys.executable, "-m", "lordba_lab.fuzz.worker", "--engine", engine, "--deadline", repr(deadline)]
    cmd += ["--state", str(state), "--failures", str(failures.resolve()), "--seed", str(seed)]
    cmd += ["--mem-mb", str(mem_mb), "--target", target]
    bar = _progress_bar(seconds) if progress else None
    watch = functools.partial(_watch, state=state, deadline=deadline, case_timeout=case_timeout, bar=bar, start=start)
    try:
        if engine == "atheris":
            logs, verdicts = _run_libfuzzer(cmd, state, corpus_dir, deadline, case_timeout, seed, workers, watch)
        else:
            logs, verdicts = _run_workers(cmd, state, deadline, watch)
        totals = _collect(state, logs, verdicts, failures)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(state, ignore_errors=True)
    saved = list(dict.fromkeys(totals.pop("saved")))  # (the same input may end several workers)
    if failures.exists():  # what this run saved (the workers save unclean verdicts themselves)
        saved += sorted(str(p) for p in set(failures.glob("*.case")) - earlier if str(p) not in saved)
    elapsed = time.time() - start
    counts = {key: totals.pop(key) for key in ("cases", "refused", "loaded", "unclean")}
    report = {
        "engine": engine,
        "engine_version": engine_version(engine),
        "python": platform.python_version(),
        "seconds": seconds,
        "elapsed_s": round(elapsed, 1),
        "seed": seed,
        **counts,
        "cases_per_s": round(counts["cases"] / max(elapsed, 1e-9), 1),
        **totals,
        "workers": workers,
        "memory_cap_mb": mem_mb,
        "case_timeout_s": case_timeout,
        "failures_dir": str(failures),
        "failures": saved,
    }
    if out is not None:
        atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _writable_out(out: str | Path | None) -> Path | None:
    """``out`` as a path whose folder exists (made here), checked before the run, so that the report of a
    whole run is not lost to a path it cannot be written to.

    Raises:
        ConfigError: ``out`` is a directory, or its folder cannot be made (a file in its path)."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"out {out}: is a directory (name the report's file)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out {out}: cannot make its folder ({err.strerror or err})") from None
    return out


def _collect(state: Path, logs: dict[int, Path], verdicts: dict[int, str], failures: Path) -> dict[str, Any]:
    """Sum the workers' counters and stats; count each death in a case as an unclean case and
    save its input (libFuzzer's artifact, else the case in progress)."""
    hist: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: dict[str, Any] = {"cases": 0, "refused": 0, "loaded": 0, "unclean": 0, "saved": []}
    samples: list[str] = []
    errors: list[str] = []
    mutator_errors = peak = 0
    counts = read_counters(state)
    for slot, c in sorted(counts.items()):
        stats = _read_json(state / f"{slot}.stats.json")
        for key in ("refusal_reasons", "unclean_kinds", "loaded_kinds", "mutators"):
            hist[key].update(stats.get(key, {}))
        for key in ("cases", "refused", "loaded", "unclean"):
            totals[key] += getattr(c, key)
        mutator_errors += stats.get("mutator_errors", 0)
        samples += stats.get("mutator_error_samples", [])
        peak = max(peak, int(stats.get("peak_rss_mb", 0)))
        log = logs[c.pid].read_text(errors="replace") if c.pid in logs else ""
        if c.in_case:  # it died in a case: a crash, a hang or out of memory
            artifacts = _ARTIFACT.findall(log)
            if artifacts:
                path, kind = artifacts[-1]
                data = Path(path).read_bytes()
            else:
                kind, case = verdicts.get(c.pid, "crash"), state / f"{slot}.case"
                data = case.read_bytes() if case.exists() else b""
            totals["cases"] += 1
            totals["unclean"] += 1
            hist["unclean_kinds"][kind] += 1
            totals["saved"].append(
                str(save_failure(failures, data, kind, f"{kind} of the worker process\n{log[-4000:]}"))
            )
        elif not stats.get("finished"):  # died outside a case: a bug of the fuzzer, reported
            errors.append(log[-2000:])
    coverage = [
        tuple(map(int, m)) for p in logs.values() for m in _LIBFUZZER_STATUS.findall(p.read_text(errors="replace"))
    ]
    return {
        **totals,
        "loaded_kinds": dict(hist["loaded_kinds"]),
        "unclean_kinds": dict(hist["unclean_kinds"]),
        "refusal_reasons": dict(hist["refusal_reasons"].most_common(40)),
        "distinct_refusal_reasons": len(hist["refusal_reasons"]),
        "mutators": dict(sorted(hist["mutators"].items())),
        "libfuzzer_coverage": dict(zip(("edges", "features", "corpus"), max(coverage))) if coverage else {},
        "mutator_errors": mutator_errors,
        "mutator_error_samples": samples[:3],
        "worker_errors": errors,
        "workers_started": len(counts),
        "peak_rss_mb": peak,
    }


def _progress_bar(seconds: float) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=round(seconds, 1), unit="s", desc="fuzzing", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s{postfix}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def replay(paths: list[str | Path], target: str = "lordba_lab.fuzz.oracle:run_case") -> list[tuple[str, Any]]:
    """Run saved cases again (in this process): ``[(path, Result)]``.

    Raises:
        ConfigError: a path is no readable file (before any case runs)."""
    from lordba_lab.fuzz.corpus import decode_case

    cases = []
    for path in paths:  # every file read before any case runs
        try:
            cases.append((str(path), decode_case(Path(path).read_bytes())))
        except OSError as err:
            raise ConfigError(f"--replay {path}: cannot read the case ({err.strerror or err})") from None
    run = load_target(target)
    results = []
    with tempfile.TemporaryDirectory(prefix="lordba-replay-") as tmp:
        for path, case in cases:
            results.append((path, run(case, Path(tmp))))
    return results
