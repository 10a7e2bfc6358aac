"""``convert.pipeline``: a conversion's read-back leaves the process's warning filters alone, in any thread."""

import threading
import warnings

from lordba.convert import convert_lora, save_converted
from lordba.format.adapter import AdapterFile

from .test_peft_validation import peft_dir


def test_two_threads_saving_conversions_leave_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """The read-back of a converted adapter silenced the loader's warning with ``warnings.catch_warnings`` and
    ``simplefilter("ignore")``, which swap the process's one filter list: while one thread read back, every thread's
    warnings were ignored, and two read-backs overlapping (A in, B in, A out, B out) left ``"ignore"`` in front of
    the filters for good: the process never warned again."""
    state, report = convert_lora(peft_dir(tmp_path), iters=1, progress=False)
    inside = {name: threading.Event() for name in "ab"}
    go = {name: threading.Event() for name in "ab"}
    load = AdapterFile.load_tensors

    def held(adapter: AdapterFile) -> None:  # the read-back, held until the test lets it go on
        name = threading.current_thread().name
        inside[name].set()
        assert go[name].wait(30)
        load(adapter)

    monkeypatch.setattr(AdapterFile, "load_tensors", held)
    before = list(warnings.filters)
    threads = {n: threading.Thread(target=save_converted, args=(state, report, tmp_path / n), name=n) for n in "ab"}
    threads["a"].start()
    assert inside["a"].wait(30)
    during = list(warnings.filters)  # what every thread's warnings go through while "a" reads back
    threads["b"].start()
    assert inside["b"].wait(30)
    for name in "ab":
        go[name].set()
        threads[name].join(30)
    assert during == before
    assert list(warnings.filters) == before
    assert all((tmp_path / n / "adapter_config.json").is_file() for n in "ab")
