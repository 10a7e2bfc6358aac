"""``lordba serve`` on the command line: the model it resolves, what it says without the extra,
and the real command serving until interrupted."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from lordba._util import models
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
    registered = importlib.metadata.EntryPoint("default", "os.path:abspath", models.MODEL_ENTRY_POINTS)

    def none(group: str):
        return []

    monkeypatch.setattr(models.importlib.metadata, "entry_points", none)
    with pytest.raises(serve_cmd.ConfigError, match="pip install -e lab"):
        serve_cmd.resolve_model("default")
    monkeypatch.setattr(models.importlib.metadata, "entry_points", lambda group: [registered])
    monkeypatch.setattr(registered.__class__, "load", lambda self: lambda: str(model))
    assert serve_cmd.resolve_model("default") == (model, "tiny-default")
    # a folder whose config records no name (transformers 5 writes none): the name registered beside "default" for
    # the same model (the lab registers "smollm2-135m-instruct" too), which the adapters trained on it record
    (model / "config.json").write_text("{}")
    named = importlib.metadata.EntryPoint("tiny-name", "os.path:abspath", models.MODEL_ENTRY_POINTS)
    monkeypatch.setattr(models.importlib.metadata, "entry_points", lambda group: [registered, named])
    assert serve_cmd.resolve_model("default") == (model, "tiny-name")
    assert serve_cmd.resolve_model("tiny-name") == (model, "tiny-name")
    assert serve_cmd.resolve_model(str(model)) == (model, "m")
    with pytest.raises(serve_cmd.ConfigError, match="not a folder"):
        serve_cmd.resolve_model(str(tmp_path / "nothing"))


def test_a_model_that_is_no_folder_nor_a_registered_name_is_refused_naming_the_names(monkeypatch, tmp_path, capsys):
    """``lordba generate / chat / serve --model smollm2`` (a mistyped name, or a folder that is not there) said only
    "not a folder", though the registered names (the lab's ``default``, ``smollm2-135m-instruct``, ...) are taken too:
    the error lists them."""
    names = [importlib.metadata.EntryPoint(n, "os.path:abspath", models.MODEL_ENTRY_POINTS) for n in ("default", "m1")]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        models.importlib.metadata,
        "entry_points",
        lambda group: names if group == models.MODEL_ENTRY_POINTS else real(group=group),
    )
    with pytest.raises(serve_cmd.ConfigError, match=r"--model smolm2: not a folder, nor a registered model name "):
        serve_cmd.resolve_model("smolm2")
    assert main(["generate", "--model", str(tmp_path / "typo"), "--quant", "none", "x"]) == 3
    assert "not a folder, nor a registered model name (default, m1)" in capsys.readouterr().err


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


def _start_serving(tmp_path, context: int = 8192):
    """``(process, port)`` of ``lordba serve`` on a free port (the tiny model, of ``context`` positions: room for
    generations outlasting the shutdown's grace period, and adapter ``a``), once it answers."""
    import http.client
    import socket
    import subprocess
    import sys
    import time

    from .serve_helpers import char_tokenizer, make_adapter, tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model(context=context).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    make_adapter(tmp_path / "adapters" / "a", seed=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lordba", "serve", "--model", str(model_dir), "--adapters", str(tmp_path / "adapters")]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("lordba serve did not start: " + proc.communicate()[0].decode()[-2000:])


def _wait_running(port: int, count: int, deadline_s: float = 120.0) -> None:
    """Return once the server's ``/health`` reports ``count`` requests running (a generous deadline: a loaded machine
    may take long to admit them), else fail the test."""
    import http.client
    import time

    deadline, health = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health")
            health = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if health.get("running") == count:
            return
        time.sleep(0.25)  # (each /health is a line of the server's log, which fills its pipe until the end)
    pytest.fail(f"the server never ran {count} requests at once: /health said {health}")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_requests_in_flight_cleanly_and_exits_0(tmp_path, signame):
    """SIGTERM (or Ctrl-C) with a stream and a whole response in flight: each ends within the grace period (the
    stream's last chunk ``abort`` then ``[DONE]``, the whole response a 503 in OpenAI's shape), the port is free
    and the command exits 0, no traceback. Uvicorn raised the signal again once it had stopped: the process died
    by SIGTERM (exit -15, 143 in a shell) and Ctrl-C exited 130 'interrupted', a failure to a supervisor."""
    import http.client
    import signal
    import socket
    import threading

    proc, port = _start_serving(tmp_path)
    answers = {}

    def post(key: str, stream: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "a", "prompt": "hi", "max_tokens": 8000, "ignore_eos": True, "stream": stream}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answers[key] = (response.status, response.read().decode())

    threads = [threading.Thread(target=post, args=(k, k == "stream"), daemon=True) for k in ("stream", "whole")]
    try:
        for t in threads:
            t.start()
        _wait_running(port, 2)  # both in the batch (a fixed sleep was too short under load: the signal came first)
        proc.send_signal(getattr(signal, signame))
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for t in threads:
        t.join(30)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    status, text = answers["stream"]
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]", text[-500:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    status, text = answers["whole"]
    assert status == 503 and "shutting down" in json.loads(text)["error"]["message"], text
    with socket.socket() as s:  # released (as uvicorn binds it again: connections closed may be in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_an_adapters_folder_that_cannot_be_served_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A mistyped ``--adapters`` folder, or an adapter directory given as the folder, was refused by the registry once
    the base had loaded (and been quantized): it is checked before, with the same error (exit 3)."""
    import lordba.serve.server

    monkeypatch.setattr(lordba.serve.server, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    model, adapter = tmp_path / "model", tmp_path / "adapters" / "a"
    model.mkdir()
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    for folder, said in ((tmp_path / "typo", "not a directory"), (adapter, "an adapter directory, not a folder")):
        assert main(["serve", "--model", str(model), "--adapters", str(folder), "--quant", "none"]) == 3
        err = capsys.readouterr().err
        assert f"--adapters {folder}: {said}" in err and "serving the base" not in err, err


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


@pytest.fixture(scope="module")
def q4_served(tmp_path_factory):
    """The tiny model and adapters a, b trained on its q4 base (their configs record q4, 4-bit, groups of 64); the
    CPU kernels loaded (from the lordba cache: a test's own cache for the quantized bases would build them again)."""
    from lordba.kernels import bound_calls

    bound_calls()
    return make_served(tmp_path_factory, quant="q4", names=("a", "b"))


def served_state(monkeypatch, argv: list[str]):
    """The server state ``lordba serve ARGV`` builds (it is not served), and its exit code."""
    import lordba.serve.server

    built = []
    monkeypatch.setattr(lordba.serve.server, "serve_forever", lambda state, host, port: built.append(state))
    code = main(["serve", *argv])
    return (built[0] if built else None), code


def served_text(state, prompt_ids: list[list[int]], adapters: list[str], n: int) -> list[str]:
    """The greedy texts of the engine of ``state`` for each prompt on its adapter, all in one batch."""
    import threading

    from lordba.serve.engine import Request
    from lordba.serve.sampling import SamplingParams

    engine, done, texts = state.engine, [threading.Event() for _ in adapters], [None] * len(adapters)

    def sink(i: int):
        def take(event) -> None:
            if event.finish_reason is not None:
                texts[i] = event.text
                done[i].set()

        return take

    for name in adapters:
        state.registry.acquire(name)
    for i, (ids, name) in enumerate(zip(prompt_ids, adapters)):  # queued before the engine starts: one prefill
        engine.submit(Request(ids, name, SamplingParams(n, temperature=0.0), sink(i)))
    engine.start()
    try:
        assert all(d.wait(60) for d in done)
    finally:
        engine.shutdown()
    assert engine.max_rows_seen == len(adapters)
    return texts


def test_serve_takes_the_q4_base_its_adapters_record_and_batches_them_as_generate_runs_each(
    q4_served, monkeypatch, tmp_path, capsys
):
    """Adapters trained on the q4 base (the default of lordba train) were served on the unquantized base: a
    warning at load, and greedy text other than lordba generate's. --quant auto (the default) takes the base their
    configs record; two adapters in one batch each give lordba generate --quant q4's text."""
    from lordba.cli._base import BACKENDS

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))  # the quantized base is cached there
    monkeypatch.setenv("LORDBA_Q4_COMPUTE", "exact")  # a batched prompt and a lone one: the same kernels' sums
    model_dir, adapters = q4_served
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--adapters", str(adapters)])
    err = capsys.readouterr().err
    assert code == 0 and "serving the base q4 (4-bit, groups of 64)" in err and "'a', 'b'" in err
    assert {type(m).__name__ for m in state.engine.model.modules()} >= {"Q4Linear"} and "q4" in BACKENDS
    tok = state.tokenizer
    prompts, n = ["xyz 123", "The quick"], 16
    got = served_text(state, [tok(p).input_ids for p in prompts], ["a", "b"], n)
    for prompt, name, text in zip(prompts, ["a", "b"], got):
        argv = ["generate", "--model", str(model_dir), "--adapter", str(adapters / name), "--quant", "q4", prompt]
        assert main([*argv, "--max-new-tokens", str(n)]) == 0
        assert capsys.readouterr().out == text + "\n"
    argv = ["--model", str(model_dir), "--adapters", str(adapters), "--quant", "none"]
    unquantized, code = served_state(monkeypatch, argv)  # what it served before: b's text differs
    assert code == 0 and "serving the base unquantized: --quant none" in capsys.readouterr().err
    assert served_text(unquantized, [tok(p).input_ids for p in prompts], ["a", "b"], n)[1] != got[1]


def test_quant_auto_refuses_adapters_trained_on_different_bases_naming_two(q4_served, tmp_path, monkeypatch, capsys):
    """Exit 2 before the model loads, naming two adapters and their records; --quant chooses the base."""
    import shutil

    from conftest import set_config

    model_dir, adapters = q4_served
    mixed = tmp_path / "adapters"
    shutil.copytree(adapters, mixed)
    set_config(mixed / "b", base_quantization={"backend": "hqq", "bits": 2, "group_size": 16})
    (mixed / "plain").mkdir()  # a folder that holds no adapter records nothing
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--adapters", str(mixed)])
    err = capsys.readouterr().err
    assert state is None and code == 2
    assert "'a'" in err and "'b'" in err and "'hqq'" in err and "'q4'" in err and "--quant" in err
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--adapters", str(mixed), "--quant", "q4"])
    assert code == 0 and "serving the base q4 (4-bit, groups of 64): --quant q4" in capsys.readouterr().err
    assert not state.registry.allow_base_mismatch  # a request for b is a 400 naming both bases (test_registry)
    argv = ["--model", str(model_dir), "--adapters", str(mixed), "--quant", "q4", "--allow-base-mismatch"]
    state, code = served_state(monkeypatch, argv)
    assert code == 0 and state.registry.allow_base_mismatch


def test_an_adapter_that_records_no_base_is_served_unquantized_and_q4_compute_needs_a_q4_base(
    tmp_path_factory, monkeypatch, capsys
):
    """No record: the unquantized base (as before). --q4-compute or --bits with a base they do not apply to was
    ignored: a usage error."""
    model_dir, adapters = make_served(tmp_path_factory, names=("plain",))
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--adapters", str(adapters)])
    err = capsys.readouterr().err
    assert code == 0 and "serving the base unquantized: adapter 'plain' records no base quantization" in err
    assert not any(type(m).__name__ == "Q4Linear" for m in state.engine.model.modules())
    for extra in (["--q4-compute", "exact"], ["--quant", "hqq", "--q4-compute", "fast"], ["--bits", "4"]):
        state, code = served_state(monkeypatch, ["--model", str(model_dir), "--adapters", str(adapters), *extra])
        err = capsys.readouterr().err
        assert state is None and code == 2 and extra[-2] in err and "lordba serve: error:" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--quant", "q4", "--bits", "8"],
        ["--quant", "q4", "--group-size", "48"],
        ["--quant", "hqq", "--bits", "5"],
        ["--quant", "hqq", "--group-size", "12"],
        ["--quant", "bnb", "--bits", "8"],
        ["--quant", "bnb", "--group-size", "128"],  # was served as "blocks of 128": NF4 blocks are 64
    ],
)
def test_bits_or_group_size_the_backend_cannot_build_is_a_usage_error_before_the_model_loads(
    extra, tmp_path, monkeypatch, capsys
):
    """--quant q4 --bits 8 loaded the model (a minute on a real one) and only then exited 3 from the quantizer; a bnb
    --group-size was ignored. Exit 2 naming the options, nothing loaded: lordba serve, generate and chat alike."""
    import lordba.serve.server

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lordba.serve.server, "load_base", no_load)
    model = tmp_path / "m"  # no model in it: generate and chat, past the check, exit 3 (not a model folder)
    model.mkdir()
    for command, tail in (("serve", []), ("generate", ["hi"]), ("chat", [])):
        assert main([command, "--model", str(model), *extra, *tail]) == 2, command
        err = capsys.readouterr().err
        assert f"lordba {command}: error: {' '.join(extra)}: the {extra[1]} base" in err, err


def test_max_body_bytes_sets_the_request_body_limit(monkeypatch, capsys, tmp_path_factory):
    """The request body limit (a 413 over it) was fixed at room for the longest prompt of the context, at least
    16 MiB (40.5 MiB for SmolLM2), and parsing a body of small JSON values holds up every stream for its length
    (15 MB of logit_bias entries: 4.6 s): ``--max-body-bytes`` sets it."""
    from lordba.serve.app import body_limit

    model_dir, _ = make_served(tmp_path_factory, names=("a",))
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--max-body-bytes", "4096"])
    assert code == 0 and state.max_body_bytes == 4096 and body_limit(state) == 4096
    state, code = served_state(monkeypatch, ["--model", str(model_dir)])
    assert code == 0 and body_limit(state) == 16 << 20  # the tiny model's prompts need less: the least limit
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(model_dir), "--max-body-bytes", "0"])
    assert exit_.value.code == 2 and "--max-body-bytes" in capsys.readouterr().err


def test_max_waiting_bounds_the_engines_queue(monkeypatch, capsys, tmp_path_factory):
    """The waiting queue had no bound (a burst of 100,000 requests all queued): ``--max-waiting`` sets one (a 503
    past it); none by default, as before; a negative value is a usage error."""
    model_dir, _ = make_served(tmp_path_factory, names=("a",))
    state, code = served_state(monkeypatch, ["--model", str(model_dir), "--max-waiting", "0"])
    assert code == 0 and state.engine.max_waiting == 0
    state, code = served_state(monkeypatch, ["--model", str(model_dir)])
    assert code == 0 and state.engine.max_waiting is None
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(model_dir), "--max-waiting", "-1"])
    assert exit_.value.code == 2 and "--max-waiting" in capsys.readouterr().err
