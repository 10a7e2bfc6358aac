"""The engine's scheduling across adapters: which waiting requests each step admits (the batch and prefill-token
caps, oldest first), rows joining a running batch, rows that finish in the prefill or together in one step.

Round 5 of the hand-made mutants (serve/engine.py, each applied to a copy of src and the tests run against it): these
kill the ones test_engine.py let survive: the prefill token cap refusing an exact fit (e02), a lone prompt over the
cap never admitted (e03), the padded width taken from the next prompt only (e04), running rows not counted against
max_batch (e06), a joining request's row put before the running ones while its cache row comes after (e07), a
surviving row dropped when two rows finish in one step (e10). Each test submits its requests before the engine
starts, so that what one step admits does not depend on the timing of the engine thread."""

from __future__ import annotations

import pytest

from lordba.serve import engine as engine_module
from lordba.serve.engine import Engine, Request
from lordba.serve.sampling import SamplingParams

from .serve_helpers import Collector, char_tokenizer, make_served, prompts, reference, served_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory, names=("a", "b"))


@pytest.fixture(scope="module")
def lm(served):
    return served_model(served, ("a", "b"))


@pytest.fixture
def prefills(monkeypatch) -> list[list[int]]:
    """The prompt lengths of each prefill forward the engine runs, in order."""
    seen, original = [], engine_module.prefill

    def recording(model, prompts, adapters, pad_id=0):
        seen.append([len(p) for p in prompts])
        return original(model, prompts, adapters, pad_id)

    monkeypatch.setattr(engine_module, "prefill", recording)
    return seen


def serve(engine: Engine, plan: list[tuple[list[int], str, int]]) -> list[Collector]:
    """Submit ``(prompt, adapter, max_tokens)`` requests (greedy, past EOS), then start ``engine`` and wait for all."""
    out = []
    for prompt, adapter, n in plan:
        c = Collector()
        c.request = Request(prompt, adapter, SamplingParams(n, temperature=0.0, ignore_eos=True), c.sink, c.on_done)
        engine.submit(c.request)
        out.append(c)
    engine.start()
    try:
        for c in out:
            assert c.done.wait(60), c.request.id
    finally:
        engine.shutdown()
    return out


def test_no_more_rows_than_max_batch_run_and_the_oldest_waiting_requests_go_first(lm, prefills):
    ps = prompts(3, 4, 5, 6, 7)
    engine = Engine(lm, char_tokenizer(), max_batch=2)
    results = serve(engine, [(p, "ab"[i % 2], 5) for i, p in enumerate(ps)])
    assert all(c.last.finish_reason == "length" and c.released == 1 for c in results)
    assert engine.max_rows_seen == 2
    assert all(len(rows) <= 2 for rows in prefills)
    assert [n for rows in prefills for n in rows] == [3, 4, 5, 6, 7]  # first come, first admitted


def test_a_prefill_takes_prompts_up_to_exactly_max_prefill_tokens_padded(lm, prefills):
    engine = Engine(lm, char_tokenizer(), max_batch=8, max_prefill_tokens=10)
    serve(engine, [(p, "a", 2) for p in prompts(5, 5, 5)])
    assert prefills == [[5, 5], [5]]  # 2 x 5 padded tokens fit 10; a third would make 15


def test_the_prefill_token_cap_counts_the_padding_to_the_longest_prompt_taken(lm, prefills):
    engine = Engine(lm, char_tokenizer(), max_batch=8, max_prefill_tokens=12)
    serve(engine, [(p, "b", 2) for p in prompts(8, 2, 2)])
    assert prefills == [[8], [2, 2]]  # 8 and 2 together: 2 rows padded to 8 = 16 tokens


def test_a_prompt_longer_than_max_prefill_tokens_still_runs_alone(lm, prefills):
    engine = Engine(lm, char_tokenizer(), max_batch=4, max_prefill_tokens=4)
    (c,) = serve(engine, [(prompts(6)[0], "a", 3)])
    assert c.last.finish_reason == "length" and prefills == [[6]]


def test_a_request_joining_a_running_batch_and_its_neighbour_each_get_their_own_tokens(lm, served):
    """The new row's cache is stacked after the running rows': the request list must follow the same order."""
    model_dir, adapters = served
    engine = Engine(lm, char_tokenizer(), max_batch=4)
    first, joining = Collector(), Collector()
    p_first, p_join = prompts(4, 9)
    params = SamplingParams(10, temperature=0.0)
    running = Request(p_first, "a", params, first.sink, first.on_done)
    engine.submit(running)
    engine.start()
    try:
        for _ in range(3000):  # (until it has run a decode step or two: then the second joins a running batch)
            if len(running.generated) >= 2 or first.done.is_set():
                break
            first.done.wait(0.01)
        assert len(running.generated) >= 2 and not first.done.is_set()
        late = Request(p_join, "b", SamplingParams(6, temperature=0.0), joining.sink, joining.on_done)
        engine.submit(late)
        assert first.done.wait(60) and joining.done.wait(60)
    finally:
        engine.shutdown()
    assert running.generated == reference(model_dir, adapters / "a", p_first, 10)
    assert late.generated == reference(model_dir, adapters / "b", p_join, 6)


def test_rows_ending_in_the_prefill_or_together_in_one_step_leave_their_neighbours_running(lm, served):
    """One request ends with its first token (in the prefill), two end in the same decode step, one goes on."""
    model_dir, adapters = served
    ps, names, lengths = prompts(5, 3, 7, 4), ["a", "b", "b", "a"], [1, 3, 3, 8]
    engine = Engine(lm, char_tokenizer(), max_batch=4)
    results = serve(engine, list(zip(ps, names, lengths)))
    for p, name, n, c in zip(ps, names, lengths, results):
        assert c.last.finish_reason == "length" and c.released == 1, c.last.error
        want = reference(model_dir, adapters / name, p, n)
        assert c.request.generated[: len(want)] == want  # (the reference stops at an EOS; these run past it)
    assert engine.load == (0, 0)
