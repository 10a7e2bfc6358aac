import pytest

from lordba import kernels
from lordba.cli import main


def test_build_kernels_reports_what_runs(capsys):
    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels:" in out and "Triton (GPU) kernels:" in out


@pytest.fixture
def no_extension(monkeypatch):
    """As in a process where the extension cannot be built (restored afterwards)."""
    monkeypatch.setenv("LORDBA_NO_EXT", "1")
    monkeypatch.setattr(kernels._STATE, "cpu", None)
    yield


def test_build_kernels_without_a_build_exits_0_or_3_with_strict(no_extension, capsys):
    assert main(["build-kernels"]) == 0
    assert "NOT available" in capsys.readouterr().out
    kernels._STATE.cpu = None
    assert main(["build-kernels", "--strict"]) == 3
    assert "could not be built" in capsys.readouterr().err
