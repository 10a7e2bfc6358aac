"""The ``serve`` suite's clients, in a process of their own: ``python -m lordba_lab.bench._serve_clients``
reads a job (JSON on stdin: url, adapter names, client count, prompt token ids, requests per client,
max_tokens, optionally the seed of the draws) and prints one JSON line: the times to first token,
the gaps between streamed tokens, the tokens generated and the wall time."""

from __future__ import annotations

import itertools
import json
import random
import sys
import threading
import time


def run(job: dict) -> dict:
    """Drive the server: ``clients`` threads, each sending its requests one after another (official
    ``openai`` client, streaming, greedy, ``ignore_eos``), adapters drawn uniformly from ``names``.

    Raises:
        RuntimeError: a request failed (its client's error named): the numbers of the others alone would
            be a throughput that was not measured."""
    import openai

    ttft: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        try:
            requests(k)
        except Exception as err:  # reported by the run, not only on a dying thread's stderr
            with lock:
                errors.append(f"{type(err).__name__}: {err}")

    def requests(k: int) -> None:
        rng = random.Random(1000 * job.get("seed", 0) + k)  # each round its own draws
        api = openai.OpenAI(base_url=job["url"] + "/v1", api_key="bench", max_retries=0, timeout=600)
        for _ in range(job["requests"]):
            start = time.perf_counter()
            stamps = []
            stream = api.completions.create(
                model=rng.choice(job["names"]),
                prompt=job["prompt"],
                max_tokens=job["max_tokens"],
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            used = 0
            for chunk in stream:
                # a token's text; the finish reason follows the last one in a chunk of its own (no token: not
                # stamped), unless no text came at all (then it is the end of the request's first token)
                if chunk.choices and (chunk.choices[0].text or (chunk.choices[0].finish_reason and not stamps)):
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            with lock:
                ttft.append(stamps[0] - start)
                gaps.extend(b - a for a, b in itertools.pairwise(stamps))
                tokens[0] += used

    threads = [threading.Thread(target=client, args=(k,)) for k in range(job["clients"])]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {job['clients']} clients failed; the first: {errors[0]}")
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens[0], "wall": time.perf_counter() - start}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
