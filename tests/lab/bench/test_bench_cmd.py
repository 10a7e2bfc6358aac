"""``lordba bench``'s own arguments."""

from lordba.cli import main


def test_an_unknown_suite_is_a_usage_error_naming_the_suites(capsys, tmp_path):
    """``--suite nope`` exited 3 (bad input) through a ConfigError; a wrong argument is a usage error, exit 2."""
    assert main(["bench", "--suite", "nope", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown suite(s) ['nope']" in err and "latency" in err
    assert not (tmp_path / "b").exists()
