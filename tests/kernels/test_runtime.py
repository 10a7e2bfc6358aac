"""lordba.kernels.runtime around processes: the compiled kernels in a forked child."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
