"""A fuzz target that misbehaves once in each way, to test the engines' own accounting: an
allocation past the worker's memory cap (call 10), a crash and a hang (call 20 of the first and
second worker process). Markers in ``$LORDBA_TEST_MARKERS`` make each happen once per run."""

import os
import signal
import time
from pathlib import Path

from lordba_lab.fuzz.oracle import REFUSED, UNCLEAN, Result

CALLS = 0
ALLOCATION = 4 << 30  # more than the tests' --mem-mb above the worker's start; lazily mapped without a cap


def once(kind):
    marker = Path(os.environ["LORDBA_TEST_MARKERS"]) / kind
    if marker.exists():
        return False
    marker.touch()
    return True


def run_case(case, workdir):
    global CALLS
    CALLS += 1
    if CALLS == 10 and once("alloc"):
        try:
            bytes(ALLOCATION)  # what the oracle reports when the loader allocates for an unchecked size
        except MemoryError as err:
            return Result(UNCLEAN, "MemoryError", repr(err))
    if CALLS == 20:
        if once("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if once("hang"):
            time.sleep(3600)
    return Result(REFUSED, "AdapterFormatError", "adapter_config.json: refused on purpose")
