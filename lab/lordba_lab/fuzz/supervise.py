"""The processes of a fuzzing run (:func:`lordba_lab.fuzz.engine.fuzz`): libFuzzer in ``-jobs`` mode running the
workers (atheris), or a small supervisor running one worker at a time (hypothesis, mutate); each worker
started in its own process group with the lab importable, watched (progress, a case past its timeout, the
run's deadline) and stopped with its process group, asked for its Python stacks first where it hung. Why
it is done this way: :mod:`lordba_lab.fuzz.engine`'s docstring.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lordba_lab.fuzz.worker import STARTED, read_counters

_POLL_S = 0.2
_LIBFUZZER_PARENT = "import sys, atheris; atheris.Setup(sys.argv[1:], lambda data: None); atheris.Fuzz()"
Watch = Callable[[subprocess.Popen, bool], "str | None"]


def _run_libfuzzer(
    cmd: list[str],
    state: Path,
    corpus_dir: str | Path | None,
    deadline: float,
    case_timeout: float,
    seed: int,
    workers: int,
    watch: Watch,
) -> tuple[dict[int, Path], dict[int, str]]:
    """libFuzzer (``-jobs`` mode) runs the workers; ``({worker pid: its job's log}, verdicts)``: see
    :func:`_run_workers`."""
    from lordba_lab.fuzz.corpus import all_seed_cases, encode_case

    corpus = state / "corpus"  # libFuzzer joins its arguments into a shell command: no spaces in these paths
    if corpus_dir is not None:
        Path(corpus_dir).mkdir(parents=True, exist_ok=True)
        corpus.symlink_to(Path(corpus_dir).resolve(), target_is_directory=True)
    corpus.mkdir(exist_ok=True)
    for i, case in enumerate(all_seed_cases(seed=seed)):
        (corpus / f"seed-{i:03d}").write_bytes(encode_case(case))
    job = state / "job"
    job.write_text(
        "#!/bin/sh\n# A libFuzzer job: a fuzzing worker, unless the run's deadline has passed.\n"
        f'[ "$(date +%s)" -lt {int(deadline - 1)} ] || exit 0\nexec {shlex.join(cmd)} -- "$0" "$@"\n'
    )
    job.chmod(0o755)
    seconds = deadline - time.time()
    args = [str(job), str(corpus), f"-jobs={int(seconds // 2) + 2}", f"-workers={workers}"]
    args += [f"-timeout={math.ceil(case_timeout)}", f"-max_total_time={math.ceil(seconds)}"]
    args += [f"-artifact_prefix={state / 'artifacts'}/", "-create_missing_dirs=1", f"-max_len={1 << 17}"]
    stopped = watch(_start([sys.executable, "-c", _LIBFUZZER_PARENT, *args], state / "libfuzzer.log", cwd=state), False)
    logs = {}
    for path in sorted(state.glob("fuzz-*.log"), key=lambda p: int(p.stem[5:])):
        text = path.read_text(errors="replace")
        started = re.search(re.escape(STARTED) + r" (\d+)", text)
        if started:
            logs[int(started.group(1))] = path
        elif text and not read_counters(state):
            raise RuntimeError(f"the fuzzing worker failed to start:\n{text[-3000:]}")
    return logs, dict.fromkeys(logs, stopped) if stopped else {}


def _run_workers(cmd: list[str], state: Path, deadline: float, watch: Watch) -> tuple[dict[int, Path], dict[int, str]]:
    """One worker at a time until the deadline; ``({pid: log}, {pid: "timeout"})`` for the workers
    we stopped (a worker that dies in a case without a verdict or a libFuzzer artifact crashed)."""
    logs: dict[int, Path] = {}
    verdicts: dict[int, str] = {}
    while time.time() < deadline - 1.0:
        log = state / f"worker-{len(logs)}.log"
        proc = _start(cmd, log)
        logs[proc.pid] = log
        verdict = watch(proc, True)
        if verdict:
            verdicts[proc.pid] = verdict
        mine = [c for c in read_counters(state).values() if c.pid == proc.pid]
        if proc.returncode and not (mine and (mine[0].cases or mine[0].in_case)):
            raise RuntimeError(f"the fuzzing worker failed to start:\n{log.read_text(errors='replace')[-3000:]}")
    return logs, verdicts


def _start(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log``, with the lab importable."""
    paths = [str(Path(__file__).parents[2]), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in paths if p)}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _watch(
    proc: subprocess.Popen,
    hangs: bool,
    state: Path,
    deadline: float,
    case_timeout: float,
    bar: Any,
    start: float,
) -> str | None:
    """Show progress until ``proc`` ends; ``"timeout"`` if we stopped it: over a case running past
    ``case_timeout`` (with ``hangs``), or past the deadline (with its process group)."""
    try:
        while True:
            try:
                proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            counts = read_counters(state)
            if bar is not None:
                bar.n = min(round(time.time() - start, 1), bar.total)
                sums = {
                    k: sum(getattr(c, k) for c in counts.values()) for k in ("cases", "refused", "loaded", "unclean")
                }
                bar.set_postfix(**sums, refresh=False)
                bar.refresh()
            if proc.returncode is not None:
                return None
            now = time.time()
            hung = hangs and any(
                c.pid == proc.pid and c.in_case and now - c.case_start > case_timeout for c in counts.values()
            )
            if hung or now > deadline + case_timeout + 30:  # (past that, it ignores its deadline)
                _stop(proc, stacks=hangs)
                return "timeout"
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen, stacks: bool = False) -> None:
    """Kill ``proc``'s process group; with ``stacks``, first ask it for its Python stacks (SIGUSR1)."""
    if stacks and proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
