"""``lordba serve`` under load: many adapters on one base, side by side with one adapter and PEFT.

Clients on loopback (the official ``openai`` client, streaming), N concurrent (1, 8, 32), each
request on an adapter drawn uniformly from 1, 10, 100 or 1,000 distinct adapters (SmolLM2-135M,
r=16 on every linear layer, int8 scales; :mod:`._serve_fleet`), fixed prompt and generation
lengths (``ignore_eos``). Measured per configuration: generated tokens/s, time to first token and
per-token latency (gaps between streamed tokens) p50/p95; per adapter count: resident adapter
memory after the traffic (tensors and caches). Once: the cold load of an adapter from its file
(median over loads). In the same run, the same server with one adapter (the ``1`` column: the
throughput every ratio divides by). Every adapter stays resident from the start, and each run over
N adapters is paired with a single-adapter run right before or after it (alternating: A B, B A,
...), ``rounds`` pairs per configuration, so that each ratio compares runs seconds apart — on a
shared machine the base's own speed drifts by tens of percent within minutes. A ratio is the median
of its pairs' ratios (each pair's is kept in the JSON). Then the PEFT baseline (a PeftModel
with as many LoRA adapters, served by the same engine through PEFT's ``adapter_names`` mixed batch;
one round; up to 100 adapters, as PEFT holds them in the base's float32, 19.5 MB each). Writes
``serve.json``, ``serve.md`` and ``serve_throughput.png`` (throughput against the number of adapters).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware
from lordba_lab.outputs import save_figure, write_text

SUITE = "serve"
HELP = "lordba serve under load: throughput and latency over 1-1000 adapters vs one adapter and PEFT"
DEFAULT = False
BASE_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    clients: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    prompt_tokens: int
    gen_tokens: int
    requests_per_client: int
    peft_max_adapters: int
    cold_loads: int
    rounds: int = 1


FULL = Settings((1, 8, 32), (1, 10, 100, 1000), 64, 64, 1, 100, 50, rounds=4)
QUICK = Settings((1, 4), (1, 10), 16, 8, 2, 10, 5)


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Measure on SmolLM2-135M, print the table and write JSON, Markdown and the plot into ``out_dir``."""
    from lordba_lab.assets import ensure_smollm2

    return write(out_dir, measure(ensure_smollm2(), QUICK if quick else FULL))


def measure(model_dir: Path, settings: Settings) -> dict:
    """Every configuration of ``settings`` on the model in ``model_dir``: LoRDBA, then PEFT."""
    with tempfile.TemporaryDirectory(prefix="lordba-serve-bench-") as tmp:
        rows, cold = _lordba_rows(model_dir, Path(tmp) / "adapters", settings)
    rows += _peft_rows(model_dir, settings)
    _add_ratios(rows)
    return {"settings": asdict(settings), "hardware": hardware(), "cold_load_ms": cold, "rows": rows}


# ---------------------------------------------------------------------------- servers
def _lordba_rows(model_dir: Path, folder: Path, s: Settings) -> tuple[list[dict], dict]:
    from lordba.serve.adapter_files import adapter_bytes
    from lordba.serve.server import Server, build_state, freeze_heap, load_base
    from lordba_lab.bench._serve_fleet import make_fleet

    names = make_fleet(model_dir, folder, max(s.adapter_counts))
    os.sync()  # the fleet's new files (1 GB at 1,000 adapters) written back now, not during the cold loads
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, BASE_NAME, folder, max_batch=max(s.clients))
    freeze_heap(state)  # as `lordba serve` does at startup
    runs: dict[tuple[int, int], list[dict]] = {}
    with Server(state) as server:
        cold = _cold_loads(state.registry, names[: s.cold_loads + 1])
        for name in names:  # resident before the clients start: cold loads are measured apart
            state.registry.acquire(name)
            state.registry.release(name)
        for clients in s.clients:
            for count in [c for c in s.adapter_counts if c != 1]:
                for k in range(s.rounds):
                    single, many = _pair(server.url, names, count, clients, s, tokenizer, k)
                    runs.setdefault((1, clients), []).append({**single, "reference": single})
                    runs.setdefault((count, clients), []).append({**many, "reference": single})
        rows = []
        for (count, clients), done in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
            resident = sum(adapter_bytes(state.engine.model, n) for n in names[:count])
            row = {"engine": "lordba", "adapters": count, "clients": clients, **_summary(done)}
            rows.append({**row, "resident_bytes": resident})
    return rows, cold


def _pair(url: str, names: list[str], count: int, clients: int, s: Settings, tokenizer: Any, k: int) -> tuple:
    """Round ``k``'s two runs, one adapter and ``count`` adapters, one right after the other, in
    alternating order (A B, B A, ...: a steady drift of the machine's speed cancels); returns them
    as ``(single, many)``."""
    done = {}
    for n in (1, count) if k % 2 == 0 else (count, 1):
        done[n] = _drive(url, names[:n], clients, s, tokenizer, seed=k)
        tps = done[n]["tokens"] / done[n]["wall"]
        print(f"lordba  adapters={n:5d} clients={clients:3d} {tps:8.1f} tok/s", flush=True)
    return done[1], done[count]


def _peft_rows(model_dir: Path, s: Settings) -> list[dict]:
    from transformers import AutoTokenizer

    from lordba.serve.engine import Engine
    from lordba.serve.metrics import ServeMetrics
    from lordba.serve.server import Server, context_length
    from lordba.serve.state import ServerState
    from lordba_lab.bench._serve_fleet import PeftRegistry, peft_fleet

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for count in [c for c in s.adapter_counts if c <= s.peft_max_adapters]:
        model, names, per_adapter = peft_fleet(model_dir, count)
        engine = Engine(model, tokenizer, max_batch=max(s.clients))
        state = ServerState(
            engine, PeftRegistry(model, names), ServeMetrics(), tokenizer, BASE_NAME, context_length(model, tokenizer)
        )
        with Server(state) as server:
            for clients in s.clients:
                row = _summary([_drive(server.url, names, clients, s, tokenizer, seed=0)])
                rows.append(
                    {
                        "engine": "peft",
                        "adapters": count,
                        "clients": clients,
                        **row,
                        "resident_bytes": per_adapter * count,
                    }
                )
                print(f"peft    adapters={count:5d} clients={clients:3d} {row['tokens_per_s']:8.1f} tok/s", flush=True)
        del model, state, engine
    return rows


def _cold_loads(registry: Any, names: list[str]) -> dict:
    """Median and p95 milliseconds of loading an adapter from its file onto the model, with another
    adapter resident (as in service: the model's layers stay wrapped between loads)."""
    anchor, names = names[0], names[1:]
    registry.acquire(anchor)
    times = []
    for name in names:
        start = time.perf_counter()
        registry.acquire(name)
        times.append(1000 * (time.perf_counter() - start))
        registry.release(name)
        registry.unload(name)
    registry.release(anchor)
    registry.unload(anchor)
    return {"median": statistics.median(times), "p95": _pct(times, 95), "n": len(times)}


# ---------------------------------------------------------------------------- clients
def _drive(url: str, names: list[str], clients: int, s: Settings, tokenizer: Any, seed: int) -> dict:
    """``clients`` threads each sending ``requests_per_client`` streamed completions, adapters
    drawn uniformly from ``names`` (``seed``: which draws); returns the client process's times
    (``ttft``, ``gaps`` in seconds, ``tokens``, ``wall``). The clients run in a process of their own
    (:mod:`._serve_clients`), as they would in service: in the server's process their threads would
    compete with its engine for the interpreter lock and measure that."""
    import subprocess
    import sys

    prompt = (tokenizer("The adapters of a thousand users share one base model. " * 16)["input_ids"])[: s.prompt_tokens]
    job = {"url": url, "names": names, "clients": clients, "prompt": prompt, "seed": seed}
    job.update(requests=s.requests_per_client, max_tokens=s.gen_tokens)
    done = subprocess.run(
        [sys.executable, "-m", "lordba_lab.bench._serve_clients"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the serve bench's client process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """One configuration's runs (rounds) pooled: tokens/s over the total wall time, latency
    percentiles over every request and gap, and each round's own tokens/s."""
    ttft = [t for r in runs for t in r["ttft"]]
    gaps = [g for r in runs for g in r["gaps"]]
    ms = {
        f"{what}_ms_p{q}": _ms(_pct(values, q)) for what, values in (("ttft", ttft), ("token", gaps)) for q in (50, 95)
    }
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
    per_round = [r["tokens"] / r["wall"] for r in runs]
    out = {"tokens_per_s": tokens / wall, **ms, "requests": len(ttft), "wall_s": wall, "round_tokens_per_s": per_round}
    if all("reference" in r for r in runs):  # each run's single-adapter run, seconds apart
        out["round_reference_tokens_per_s"] = [r["reference"]["tokens"] / r["reference"]["wall"] for r in runs]
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _pct(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------- report
def _add_ratios(rows: list[dict]) -> None:
    """``vs_single``: throughput over that of the same engine with one adapter and as many clients,
    the median over rounds of each run's ratio to its own single-adapter run (the run just before or
    after it; where runs were not paired, PEFT's, the single-adapter row's runs in order);
    ``round_vs_single``: each round's ratio."""
    single = {(r["engine"], r["clients"]): r["round_tokens_per_s"] for r in rows if r["adapters"] == 1}
    for r in rows:
        ref = r.get("round_reference_tokens_per_s") or single.get((r["engine"], r["clients"]))
        ratios = [t / s for t, s in zip(r["round_tokens_per_s"], ref)] if ref else []
        r["round_vs_single"] = ratios
        r["vs_single"] = statistics.median(ratios) if ratios else None


def write(out_dir: Path, result: dict) -> list[Path]:
    """Print the table; write ``serve.json``, ``serve.md`` and ``serve_throughput.png``; returns the files."""
    columns = [
        "engine",
        "adapters",
        "clients",
        "tok/s",
        "vs 1 adapter",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "token p50 ms",
        "token p95 ms",
        "resident MB",
    ]
    table = [
        (
            r["engine"],
            r["adapters"],
            r["clients"],
            r["tokens_per_s"],
            r["vs_single"],
            r["ttft_ms_p50"],
            r["ttft_ms_p95"],
            r["token_ms_p50"],
            r["token_ms_p95"],
            r["resident_bytes"] / 1e6,
        )
        for r in result["rows"]
    ]
    print_table("lordba serve under load", columns, table)
    cold = result["cold_load_ms"]
    print(f"cold load of an adapter: median {cold['median']:.2f} ms, p95 {cold['p95']:.2f} ms ({cold['n']} loads)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "serve.json", out_dir / "serve.md", out_dir / "serve_throughput.png"]
    write_text(files[0], json.dumps(result, indent=2))
    write_text(
        files[1],
        "# lordba serve under load\n\n"
        + markdown_table(columns, table)
        + f"\n\nCold load: median {cold['median']:.2f} ms, p95 {cold['p95']:.2f} ms over {cold['n']} loads.\n"
        + "\nEach round's ratio to one adapter (same engine and clients, runs seconds apart):\n\n"
        + "".join(
            f"- {r['engine']}, {r['adapters']} adapters, {r['clients']} clients: "
            + ", ".join(f"{v:.3f}" for v in r["round_vs_single"])
            + "\n"
            for r in result["rows"]
            if r["adapters"] != 1
        )
        + f"\nHardware: {json.dumps(result['hardware'])}\n",
    )
    _plot(result["rows"], files[2])
    return files


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in sorted({r["engine"] for r in rows}):
        for clients in sorted({r["clients"] for r in rows}):
            pts = sorted(
                (r["adapters"], r["tokens_per_s"]) for r in rows if r["engine"] == engine and r["clients"] == clients
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    linestyle="-" if engine == "lordba" else "--",
                    label=f"{engine}, {clients} clients",
                )
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters in the request mix")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Throughput against the number of adapters (one base, one server)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
