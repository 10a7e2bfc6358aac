"""Crash-safety testing: kill a writer at every file-system step, or at random times, and check
that what it leaves is the old result or the new one, never anything else.

A *step* is one call of ``os.open`` (creating) or of the built-in ``open`` in a writing mode,
``os.replace``, ``os.rename``, ``os.link``, ``os.unlink``/``os.remove``, ``os.rmdir``,
``os.mkdir`` or ``os.fsync`` on a path under a watched directory (writes within an open file are
not steps: the random-time kills cover partly written files).

The child is either a callable (run in a forked copy of this process: fast, for code that needs
no threads) or a Python command line (run through this module:
``python lordba/fuzz/crash.py --kill-at N --under DIR -- -m lordba convert ...``), so the same
test drives ``save_pretrained``, ``export_lora``, ``lordba convert`` or a trainer's checkpoints.

Typical use::

    steps = count_steps(child, under=tmp)              # the steps of one uninterrupted run
    for n in range(1, len(steps) + 1):
        prepare()                                      # put the old result in place
        kill_at_step(child, n, under=tmp)              # SIGKILL just before step n
        assert classify() in {"old", "new"}            # load and compare
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STEP_FUNCTIONS = ("open", "replace", "rename", "link", "unlink", "remove", "rmdir", "mkdir", "fsync")
# and the built-in open() in a writing mode ("w", "a", "x", "+"), recorded as "open"
Child = Callable[[], object] | Sequence[str]


@dataclass
class KillOutcome:
    """What one interrupted run left: where it was killed and what ``classify`` found."""

    where: str
    state: str


def _resolve(arg: object, dir_fd: int | None) -> str | None:
    if isinstance(arg, int):  # fsync(fd)
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return None
    if not isinstance(arg, (str, bytes, os.PathLike)):
        return None
    path = os.fsdecode(arg)
    if dir_fd is not None and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return None
    return os.path.abspath(path)


def install_hooks(under: Path, kill_at: int, trace: list[str]) -> None:
    """Patch the step functions: record each step on a path under ``under`` in ``trace`` and
    SIGKILL this process just before step number ``kill_at`` (1-based; 0: never)."""
    root = os.path.realpath(under)

    def record(name: str, path_args: Sequence[object], dir_fd: object = None) -> None:
        paths = [_resolve(a, dir_fd if isinstance(dir_fd, int) else None) for a in path_args]
        hit = [p for p in paths if p and (p == root or p.startswith(root + os.sep))]
        if hit:
            trace.append(f"{name} {os.path.relpath(hit[-1], root)}")
            if len(trace) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def hook(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def step(*args: object, **kwargs: object) -> object:
            if name != "open":
                record(name, args[:2], kwargs.get("dir_fd"))
            elif (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & os.O_CREAT:  # type: ignore[operator]
                record(name, args[:1], kwargs.get("dir_fd"))
            return fn(*args, **kwargs)

        return step

    for name in STEP_FUNCTIONS:
        setattr(os, name, hook(name, getattr(os, name)))
    real_open = io.open

    def open_(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if isinstance(mode, str) and any(c in mode for c in "wax+"):  # creates or changes a file
            record("open", [file])
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_


def _run_forked(child: Callable[[], object], under: Path, kill_at: int, trace_file: Path | None) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        trace: list[str] = []
        try:
            install_hooks(under, kill_at, trace)
            child()
        except BaseException:
            code = 1
        if trace_file is not None:
            trace_file.write_text(json.dumps(trace))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run_command(argv: Sequence[str], under: Path, kill_at: int, trace_file: Path | None, env: dict | None) -> int:
    # Run this file as a script (it imports nothing from lordba, so no torch start-up is added to
    # a child that does not need it).
    cmd = [sys.executable, __file__, "--kill-at", str(kill_at), "--under", str(under)]
    if trace_file is not None:
        cmd += ["--trace", str(trace_file)]
    proc = subprocess.run([*cmd, "--", *argv], env=env, capture_output=True, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child {list(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def count_steps(child: Child, under: Path, env: dict | None = None) -> list[str]:
    """The steps an uninterrupted run of ``child`` takes under ``under`` (it must succeed)."""
    trace_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"lordba-crash-trace-{os.getpid()}-{time.time_ns()}.json"
    try:
        if callable(child):
            code = _run_forked(child, under, 0, trace_file)
        else:
            code = _run_command(child, under, 0, trace_file, env)
        if code != 0:
            raise AssertionError(f"the uninterrupted child failed (exit {code})")
        return json.loads(trace_file.read_text())
    finally:
        trace_file.unlink(missing_ok=True)


def kill_at_step(child: Child, step: int, under: Path, env: dict | None = None) -> bool:
    """Run ``child`` and SIGKILL it just before its ``step``-th step; True if it was killed."""
    if callable(child):
        code = _run_forked(child, under, step, None)
    else:
        code = _run_command(child, under, step, None, env)
    if code not in (0, -signal.SIGKILL):
        raise AssertionError(f"the child failed (exit {code}) instead of being killed at step {step}")
    return code == -signal.SIGKILL


def kill_test(
    child: Child,
    under: Path,
    prepare: Callable[[], None],
    classify: Callable[[], str],
    allowed: set[str],
    env: dict | None = None,
) -> list[KillOutcome]:
    """Kill ``child`` before each of its steps in turn; after each kill ``classify()`` must return
    one of ``allowed`` (it raises, or returns something else, for a broken result)."""
    prepare()
    steps = count_steps(child, under, env)
    outcomes = []
    for n in range(1, len(steps) + 1):
        prepare()
        kill_at_step(child, n, under, env)
        state = classify()
        if state not in allowed:
            raise AssertionError(f"killed before step {n} ({steps[n - 1]}): found {state!r}, allowed {allowed}")
        outcomes.append(KillOutcome(f"before step {n}: {steps[n - 1]}", state))
    prepare()
    kill_at_step(child, 0, under, env)
    outcomes.append(KillOutcome("not killed", classify()))
    return outcomes


def random_kill_test(
    child: Child,
    prepare: Callable[[], None],
    classify: Callable[[], str],
    allowed: set[str],
    iterations: int,
    max_delay: float,
    seed: int = 0,
    env: dict | None = None,
) -> list[KillOutcome]:
    """Start ``child`` (typically saving in a loop), SIGKILL it after a random delay in
    ``[0, max_delay]`` seconds (counted from its ``ready`` line for a command), and classify.

    A callable child runs in a fork, the delay counted from its first step; a command must print a line
    ``ready`` to stdout once it is about to start writing (so the import time is not part of the delay)."""
    rng = random.Random(seed)
    outcomes = []
    for i in range(iterations):
        prepare()
        delay = rng.uniform(0, max_delay)
        if callable(child):
            started, tell = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(started)
                    os.write(tell, b"r")
                    child()
                finally:
                    os._exit(0)
            os.close(tell)
            os.read(started, 1)  # the fork runs (forking a large process takes a while): not part of the delay
            os.close(started)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        else:
            proc = subprocess.Popen([sys.executable, *child], stdout=subprocess.PIPE, env=env, text=True)
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise AssertionError(f"child {list(child)} did not print 'ready'")
            time.sleep(delay)
            proc.kill()
            proc.wait()
            proc.stdout.close()
        state = classify()
        if state not in allowed:
            raise AssertionError(f"iteration {i}: killed after {delay:.4f} s: found {state!r}, allowed {allowed}")
        outcomes.append(KillOutcome(f"after {delay:.4f} s", state))
    return outcomes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lordba_lab.fuzz.crash", description="run a Python command, killed at a step"
    )
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL before this step (1-based; 0: never)")
    p.add_argument("--under", type=Path, required=True, help="count steps on paths under this directory")
    p.add_argument("--trace", type=Path, default=None, help="write the steps taken here (JSON) at exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then '-m module args', '-c code' or 'script args'")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # Run as a script, this file's directory is sys.path[0]: give the command its own, as python would.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = os.path.dirname(os.path.abspath(command[0])) if command[0] not in ("-m", "-c") else ""
    trace: list[str] = []
    install_hooks(args.under, args.kill_at, trace)
    code = 0
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        elif command[0] == "-c":
            sys.argv = ["-c", *command[2:]]
            exec(compile(command[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(command)
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if args.trace is not None:
            args.trace.write_text(json.dumps(trace))
    sys.exit(code)


if __name__ == "__main__":
    main()
