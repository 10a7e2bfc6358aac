"""The fuzzing worker process: runs one engine until a deadline, under a memory cap.

Started by :func:`lordba_lab.fuzz.engine.fuzz` (``python -m lordba_lab.fuzz.worker ...``), never by hand.
Before each case it writes the case to ``current.case`` and marks it in progress in the shared
``counters`` file, so the supervisor can tell a hang (it kills the worker) or a crash (the worker
dies) and save the input. Unclean outcomes it saves itself; details go to ``stats.json``.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import hashlib
import importlib
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
from typing import Any

COUNTERS = struct.Struct("<qqqqqd")  # cases, refused, loaded, unclean, in_case, case start (epoch s)
_WS = re.compile(r"/\S*?/(adapter_config\.json|lordba_model\.safetensors|\.\S+-prev)")


class Recorder:
    """Counts outcomes, saves unclean inputs, and publishes progress for the supervisor."""

    def __init__(self, state: Path, failures: Path, target: Callable[..., Any], workdir: Path) -> None:
        self.state, self.failures, self.target, self.workdir = state, failures, target, workdir
        fd = os.open(state / "counters", os.O_RDWR)
        self.counters = mmap.mmap(fd, COUNTERS.size)
        os.close(fd)
        self.values = list(COUNTERS.unpack(self.counters[: COUNTERS.size]))
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
        from lordba_lab.fuzz.corpus import decode_case
        from lordba_lab.fuzz.oracle import LOADED, REFUSED

        (self.state / "current.case").write_bytes(data)
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
        if time.time() - self.last_dump > 1.0:
            self.dump()

    def _publish(self) -> None:
        self.counters[: COUNTERS.size] = COUNTERS.pack(*self.values)

    def dump(self) -> None:
        self.last_dump = time.time()
        stats = {
            "refusal_reasons": dict(self.reasons),
            "unclean_kinds": dict(self.unclean),
            "loaded_kinds": dict(self.loaded),
            "mutators": dict(self.mutators),
            "mutator_errors": self.mutator_errors,
            "mutator_error_samples": self.mutator_error_samples,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        tmp = self.state / "stats.json.tmp"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.state / "stats.json")


def reason(message: str) -> str:
    """A refusal message reduced to its kind, for the report's histogram."""
    text = _WS.sub(r"\1", message)
    text = re.sub(r"(?<![A-Za-z])'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b(model|encoder)\.[\w.-]+", "<module>", text)
    text = re.sub(r"\d+", "N", text)
    return text[:90]


def save_failure(directory: Path, data: bytes, kind: str, detail: str) -> Path:
    """Save a failing input (``<kind>-<sha>.case``, replay with ``lordba fuzz --replay``) and its detail."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9_-]', '_', kind)}-{hashlib.sha256(data).hexdigest()[:12]}"
    (directory / f"{stem}.case").write_bytes(data)
    (directory / f"{stem}.txt").write_text(detail + "\n")
    return directory / f"{stem}.case"


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


def _load_target(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_mutate(rec: Recorder, deadline: float, seed: int) -> None:
    from lordba_lab.fuzz.corpus import encode_case, seed_cases
    from lordba_lab.fuzz.mutate import mutate

    seeds = seed_cases(seed=seed)
    rng = random.Random(seed)
    for case in seeds:
        rec.run(encode_case(case), ["seed"])
    while time.time() < deadline:
        seed_case = rng.choice(seeds)
        case, names = rec.mutate(lambda seed_case=seed_case: mutate(rng, seed_case), (seed_case, ["seed"]))
        rec.run(encode_case(case), names)


def run_hypothesis(rec: Recorder, deadline: float, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from lordba_lab.fuzz.corpus import encode_case, fix_checksum, seed_cases
    from lordba_lab.fuzz.mutate import MUTATORS

    seeds = seed_cases(seed=seed)

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


def run_atheris(rec: Recorder, deadline: float, seed: int, corpus: Path) -> None:
    import gc

    import atheris

    from lordba_lab.fuzz.corpus import decode_case, encode_case, fix_checksum, seed_cases
    from lordba_lab.fuzz.mutate import mutate

    # Coverage of lordba's own code (not torch's): instrument its functions in place.
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            module = obj.__module__ or ""
            if module.startswith("lordba.") and not module.startswith("lordba_lab.fuzz"):
                atheris.instrument_func(obj)
    seeds = seed_cases(seed=seed)
    corpus.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(encode_case(case))

    def test_one(data: bytes) -> None:
        if time.time() > deadline:
            rec.dump()
            os._exit(0)  # libFuzzer's own exit skips Python's clean-up anyway
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

    # At least a few seconds once started, so that libFuzzer gets through its seeds (and reports
    # its coverage) even when the worker started late on a busy machine.
    deadline = max(deadline, time.time() + 3)
    seconds = max(int(deadline - time.time()) + 60, 1)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-rss_limit_mb=0", "-timeout=100000"]
    args += [f"-seed={seed + 1}", f"-max_len={1 << 17}", "-print_final_stats=0", "-reload=0"]
    atheris.Setup(args, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lordba_lab.fuzz.worker")
    p.add_argument("--engine", required=True, choices=("atheris", "hypothesis", "mutate"))
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--failures", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-mb", type=int, default=1024)
    p.add_argument("--target", default="lordba_lab.fuzz.oracle:run_case")
    args = p.parse_args(argv)
    # SIGUSR1 (from the supervisor, before it kills a hung worker): Python stacks to the log.
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    import torch

    torch.set_num_threads(1)
    target = _load_target(args.target)
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir=args.state))  # the supervisor removes the state dir
    rec = Recorder(args.state, args.failures, target, workdir)
    cap_memory(args.mem_mb)
    try:
        if args.engine == "mutate":
            run_mutate(rec, args.deadline, args.seed)
        elif args.engine == "hypothesis":
            run_hypothesis(rec, args.deadline, args.seed)
        else:
            run_atheris(rec, args.deadline, args.seed, args.corpus)
    finally:
        rec.dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
