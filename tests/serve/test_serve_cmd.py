"""``lordba serve`` on the command line: the model it resolves, what it says without the extra,
and the real command serving until interrupted."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from lordba.cli import main, serve_cmd

from .serve_helpers import make_served


def test_missing_extra_names_the_pip_command(monkeypatch, capsys, tmp_path):
    import lordba.serve

    monkeypatch.setattr(lordba.serve, "missing_extra", lambda: ["fastapi"])
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "pip install 'lordba[serve]'" in capsys.readouterr().err


def test_default_model_comes_from_an_entry_point_or_a_clear_error(monkeypatch, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"_name_or_path": "tiny-default"}')
    registered = importlib.metadata.EntryPoint("default", "os.path:abspath", serve_cmd.MODEL_ENTRY_POINTS)

    def none(group: str):
        return []

    monkeypatch.setattr(serve_cmd.importlib.metadata, "entry_points", none)
    with pytest.raises(serve_cmd.ConfigError, match="pip install -e lab"):
        serve_cmd.resolve_model("default")
    monkeypatch.setattr(serve_cmd.importlib.metadata, "entry_points", lambda group: [registered])
    monkeypatch.setattr(registered.__class__, "load", lambda self: lambda: str(model))
    assert serve_cmd.resolve_model("default") == (model, "tiny-default")
    assert serve_cmd.resolve_model(str(model)) == (model, "m")
    with pytest.raises(serve_cmd.ConfigError, match="not a folder"):
        serve_cmd.resolve_model(str(tmp_path / "nothing"))


def test_bad_numbers_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tmp_path), "--max-batch", "0"])
    assert exit_.value.code == 2 and "--max-batch" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp16", "float64"])
def test_an_unknown_dtype_is_a_usage_error_naming_the_choices(dtype, tmp_path, capsys):
    """Exit 2 before the model is resolved or loaded (it was exit 3, the code of a bad input file, from
    load_base)."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tmp_path), "--dtype", dtype])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--dtype" in err and "bfloat16" in err


def test_the_command_serves_until_interrupted(tmp_path_factory):
    import http.client
    import signal
    import socket
    import subprocess
    import sys
    import time

    model_dir, adapters = make_served(tmp_path_factory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lordba", "serve", "--model", str(model_dir), "--adapters", str(adapters)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                body = b'{"model": "a", "prompt": "hi", "max_tokens": 3, "ignore_eos": true}'
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
            except OSError:
                time.sleep(0.2)
        assert answer is not None and answer.status == 200, proc.stdout.read().decode() if proc.poll() else ""
        body = json.loads(answer.read())
        assert body["model"] == "a" and body["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), out.decode()


def test_a_folder_transformers_cannot_load_exits_3(tmp_path, capsys):
    """A model folder with a config.json that transformers cannot load (no tokenizer, a config that is not
    JSON) is invalid input naming the folder, as for ``lordba generate``, not an internal error."""
    from tiny_model import tiny_model_dir

    good = tiny_model_dir(tmp_path / "good")
    no_tokenizer, bad_config = tmp_path / "no_tokenizer", tmp_path / "bad_config"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_bytes((good / "config.json").read_bytes())
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    for bad in (no_tokenizer, bad_config):
        assert main(["serve", "--model", str(bad), "--port", "0"]) == 3
        err = capsys.readouterr().err
        assert str(bad) in err and "transformers cannot load it" in err and "internal error" not in err
