"""The ``serve`` suite's machinery on the tiny served model (the real measurement is
``lordba bench --suite serve``): a distinct adapter fleet, both engines driven by concurrent
streaming clients, the ratios and the files written."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("peft")

from lordba import LoRDBAModel
from lordba_lab.bench import serve, suites
from lordba_lab.bench._serve_fleet import make_fleet
from serve.serve_helpers import make_served


def test_the_suite_is_discovered_and_not_default():
    assert suites()["serve"] is serve and not serve.DEFAULT


def test_the_peft_registry_has_every_method_the_server_calls_on_its_registry():
    """The PEFT engine's registry stands in for the library's in the app the suite builds: a method the app newly
    called on its registry (``is_resident``) made every PEFT request of the suite a 500. Not needed: the adapter
    admin endpoints' ``register`` / ``unload`` (the suite never calls them)."""
    import re
    from pathlib import Path

    import lordba.serve
    from lordba_lab.bench._serve_fleet import PeftRegistry

    called = set()
    for name in ("app.py", "state.py", "engine.py"):
        source = (Path(lordba.serve.__file__).parent / name).read_text()
        called |= set(re.findall(r"\b(?:state|self)\.registry\.(\w+)", source))
    assert {"is_resident", "acquire", "redact"} <= called  # (the search finds the calls)
    missing = sorted(n for n in called - {"register", "unload"} if not callable(getattr(PeftRegistry, n, None)))
    assert missing == []


def test_fleet_adapters_differ_from_each_other(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, _ = make_served(tmp_path_factory)
    names = make_fleet(model_dir, tmp_path, 2)
    lm = LoRDBAModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    for name in names:
        lm.load_adapter(tmp_path / name, name)
    ids = torch.tensor([[5, 6, 7, 8]] * 2)
    with torch.no_grad():
        logits = lm(input_ids=ids, adapter_names=names).logits
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("progress", [True, False])
def test_writing_the_fleet_shows_a_bar_of_its_adapters(monkeypatch, tmp_path_factory, tmp_path, progress):
    """A thousand adapters (1 GB) were written without a sign of progress; the bar counts them, off where stderr is
    no terminal (tqdm's ``disable=None``) or ``progress=False``."""
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def recorded(iterable, **kwargs):
        bars.append((len(iterable), kwargs))
        return real(iterable, **kwargs)

    model_dir, _ = make_served(tmp_path_factory)
    monkeypatch.setattr(tqdm.auto, "tqdm", recorded)
    assert make_fleet(model_dir, tmp_path, 2, progress=progress) == ["adapter-0000", "adapter-0001"]
    [(total, kwargs)] = [bar for bar in bars if bar[1].get("desc") == "writing the adapter fleet"]
    assert total == 2 and kwargs["unit"] == "adapter" and kwargs["disable"] is (None if progress else True)


def test_tiny_run_reports_both_engines_and_writes_the_files(tmp_path_factory, tmp_path):
    model_dir, _ = make_served(tmp_path_factory)
    settings = serve.Settings((1, 2), (1, 3), 6, 4, 1, 3, 2, rounds=2)
    result = serve.measure(model_dir, settings)
    rows = result["rows"]
    assert {(r["engine"], r["adapters"], r["clients"]) for r in rows} == {
        (e, a, c) for e in ("lordba", "peft") for a in (1, 3) for c in (1, 2)
    }
    for r in rows:
        rounds = 2 if r["engine"] == "lordba" else 1  # lordba: a pair of runs per round; PEFT: one round
        assert len(r["round_tokens_per_s"]) == len(r["round_vs_single"]) == rounds
        assert r["tokens_per_s"] > 0 and r["requests"] == r["clients"] * rounds and r["resident_bytes"] > 0
        assert r["vs_single"] == pytest.approx(1.0) if r["adapters"] == 1 else r["vs_single"] > 0
        single = next(x for x in rows if (x["engine"], x["clients"], x["adapters"]) == (r["engine"], r["clients"], 1))
        if r["engine"] == "lordba":  # each run against the single-adapter run paired with it
            assert set(r["round_reference_tokens_per_s"]) <= set(single["round_tokens_per_s"])
            ref = r["round_reference_tokens_per_s"]
        else:
            ref = single["round_tokens_per_s"]
        ratios = [a / b for a, b in zip(r["round_tokens_per_s"], ref)]
        assert r["round_vs_single"] == pytest.approx(ratios)
        assert r["vs_single"] == pytest.approx(sum(ratios) / len(ratios))  # the median of two
    assert result["cold_load_ms"]["n"] == 2 and result["cold_load_ms"]["median"] > 0
    files = serve.write(tmp_path, result)
    assert [f.name for f in files] == ["serve.json", "serve.md", "serve_throughput.png"]
    assert json.loads(files[0].read_text())["rows"] == rows


def test_a_failed_request_fails_the_clients_run_instead_of_thinning_its_numbers(monkeypatch):
    """A request that fails (the server refuses it, the stream breaks) is an error of the run: before, its
    thread died with the error on stderr, the process exited 0 and the numbers counted the other requests
    only (fewer tokens over the same wall time: a throughput that was never measured)."""
    import sys
    import types

    from lordba_lab.bench import _serve_clients

    class Completions:
        def create(self, model, **_):
            if model == "bad":
                raise ConnectionError("the server went away")
            chunk = types.SimpleNamespace(choices=[types.SimpleNamespace(text="x", finish_reason=None)], usage=None)
            end = types.SimpleNamespace(choices=[], usage=types.SimpleNamespace(completion_tokens=1))
            return iter([chunk, end])

    fake = types.SimpleNamespace(OpenAI=lambda **_: types.SimpleNamespace(completions=Completions()))
    monkeypatch.setitem(sys.modules, "openai", fake)
    job = {"url": "http://x", "prompt": [1], "clients": 2, "requests": 2, "max_tokens": 1, "names": ["good"]}
    done = _serve_clients.run(job)
    assert done["tokens"] == 4 and len(done["ttft"]) == 4
    with pytest.raises(RuntimeError, match=r"2 of 2 clients failed.*ConnectionError: the server went away"):
        _serve_clients.run({**job, "names": ["bad"]})


def test_the_clients_time_one_gap_between_each_two_tokens(tmp_path_factory):
    """A request of n tokens has n - 1 gaps between its tokens. The server streams the last token's text and
    then its finish reason as a chunk of its own (as OpenAI's API does); the clients stamped both, and every
    request added a gap of ~0.2 ms (tiny model: its real gaps ~15-30 ms) to the per-token latency, an eighth
    of the gaps at the quick suite's 8 tokens."""
    from lordba.serve.server import Server, build_state, load_base
    from lordba_lab.bench import _serve_clients

    model_dir, adapters = make_served(tmp_path_factory)
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "base", adapters, max_batch=2)
    job = {"names": ["a", "b"], "clients": 2, "prompt": [5, 6, 7, 8], "requests": 2, "max_tokens": 6}
    with Server(state) as server:
        done = _serve_clients.run({**job, "url": server.url})
    assert done["tokens"] == 4 * 6 and len(done["ttft"]) == 4
    assert len(done["gaps"]) == 4 * (6 - 1)
