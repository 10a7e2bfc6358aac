"""A fuzz target that crashes once and hangs once, to test the supervisor's own accounting."""

import os
import signal
import time
from pathlib import Path

from lordba_lab.fuzz.oracle import REFUSED, Result

CALLS = 0


def run_case(case, workdir):
    global CALLS
    CALLS += 1
    markers = Path(os.environ["LORDBA_TEST_MARKERS"])
    if CALLS == 20:
        for kind in ("crash", "hang"):
            if not (markers / kind).exists():
                (markers / kind).touch()
                if kind == "crash":
                    os.kill(os.getpid(), signal.SIGSEGV)
                time.sleep(3600)
    return Result(REFUSED, "AdapterFormatError", "adapter_config.json: refused on purpose")
