"""Bounded runs of the fuzzing engines (the long runs are ``lordba fuzz --seconds N``), and their
handling of crashes, hangs and allocations past the memory cap."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from lordba.cli import main
from lordba.errors import ConfigError
from lordba_lab.fuzz.corpus import decode_case, encode_case, seed_cases
from lordba_lab.fuzz.engine import fuzz

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
DEFAULT = "atheris" if HAVE_ATHERIS else "mutate"  # the engine `lordba fuzz` uses by default
ENGINES = [
    pytest.param(DEFAULT, id=f"default-{DEFAULT}"),
    pytest.param("mutate", marks=pytest.mark.slow, id="mutate"),
    pytest.param("hypothesis", marks=pytest.mark.slow, id="hypothesis"),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bounded_run_finds_no_unclean_failure(tmp_path, engine):
    report = fuzz(8, engine, out=tmp_path / "report.json", failures_dir=tmp_path / "failures", progress=False)
    assert report["unclean"] == 0, (report["unclean_kinds"], report["failures"])
    assert report["refused"] > 0 and report["loaded"] > 0
    assert report["cases"] == report["refused"] + report["loaded"] + report["unclean"]
    assert json.loads((tmp_path / "report.json").read_text())["cases"] == report["cases"]
    assert not (tmp_path / "failures").exists()
    assert report["mutator_errors"] == 0 and report["worker_errors"] == [], report["mutator_error_samples"]
    if engine == "atheris":
        assert report["libfuzzer_coverage"].get("edges", 0) > 100  # lordba's code is instrumented


MISBEHAVING = [
    pytest.param("mutate", 10, id="mutate"),
    pytest.param(
        "atheris", 20, id="atheris", marks=pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed")
    ),
    pytest.param("hypothesis", 10, marks=pytest.mark.slow, id="hypothesis"),
]


@pytest.mark.long
@pytest.mark.parametrize("engine, seconds", MISBEHAVING)
def test_crashes_hangs_and_allocations_are_counted_saved_and_survived(tmp_path, monkeypatch, engine, seconds):
    """A target that allocates past the memory cap (in the first worker), crashes (ending it) and
    hangs (in the second): each is one unclean case with its input saved, and the run goes on
    (libFuzzer's -timeout, crash handling and -jobs for atheris; our supervisor for the others)."""
    here = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LORDBA_TEST_MARKERS", str(tmp_path))
    report = fuzz(
        seconds,
        engine,
        failures_dir=tmp_path / "failures",
        case_timeout=2,
        mem_mb=256,
        target="misbehaving_target:run_case",
        progress=False,
    )
    assert report["unclean_kinds"] == {"MemoryError": 1, "crash": 1, "timeout": 1}, report["worker_errors"]
    assert report["unclean"] == 3 and report["workers_started"] >= 2  # a third one if time is left
    assert report["refused"] == report["cases"] - 3 and report["worker_errors"] == []
    saved = sorted((tmp_path / "failures").glob("*.case"))
    assert sorted(p.name.split("-")[0] for p in saved) == ["MemoryError", "crash", "timeout"]
    assert all(decode_case(p.read_bytes()) for p in saved)  # the inputs in progress, not empty
    assert all("of the worker process" in p.with_suffix(".txt").read_text() for p in saved if "Memory" not in p.name)


def test_workers_need_atheris():
    with pytest.raises(ConfigError, match="workers"):
        fuzz(1, "mutate", workers=2, progress=False)


@pytest.mark.parametrize("engine", ["hypothesis", "atheris"])
def test_an_engine_whose_package_is_missing_is_refused_naming_it(monkeypatch, tmp_path, engine):
    """``lordba fuzz --engine hypothesis`` without hypothesis (lordba's dev extra, not the lab's) started a worker that
    died on the import: a RuntimeError, reported as an internal error (a bug in lordba)."""
    import sys

    monkeypatch.setitem(sys.modules, engine, None)  # import raises ImportError
    needs = rf"the {engine} engine needs {engine} \(pip install {engine}.*; or use --engine mutate"
    with pytest.raises(ConfigError, match=needs):
        fuzz(1, engine, failures_dir=tmp_path / "failures", progress=False)


def test_no_import_cycle_in_the_fuzz_package():
    """The mutator modules import mutate_base; mutate imports them (no module imports back)."""
    import grimp

    graph = grimp.build_graph("lordba_lab", include_external_packages=False)
    modules = sorted(m for m in graph.modules if m.startswith("lordba_lab.fuzz."))
    cycles = [
        (a, b) for a in modules for b in modules if a < b and graph.chain_exists(a, b) and graph.chain_exists(b, a)
    ]
    assert cycles == []


def test_replay_of_a_saved_case(tmp_path, capsys):
    case = tmp_path / "seed.case"
    case.write_bytes(encode_case(seed_cases()[0]))
    assert main(["fuzz", "--replay", str(case)]) == 0
    assert "loaded" in capsys.readouterr().out


def test_chains_of_mutations_never_raise():
    """The mutators must cope with what other mutators (and they themselves) made: an int where
    a shape was, a list where a dtype was... An exception there is a fuzzer bug that hides cases
    (the engines report it as a mutator error)."""
    import random

    from lordba_lab.fuzz.mutate import MUTATORS

    rng = random.Random(7)
    seeds = seed_cases()
    names = sorted(MUTATORS)
    for first in names:
        for _ in range(40):
            case = rng.choice(seeds)
            for name in [first] * 4 + rng.choices(names, k=2) + [first] * 4:
                case = MUTATORS[name](rng, case)
            assert isinstance(case, dict)


def test_replay_of_a_missing_or_unreadable_case_is_invalid_input(tmp_path, capsys):
    """A --replay path that is no readable file is the user's error (exit 3, naming it), not an internal
    error: exit 1 is also what `lordba fuzz` returns for a case that failed uncleanly."""
    good = tmp_path / "seed.case"
    good.write_bytes(encode_case(seed_cases()[0]))
    for bad in (tmp_path / "missing.case", tmp_path):
        assert main(["fuzz", "--replay", str(good), str(bad)]) == 3
        captured = capsys.readouterr()
        assert str(bad) in captured.err and "internal error" not in captured.err
        assert captured.out == ""  # refused before any case runs


def test_an_out_path_that_cannot_be_written_is_refused_before_fuzzing(tmp_path, monkeypatch):
    """``out`` naming a directory (or under a file) is refused before the run, not after it, which lost the
    report of the whole run."""
    from lordba_lab.fuzz import engine

    ran = []
    monkeypatch.setattr(engine, "_run_workers", lambda *a, **k: ran.append(1) or ({}, {}))
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path, tmp_path / "file" / "report.json"):
        with pytest.raises(ConfigError, match="out"):
            fuzz(1, "mutate", out=bad, failures_dir=tmp_path / "failures", progress=False)
    assert ran == []
    report = fuzz(1, "mutate", out=tmp_path / "new" / "report.json", failures_dir=tmp_path / "f", progress=False)
    assert ran == [1] and json.loads((tmp_path / "new" / "report.json").read_text()) == report
