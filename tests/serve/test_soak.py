"""The issue's soak (opt-in: ``pytest -m slow tests/serve/test_soak.py``; ``LORDBA_SOAK_SECONDS``,
default 60, the issue asks for 600): clients on loopback over many adapters while adapters are
loaded, unloaded and evicted, with the error cases mixed in. Every well-formed request must
succeed with its adapter's own greedy output, every bad one must get its 4xx, and the process's
memory must stay flat."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from lordba.serve.adapter_files import payload_bytes  # noqa: E402
from lordba.serve.server import Server, build_state, load_base  # noqa: E402

from .serve_helpers import make_adapter, make_served, reference  # noqa: E402
from .test_server import client, raw  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT, TOKENS = "soak", 6


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_with_adapter_churn_and_errors(tmp_path_factory):
    model_dir, adapters = make_served(tmp_path_factory)
    names = ["a", "b", "c"] + [f"u{i}" for i in range(9)]
    for i, name in enumerate(names[3:]):
        make_adapter(adapters / name, seed=100 + i)
    shutil.copytree(adapters / "a", adapters / "corrupt")
    weights = adapters / "corrupt" / "lordba_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    _, tokenizer = load_base(model_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    want = {
        n: tokenizer.decode(reference(model_dir, adapters / n, ids, TOKENS), skip_special_tokens=True) for n in names
    }
    model, tokenizer = load_base(model_dir)
    size = payload_bytes(adapters / "a" / "lordba_model.safetensors")
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=8, max_adapter_memory=int(4.5 * size))
    seconds = float(os.environ.get("LORDBA_SOAK_SECONDS", "60"))
    failures: list[str] = []
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def note(key: str, problem: str | None = None) -> None:
        with lock:
            counts[key] += problem is None
            if problem:
                failures.append(problem)

    with Server(state) as server:
        c = client(server)
        deadline = time.monotonic() + seconds
        rss: list[int] = []

        def well_formed(rng: random.Random) -> None:
            name = rng.choice(names)
            try:
                text = c.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS, temperature=0).choices[0].text
            except openai.APIStatusError as err:  # 503: every resident adapter in use; a retry is expected
                if err.status_code != 503:
                    note("ok", f"{name}: {err.status_code} {err.message}")
                return
            note("ok", None if text == want[name] else f"{name}: {text!r} != {want[name]!r}")

        def bad(rng: random.Random) -> None:
            case = rng.randrange(4)
            try:
                if case == 0:
                    c.completions.create(model="nope", prompt="x", max_tokens=2)
                elif case == 1:
                    c.completions.create(model="corrupt", prompt="x", max_tokens=2)
                elif case == 2:
                    c.completions.create(model="../a", prompt="x", max_tokens=2)
                else:
                    status, _ = raw(server, "POST", "/v1/completions", b"{not json")
                    note("refused", None if status in (400, 422) else f"bad JSON: {status}")
                    return
            except (openai.BadRequestError, openai.NotFoundError):
                note("refused")
                return
            except openai.APIStatusError as err:  # 503: no room to even try the load now
                if err.status_code != 503:
                    note("refused", f"bad request {case}: {err.status_code} {err.message}")
                return
            note("refused", f"bad request {case} was answered")

        def churn(rng: random.Random) -> None:
            alias = f"alias{rng.randrange(3)}"
            body = json.dumps({"lora_name": alias, "lora_path": rng.choice(names)}).encode()
            raw(server, "POST", "/v1/load_lora_adapter", body)  # 400 when the alias is loaded: fine
            raw(server, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": alias}).encode())

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                step = rng.random()
                try:
                    (well_formed if step < 0.75 else bad if step < 0.9 else churn)(rng)
                except Exception as err:  # a dropped connection, a timeout: a failed request
                    note("ok", f"{type(err).__name__}: {err}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(rss_bytes())
            time.sleep(1.0)
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert counts["ok"] > 0 and counts["refused"] > 0 and state.registry.evictions > 0
    settled = rss[len(rss) // 4 :] or rss
    assert max(settled) - min(settled) < 64 << 20, f"memory grew {(max(settled) - min(settled)) >> 20} MiB"
