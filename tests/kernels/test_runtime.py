"""lordba.kernels.runtime around processes and threads: the compiled kernels in a forked child, their loading."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from lordba import kernels

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])

# A q4 model with a packed adapter run on two threads in the parent, then in a forked child (a plain fork, or a
# multiprocessing "fork" worker): the child's logits must equal the parent's, within a minute.
FORKED = textwrap.dedent(
    """
    import faulthandler, multiprocessing, os, sys, torch
    from conftest import tiny_q4

    torch.set_num_threads(2)
    model = tiny_q4(adapter=True)
    ids = torch.arange(1, 21).reshape(1, 20)

    def logits():
        with torch.no_grad():
            return [model(ids[:, :1]).logits, model(ids).logits]

    before = logits()

    def same():
        return all(torch.equal(a, b) for a, b in zip(logits(), before))

    if sys.argv[1] == "fork":
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(60, exit=True)
            os._exit(0 if same() else 3)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print("child", code)
    else:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            print("child", 0 if pool.apply_async(same).get(timeout=60) else 3)
    """
)


@pytest.mark.long
@pytest.mark.parametrize("how", ["fork", "multiprocessing"])
def test_a_forked_child_runs_the_kernels_without_hanging(how):
    """GNU OpenMP's thread pool does not survive a fork: the child's first parallel loop hung (the kernels'
    one-token GEMV on the tiny model's first layer) after the parent had run the kernels on two threads."""
    if not kernels.cpu_available():
        pytest.skip("the compiled CPU kernels are unavailable")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS])}
    proc = subprocess.run(
        [sys.executable, "-c", FORKED, how], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and "child 0" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-3000:]


def test_a_call_made_while_another_thread_loads_the_kernels_waits_for_them(monkeypatch):
    """A thread whose first kernel call came while another thread was loading them (binding the ops, after the
    result was remembered) got ``TypeError: 'NoneType' object is not callable`` from ``packed_branch``."""
    from lordba.kernels import _fake, runtime

    if not kernels.cpu_available():
        pytest.skip("the compiled CPU kernels are unavailable")
    for field in ("cpu", "op", "rows_op", "attention_op"):  # as a process that has not loaded them yet
        monkeypatch.setattr(runtime._STATE, field, None)
    torch.manual_seed(0)
    sign_A, sign_B = torch.randint(0, 256, (8, 8), dtype=torch.uint8), torch.randint(0, 256, (48, 1), dtype=torch.uint8)
    b, m, a, x = torch.rand(64), torch.rand(8), torch.rand(48), torch.randn(1, 64)
    results = []

    def call():
        try:
            results.append(kernels.packed_branch(x, sign_A, sign_B, b, m, a, 1.0))
        except Exception as err:  # reported below
            results.append(err)

    other = threading.Thread(target=call)
    register = _fake.register_cpu

    def register_during_a_call():  # the loading thread, while it binds the ops: another thread calls
        other.start()
        other.join(timeout=0.5)
        register()

    monkeypatch.setattr(_fake, "register_cpu", register_during_a_call)
    assert kernels.load_cpu().ok
    other.join(timeout=60)
    assert len(results) == 1 and isinstance(results[0], torch.Tensor), results
    assert torch.equal(results[0], kernels.packed_branch(x, sign_A, sign_B, b, m, a, 1.0))


def test_a_child_forked_while_another_thread_loads_the_kernels_loads_them_itself():
    """A fork while another thread held the load lock (building the kernels takes minutes on a cold cache) left
    the child's copy of the lock held by a thread the child does not have: its first kernel call hung."""
    if not kernels.cpu_available():
        pytest.skip("the compiled CPU kernels are unavailable")
    script = textwrap.dedent(
        """
        import faulthandler, os, threading
        from lordba.kernels import runtime

        loading, release = threading.Event(), threading.Event()

        def load():  # a thread in the middle of load_cpu
            with runtime._LOAD_LOCK:
                loading.set()
                release.wait()

        threading.Thread(target=load, daemon=True).start()
        loading.wait()
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(60, exit=True)
            os._exit(0 if runtime.cpu_available() else 3)
        release.set()
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "child 0" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-3000:]
