"""Robustness tooling: adapter files are untrusted input, and writes must survive a kill.

* :mod:`.corpus`: fuzz cases (the files of an adapter directory) and small valid seeds;
* :mod:`.mutate`: structure-aware mutations (``mutate_bytes``, ``mutate_header`` and
  ``mutate_content``, on the shared helpers of ``mutate_base``);
* :mod:`.oracle`: what the loader may do with a case (refuse cleanly, or load exactly what the
  files hold and nothing invalid) and :func:`run_case`, which judges one case;
* :mod:`.engine` / :mod:`.worker`: time-boxed fuzzing (atheris, Hypothesis or plain random) in
  memory-capped worker processes, with hangs and crashes caught by libFuzzer (atheris) or a small
  supervisor (:mod:`.supervise`; ``lordba fuzz``);
* :mod:`.crash`: kill a writer before each file-system step or at random times and check that
  the old or the new result is left (for saves, exports, conversions, checkpoints).

See ``docs/security.md`` for the threat model and what is and is not checked.
"""

from lordba_lab.fuzz.crash import count_steps, kill_at_step, kill_test, random_kill_test
from lordba_lab.fuzz.engine import fuzz, replay
from lordba_lab.fuzz.oracle import Result, check_loaded, run_case

__all__ = [
    "Result",
    "check_loaded",
    "count_steps",
    "fuzz",
    "kill_at_step",
    "kill_test",
    "random_kill_test",
    "replay",
    "run_case",
]
