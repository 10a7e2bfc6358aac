"""Run a fuzzing engine against the adapter loader for a time budget and report the outcome.

:func:`fuzz` supervises worker processes (:mod:`lordba_lab.fuzz.worker`): it gives each the time
left, watches the case in progress, kills a worker whose case runs past ``case_timeout`` (a hang)
and notices one that dies (a crash), saves that input, and starts a new worker until the time is
up. Each worker caps its own address space (``mem_mb`` above what it maps at start), so a loader
that allocates for an unchecked size fails visibly. Engines:

* ``atheris``: coverage-guided (libFuzzer) over lordba's code, with the structure-aware mutators
  as its custom mutator and libFuzzer's byte mutations on one file at a time;
* ``hypothesis``: random structure-aware cases drawn by Hypothesis;
* ``mutate``: the same mutators driven by a seeded ``random.Random`` (no extra dependency).

The report counts cases tried, refused cleanly, loaded validly and failed uncleanly (see
:mod:`lordba_lab.fuzz.oracle`), with the refusal reasons, and lists the saved failing inputs (replay
them with :func:`replay` or ``lordba fuzz --replay``).
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lordba.errors import ConfigError
from lordba_lab.fuzz.worker import COUNTERS, save_failure

ENGINES = ("atheris", "hypothesis", "mutate")
_POLL_S = 0.2
_LIBFUZZER_STATUS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


def default_engine() -> str:
    """``atheris`` where it is installed, else ``mutate``."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "mutate"
    return "atheris"


def engine_version(engine: str) -> str:
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
) -> dict[str, Any]:
    """Fuzz the loader for ``seconds`` with ``engine``; returns (and writes to ``out``) the report."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "atheris" and default_engine() != "atheris":
        raise ConfigError("the atheris engine needs atheris (pip install atheris); or use --engine mutate")
    failures = Path(failures_dir)
    earlier = set(failures.glob("*.case")) if failures.exists() else set()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    state = Path(tempfile.mkdtemp(prefix="lordba-fuzz-", dir=shm))
    corpus = Path(corpus_dir) if corpus_dir else state / "corpus"
    (state / "counters").write_bytes(bytes(COUNTERS.size))
    fd = os.open(state / "counters", os.O_RDWR)
    counters = mmap.mmap(fd, COUNTERS.size)
    os.close(fd)
    start = time.time()
    deadline = start + seconds
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    saved: list[str] = []
    samples: list[str] = []
    worker_errors: list[str] = []
    workers = 0
    bar = _progress_bar(seconds) if progress else None
    try:
        while time.time() < deadline - 1.0:
            workers += 1
            proc = _start_worker(engine, deadline, state, failures, corpus, seed + workers - 1, mem_mb, target)
            kind = _watch(proc, counters, deadline, case_timeout, bar, start)
            stats = _read_json(state / "stats.json")
            for key in ("refusal_reasons", "unclean_kinds", "loaded_kinds", "mutators"):
                totals[key].update(stats.get(key, {}))
            totals["mutator_errors"]["count"] += stats.get("mutator_errors", 0)
            samples += stats.get("mutator_error_samples", [])
            if kind == "worker-error":  # died outside a case: a bug of the fuzzer, reported
                worker_errors.append((state / "worker.log").read_text(errors="replace")[-2000:])
                kind = None
            totals["peak_rss_mb"]["max"] = max(totals["peak_rss_mb"]["max"], int(stats.get("peak_rss_mb", 0)))
            (state / "stats.json").unlink(missing_ok=True)
            coverage = _LIBFUZZER_STATUS.findall((state / "worker.log").read_text(errors="replace"))
            if coverage:
                totals["coverage"].update(dict(zip(("edges", "features", "corpus"), map(int, coverage[-1]))))
            if kind:  # a hang or a crash: count it against the case in progress and save it
                values = list(COUNTERS.unpack(counters[: COUNTERS.size]))
                values[0] += 1
                values[3] += 1
                values[4] = 0
                counters[: COUNTERS.size] = COUNTERS.pack(*values)
                totals["unclean_kinds"][kind] += 1
                log = (state / "worker.log").read_text(errors="replace")[-4000:]
                current = state / "current.case"
                data = current.read_bytes() if current.exists() else b""
                saved.append(str(save_failure(failures, data, kind, f"{kind} of the worker process\n{log}")))
    finally:
        if bar is not None:
            bar.close()
        cases, refused, loaded, unclean, _, _ = COUNTERS.unpack(counters[: COUNTERS.size])
        counters.close()
        shutil.rmtree(state, ignore_errors=True)
    if failures.exists():  # what this run saved (the workers save unclean cases themselves)
        saved += sorted(str(p) for p in set(failures.glob("*.case")) - earlier if str(p) not in saved)
    report = {
        "engine": engine,
        "engine_version": engine_version(engine),
        "python": platform.python_version(),
        "seconds": seconds,
        "elapsed_s": round(time.time() - start, 1),
        "seed": seed,
        "cases": cases,
        "refused": refused,
        "loaded": loaded,
        "unclean": unclean,
        "cases_per_s": round(cases / max(time.time() - start, 1e-9), 1),
        "loaded_kinds": dict(totals["loaded_kinds"]),
        "unclean_kinds": dict(totals["unclean_kinds"]),
        "refusal_reasons": dict(totals["refusal_reasons"].most_common(40)),
        "distinct_refusal_reasons": len(totals["refusal_reasons"]),
        "mutators": dict(sorted(totals["mutators"].items())),
        "libfuzzer_coverage": dict(totals["coverage"]),
        "mutator_errors": totals["mutator_errors"]["count"],
        "mutator_error_samples": samples[:3],
        "worker_errors": worker_errors,
        "workers_started": workers,
        "memory_cap_mb": mem_mb,
        "peak_rss_mb": totals["peak_rss_mb"]["max"],
        "case_timeout_s": case_timeout,
        "failures_dir": str(failures),
        "failures": saved,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _start_worker(
    engine: str, deadline: float, state: Path, failures: Path, corpus: Path, seed: int, mem_mb: int, target: str
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lordba_lab.fuzz.worker", "--engine", engine, "--deadline", repr(deadline)]
    cmd += ["--state", str(state), "--failures", str(failures), "--corpus", str(corpus), "--seed", str(seed)]
    cmd += ["--mem-mb", str(mem_mb), "--target", target]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(state / "worker.log", "wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def _watch(
    proc: subprocess.Popen, counters: mmap.mmap, deadline: float, case_timeout: float, bar: Any, start: float
) -> str | None:
    """Wait for the worker; ``"timeout"`` if we killed it over a hung case, ``"crash"`` if it died
    abnormally in a case, else ``None``."""
    while True:
        try:
            rc = proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            rc = None
        cases, refused, loaded, unclean, in_case, case_start = COUNTERS.unpack(counters[: COUNTERS.size])
        if bar is not None:
            bar.n = min(round(time.time() - start, 1), bar.total)
            bar.set_postfix(cases=cases, refused=refused, loaded=loaded, unclean=unclean, refresh=False)
            bar.refresh()
        if rc is not None:
            if rc != 0 and not in_case and not cases:
                log = Path(proc.args[proc.args.index("--state") + 1]) / "worker.log"
                raise RuntimeError(f"the fuzzing worker failed to start:\n{log.read_text(errors='replace')[-3000:]}")
            if rc != 0:
                return "crash" if in_case else "worker-error"
            return None
        now = time.time()
        if in_case and now - case_start > case_timeout:
            _stop_with_stacks(proc)
            return "timeout"
        if now > deadline + case_timeout + 30:  # the worker ignores its deadline: stop it
            _stop_with_stacks(proc)
            return "worker-error"


def _stop_with_stacks(proc: subprocess.Popen) -> None:
    """Kill a worker after asking it to write its Python stacks to its log (faulthandler)."""
    proc.send_signal(signal.SIGUSR1)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    """Run saved cases again (in this process): ``[(path, Result)]``."""
    from lordba_lab.fuzz.corpus import decode_case
    from lordba_lab.fuzz.worker import _load_target

    run = _load_target(target)
    results = []
    with tempfile.TemporaryDirectory(prefix="lordba-replay-") as tmp:
        for path in paths:
            results.append((str(path), run(decode_case(Path(path).read_bytes()), Path(tmp))))
    return results
