"""``lordba bench``'s own arguments."""

from lordba.cli import main


def test_an_unknown_suite_is_a_usage_error_naming_the_suites(capsys, tmp_path):
    """``--suite nope`` exited 3 (bad input) through a ConfigError; a wrong argument is a usage error, exit 2."""
    assert main(["bench", "--suite", "nope", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown suite(s) ['nope']" in err and "latency" in err
    assert not (tmp_path / "b").exists()


def test_the_hardware_record_names_the_commit_and_the_version_measured(tmp_path, monkeypatch):
    """Every suite's JSON (``hardware()``) named the machine and torch but not the code measured: two runs'
    numbers could not be told apart by the commit that made them. It records lordba's version and the
    checkout's commit (``+dirty`` with local changes), ``None`` outside this repository's checkout."""
    import subprocess
    from pathlib import Path

    import lordba
    from lordba_lab import bench

    hw = bench.hardware()
    assert hw["lordba"] == lordba.__version__
    root = Path(bench.__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:  # not run from a git checkout
        assert hw["commit"] is None
        return
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    assert hw["commit"] == head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    elsewhere = tmp_path / "site-packages" / "lordba_lab" / "bench" / "__init__.py"  # installed inside another repo
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.setattr(bench, "__file__", str(elsewhere))
    assert bench.commit() is None


def test_several_suites_each_write_into_a_folder_of_their_own(tmp_path, monkeypatch, capsys):
    """``--suite latency --suite e2e`` wrote both suites' bench.json and bench.md into one folder: e2e's replaced
    latency's, and the line "suite latency: wrote .../bench.json" named a file holding e2e's numbers."""
    import types

    from lordba_lab.cli import bench_cmd

    def suite(name):
        def run(out, quick):
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.json").write_text(name)
            return [out / "bench.json"]

        return types.SimpleNamespace(SUITE=name, HELP="", DEFAULT=False, run=run)

    monkeypatch.setattr(bench_cmd, "suites", lambda: {"latency": suite("latency"), "e2e": suite("e2e")})
    out = tmp_path / "b"
    assert main(["bench", "--suite", "latency", "--suite", "e2e", "--suite", "latency", "--out", str(out)]) == 0
    assert (out / "latency" / "bench.json").read_text() == "latency" and (
        out / "e2e" / "bench.json"
    ).read_text() == "e2e"
    assert capsys.readouterr().out.count("suite latency: wrote") == 1  # named twice, run once
    assert main(["bench", "--suite", "e2e", "--out", str(tmp_path / "one")]) == 0  # one suite: the folder itself
    assert (tmp_path / "one" / "bench.json").read_text() == "e2e"
