"""``lordba.kernels.cpu.bound.module``: looked for once per process, also by threads asking at once (a fake build:
no compiler needed)."""

import threading
import types

from lordba.kernels import cpu
from lordba.kernels.cpu import bound


class _Watched:
    """A lock that tells (``waited``) when a thread comes to it while another holds it."""

    def __init__(self, waited: threading.Event) -> None:
        self.lock, self.waited = threading.Lock(), waited

    def __enter__(self) -> None:
        if self.lock.locked():
            self.waited.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_two_threads_asking_for_the_module_at_once_build_it_once(monkeypatch):
    """The second thread asks while the first builds: it waits and gets the first's module (was: it built and
    imported the extension again, in turn under the build directory's lock)."""
    made, calls = types.ModuleType("fake_bound"), []
    building, release, second = threading.Event(), threading.Event(), threading.Event()

    def build_and_import(build):
        calls.append(build)
        if len(calls) == 1:
            building.set()
            assert release.wait(20)
        else:
            second.set()
        return made

    monkeypatch.setattr(bound, "_module", [])
    monkeypatch.setattr(bound, "_looking", _Watched(second), raising=False)
    monkeypatch.setattr(bound, "_build_and_import", build_and_import)
    monkeypatch.setattr(cpu, "env_switch", lambda name: False)
    monkeypatch.setattr(cpu, "load", lambda build=True: cpu.BuildResult(True, None, "loaded (fake)"))
    got: list = []
    first = threading.Thread(target=lambda: got.append(bound.module()))
    first.start()
    assert building.wait(20)
    other = threading.Thread(target=lambda: got.append(bound.module()))
    other.start()
    assert second.wait(20)  # (the second thread waits for the lock, or builds)
    release.set()
    first.join(20)
    other.join(20)
    assert got == [made, made] and calls == [True], calls
    assert bound.module() is made and calls == [True]
