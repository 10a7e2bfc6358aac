"""The fuzzing worker process: runs one engine until a deadline, under a memory cap.

Started by :func:`lordba_lab.fuzz.engine.fuzz`, never by hand:
``python -m lordba_lab.fuzz.worker --engine E --state DIR ... [-- LIBFUZZER_ARGS]``; for atheris
each worker is a libFuzzer job (libFuzzer's ``-jobs`` mode starts it through the script the
engine writes, see :mod:`.engine`). A worker takes the first free slot ``N`` in the state
directory and keeps there what the engine reports:

* ``N.counters``: cases, refused, loaded, unclean, whether a case is in progress and since when,
  and the worker's pid (:data:`COUNTERS`, memory-mapped and updated around every case, so it is
  exact even when the process is killed in a case: the engine then counts that case, and the
  input libFuzzer saved, or ``N.case``, as a finding);
* ``N.stats.json``: refusal reasons, outcome kinds, mutators, mutator errors, peak RSS, and
  ``finished`` once the worker reached its deadline (rewritten every second, after an unclean
  verdict and at the end: a process that dies loses at most a second of the refusal and
  mutator histograms, never a finding);
* ``N.case`` (mutate and hypothesis only): the case in progress (libFuzzer saves its own).

Unclean verdicts of the oracle are saved here with the oracle's kind and detail, and the worker
goes on: they are not crashes of the process (a libFuzzer crash would end the job, and starting
a worker costs seconds: torch, instrumenting lordba).
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import hashlib
import importlib
import itertools
import json
import mmap
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

COUNTERS = struct.Struct("<qqqqqdq")
_WS = re.compile(r"/\S*?/(adapter_config\.json|lordba_model\.safetensors|\.\S+-prev)")
STARTED = "lordba fuzz worker: pid"  # the first line a worker prints (the engine maps logs to workers by it)


class Counts(NamedTuple):
    """One worker's :data:`COUNTERS`."""

    cases: int
    refused: int
    loaded: int
    unclean: int
    in_case: int
    case_start: float
    pid: int


def read_counters(state: Path) -> dict[int, Counts]:
    """``{slot: Counts}`` of the workers that have started in ``state``."""
    out = {}
    for path in state.glob("*.counters"):
        raw = path.read_bytes()
        if len(raw) == COUNTERS.size:
            out[int(path.stem)] = Counts(*COUNTERS.unpack(raw))
    return out


class Recorder:
    """Counts outcomes, saves unclean inputs, and publishes progress in its slot of ``state``."""

    def __init__(self, state: Path, failures: Path, target: Callable[..., Any], save_current: bool) -> None:
        self.state, self.failures, self.target, self.save_current = state, failures, target, save_current
        for slot in itertools.count():  # the first free slot (O_EXCL: concurrent workers get distinct ones)
            try:
                fd = os.open(state / f"{slot}.counters", os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            break
        self.slot = slot
        self.values: list[Any] = [0, 0, 0, 0, 0, 0.0, os.getpid()]
        os.write(fd, COUNTERS.pack(*self.values))
        self.counters = mmap.mmap(fd, COUNTERS.size)
        os.close(fd)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"work-{slot}-", dir=state))  # the engine removes state
        self.reasons: collections.Counter[str] = collections.Counter()
        self.unclean: collections.Counter[str] = collections.Counter()
        self.loaded: collections.Counter[str] = collections.Counter()
        self.mutators: collections.Counter[str] = collections.Counter()
        self.mutator_errors = 0
        self.mutator_error_samples: list[str] = []
        self.last_dump = 0.0

    def mutate(self, fn: Callable[[], Any], fallback: Any) -> Any:
        """Run a mutation; an exception in it is a bug of the fuzzer, not of the loader: it is
        recorded (and reported) and ``fallback`` is used instead."""
        try:
            return fn()
        except Exception:
            self.mutator_errors += 1
            if len(self.mutator_error_samples) < 3:
                self.mutator_error_samples.append(traceback.format_exc()[-1500:])
            return fallback

    def run(self, data: bytes, mutators: list[str] | None = None) -> None:
        """Judge one case (encoded) with the target and record the outcome."""
        from lordba_lab.fuzz.corpus import decode_case
        from lordba_lab.fuzz.oracle import LOADED, REFUSED

        if self.save_current:
            (self.state / f"{self.slot}.case").write_bytes(data)
        self.values[4], self.values[5] = 1, time.time()
        self._publish()
        result = self.target(decode_case(data), self.workdir)
        self.values[0] += 1
        self.values[4] = 0
        if result.outcome == REFUSED:
            self.values[1] += 1
            self.reasons[reason(result.detail)] += 1
        elif result.outcome == LOADED:
            self.values[2] += 1
            self.loaded[result.kind] += 1
        else:
            self.values[3] += 1
            self.unclean[result.kind] += 1
            save_failure(self.failures, data, result.kind, result.detail)
        self.mutators.update(mutators or ())
        self._publish()
        if result.outcome not in (REFUSED, LOADED) or time.time() - self.last_dump > 1.0:
            self.dump()  # at once for a finding: the process may die within the second

    def _publish(self) -> None:
        self.counters[: COUNTERS.size] = COUNTERS.pack(*self.values)

    def dump(self, finished: bool = False) -> None:
        """Write ``N.stats.json`` (atomically)."""
        self.last_dump = time.time()
        stats = {
            "refusal_reasons": dict(self.reasons),
            "unclean_kinds": dict(self.unclean),
            "loaded_kinds": dict(self.loaded),
            "mutators": dict(self.mutators),
            "mutator_errors": self.mutator_errors,
            "mutator_error_samples": self.mutator_error_samples,
            "peak_rss_mb": peak_rss_mb(),
            "finished": finished,
        }
        tmp = self.state / f"{self.slot}.stats.json.tmp"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.state / f"{self.slot}.stats.json")

    def finish(self) -> None:
        """The deadline is reached: write the final stats and end the process (libFuzzer's own
        exit would skip Python's clean-up anyway)."""
        self.dump(finished=True)
        sys.stdout.flush()
        os._exit(0)


def reason(message: str) -> str:
    """A refusal message reduced to its kind, for the report's histogram."""
    text = _WS.sub(r"\1", message)
    text = re.sub(r"(?<![A-Za-z])'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b(model|encoder)\.[\w.-]+", "<module>", text)
    text = re.sub(r"\d+", "N", text)
    return text[:90]


def save_failure(directory: Path, data: bytes, kind: str, detail: str) -> Path:
    """Save a failing input (``<kind>-<sha>.case``, replay with ``lordba fuzz --replay``) and its detail
    (``<kind>-<sha>.txt``, written first), each whole or not at all: a worker killed or interrupted while writing
    leaves no truncated case, which a later replay would decode as another, shorter case."""
    from lordba.format.atomic import atomic_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9_-]', '_', kind)}-{hashlib.sha256(data).hexdigest()[:12]}"
    atomic_write_bytes(directory / f"{stem}.txt", (detail + "\n").encode())
    atomic_write_bytes(directory / f"{stem}.case", data)
    return directory / f"{stem}.case"


def peak_rss_mb() -> int:
    """This process's peak resident memory (MiB), as libFuzzer's ``-rss_limit_mb`` measures it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def cap_memory(mem_mb: int) -> None:
    """Limit the address space to what is mapped now plus ``mem_mb``: a loader that allocates for
    a size it has not checked fails here instead of taking the machine down."""
    try:
        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # no /proc (macOS): no cap
    limit = vm_bytes + (mem_mb << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def load_target(spec: str) -> Callable[..., Any]:
    """The callable ``module:name`` (a fuzz target: ``(case, workdir) -> oracle.Result``)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_mutate(rec: Recorder, deadline: float, seed: int) -> None:
    """The seeds, then random structure-aware mutations of them, until ``deadline``."""
    from lordba_lab.fuzz.corpus import all_seed_cases, encode_case
    from lordba_lab.fuzz.mutate import mutate

    seeds = all_seed_cases(seed=seed)
    rng = random.Random(seed)
    for case in seeds:
        rec.run(encode_case(case), ["seed"])
    while time.time() < deadline:
        seed_case = rng.choice(seeds)
        case, names = rec.mutate(lambda seed_case=seed_case: mutate(rng, seed_case), (seed_case, ["seed"]))
        rec.run(encode_case(case), names)


def run_hypothesis(rec: Recorder, deadline: float, seed: int) -> None:
    """Chains of mutators drawn by Hypothesis, in batches of 50, until ``deadline``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from lordba_lab.fuzz.corpus import all_seed_cases, encode_case, fix_checksum
    from lordba_lab.fuzz.mutate import MUTATORS

    seeds = all_seed_cases(seed=seed)

    @settings(
        max_examples=50,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from(seeds),
        st.lists(st.sampled_from(sorted(MUTATORS)), min_size=1, max_size=4),
        st.integers(0, 2**32 - 1),  # not st.randoms(): it draws lazily, which Hypothesis flags as flaky
        st.sampled_from([None, False, True]),
    )
    def one(case: dict[str, bytes], names: list[str], rng_seed: int, fix: bool | None) -> None:
        rng = random.Random(rng_seed)

        def mutated() -> dict[str, bytes]:
            out = case
            for name in names:
                out = MUTATORS[name](rng, out)
            return fix_checksum(out, backups=fix) if fix is not None else out

        rec.run(encode_case(rec.mutate(mutated, case)), [*names, *(["fix_checksum"] if fix is not None else [])])

    while time.time() < deadline:  # checked between batches of 50: never inside a test
        one()


def run_atheris(rec: Recorder, deadline: float, seed: int, mem_mb: int, libfuzzer_args: list[str]) -> None:
    """One libFuzzer job over lordba's instrumented code, with the structure-aware mutators as its
    custom mutator; libFuzzer enforces ``-timeout`` and ``-rss_limit_mb`` and saves the input of
    a crash, timeout or OOM (ending this process); this process ends itself at ``deadline``."""
    import gc

    import atheris

    from lordba_lab.fuzz.corpus import all_seed_cases, decode_case, encode_case, fix_checksum
    from lordba_lab.fuzz.mutate import mutate

    # Coverage of lordba's own code (not torch's): instrument its functions in place.
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            module = obj.__module__ or ""
            if module.startswith("lordba.") and not module.startswith("lordba_lab.fuzz"):
                atheris.instrument_func(obj)
    seeds = all_seed_cases(seed=seed)

    def test_one(data: bytes) -> None:
        if time.time() > deadline:
            rec.finish()
        rec.run(data)

    def custom_mutator(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        return rec.mutate(lambda: structured_mutation(data, max_size, mutation_seed), data)

    def structured_mutation(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        rng = random.Random(mutation_seed)
        case = decode_case(data) or dict(rng.choice(seeds))
        if rng.random() < 0.3:  # libFuzzer's byte-level mutation of one file
            name = rng.choice(list(case))
            case[name] = atheris.Mutate(case[name], max(2 * len(case[name]), 64))
            if rng.random() < 0.7:
                case = fix_checksum(case)
        else:
            case, _ = mutate(rng, case)
        return encode_case(case)[:max_size]

    # Per job: its own seed (jobs restart after a finding: the same seed would find it again),
    # and the RSS limit over what this process holds now (libFuzzer's limit is absolute).
    args = [*libfuzzer_args, f"-seed={seed + 1}", f"-rss_limit_mb={peak_rss_mb() + mem_mb}"]
    atheris.Setup(args, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    """The worker's command line (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m lordba_lab.fuzz.worker")
    p.add_argument("--engine", required=True, choices=("atheris", "hypothesis", "mutate"))
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--failures", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-mb", type=int, default=1024)
    p.add_argument("--target", default="lordba_lab.fuzz.oracle:run_case")
    p.add_argument("libfuzzer", nargs=argparse.REMAINDER, help="atheris: -- then libFuzzer's argv (program first)")
    args = p.parse_args(argv)
    print(f"{STARTED} {os.getpid()}", flush=True)
    if args.engine != "atheris":  # SIGUSR1 (from the engine, before it kills a hung worker): stacks to the log
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    import torch

    torch.set_num_threads(1)
    rec = Recorder(args.state, args.failures, load_target(args.target), save_current=args.engine != "atheris")
    seed = args.seed + rec.slot
    cap_memory(args.mem_mb)
    try:
        if args.engine == "mutate":
            run_mutate(rec, args.deadline, seed)
        elif args.engine == "hypothesis":
            run_hypothesis(rec, args.deadline, seed)
        else:
            run_atheris(rec, args.deadline, seed, args.mem_mb, args.libfuzzer[args.libfuzzer[:1] == ["--"] :])
    except BaseException:
        rec.dump()
        raise
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
