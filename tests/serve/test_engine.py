"""The engine without HTTP: the running batch's KV cache (rows joining and leaving between steps),
continuous batching across adapters, aborts and failing steps."""

from __future__ import annotations

import time

import pytest
import torch

from lordba.serve.batch import decode, prefill
from lordba.serve.engine import Engine, Request
from lordba.serve.errors import UnavailableError
from lordba.serve.sampling import SamplingParams

from .serve_helpers import (
    Collector,
    char_tokenizer,
    make_served,
    prompts,
    reference,
    sentencepiece_like_tokenizer,
    served_model,
)

BASE = "__base__"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(served):
    return served_model(served, ("a", "b"))


def test_rows_join_and_leave_between_steps_each_as_generate_alone(lm, served):
    model_dir, adapters = served
    ps, names, n = prompts(7, 3, 11), ["a", "b", BASE], 10
    want = [reference(model_dir, adapters / a if a != BASE else None, p, n) for p, a in zip(ps, names)]
    logits, batch = prefill(lm, ps[:2], names[:2])
    got = [[t] for t in logits.argmax(-1).tolist()]
    rows = [0, 1]
    for step in range(n - 1):
        if step == 3:  # a third request joins a running batch of different lengths
            first, joining = prefill(lm, ps[2:], names[2:])
            batch = batch.merge(joining)
            got.append(first.argmax(-1).tolist())
            rows.append(2)
        logits = decode(lm, batch, [got[r][-1] for r in rows], [names[r] for r in rows])
        for j, r in enumerate(rows):
            got[r].append(int(logits[j].argmax()))
        if step == 5:  # the longest row leaves: the batch gets narrower
            width = batch.width
            keep = [j for j, r in enumerate(rows) if r != 2]
            batch, rows = batch.select(keep), [rows[j] for j in keep]
            assert batch.width < width and batch.cache.layers[0].keys.shape[2] == batch.width
    for r in range(3):
        assert got[r] == want[r][: len(got[r])], names[r]


def run_engine(lm, requests: list[tuple[list[int], str, SamplingParams]], tokenizer=None) -> list[Collector]:
    engine = Engine(lm, tokenizer or char_tokenizer(), max_batch=4)
    engine.start()
    try:
        out = []
        for prompt, adapter, params in requests:
            c = Collector()
            c.request = Request(prompt, adapter, params, c.sink, c.on_done)
            engine.submit(c.request)
            out.append(c)
        for c in out:
            assert c.done.wait(30)
        return out
    finally:
        engine.shutdown()


def test_engine_batches_requests_of_different_adapters_and_lengths(lm, served):
    model_dir, adapters = served
    tok = char_tokenizer()
    ps = prompts(5, 9, 4, 6)
    plan = [(ps[0], "a", 12), (ps[1], "b", 5), (ps[2], BASE, 9), (ps[3], "a", 3)]
    results = run_engine(lm, [(p, a, SamplingParams(n, temperature=0.0)) for p, a, n in plan])
    for (p, a, n), c in zip(plan, results):
        want = reference(model_dir, adapters / a if a != BASE else None, p, n)
        assert c.last.text == tok.decode(want, skip_special_tokens=True)
        assert "".join(e.delta for e in c.events) == c.last.text
        assert c.last.completion_tokens == len(want) and c.released == 1


def test_abort_frees_the_slot_and_the_adapter(lm):
    engine = Engine(lm, char_tokenizer(), max_batch=2)
    engine.start()
    try:
        long, short = Collector(), Collector()
        first = Request(prompts(5)[0], "a", SamplingParams(200, temperature=0.0), long.sink, long.on_done)
        engine.submit(first)
        engine.submit(Request(prompts(4)[0], "b", SamplingParams(3, temperature=0.0), short.sink, short.on_done))
        assert short.done.wait(30)
        engine.abort(first)
        assert long.done.wait(30)
        assert long.last.finish_reason == "abort" and long.released == 1 and len(first.generated) < 200
        assert engine.load == (0, 0)
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(lm):
    engine = Engine(lm, char_tokenizer())
    engine.start()
    try:
        bad, good = Collector(), Collector()
        engine.submit(Request(prompts(4)[0], "not-loaded", SamplingParams(4, temperature=0.0), bad.sink, bad.on_done))
        assert bad.done.wait(30)
        assert bad.last.finish_reason == "error" and "not-loaded" in bad.last.error and bad.released == 1
        engine.submit(Request(prompts(4)[0], "a", SamplingParams(4, temperature=0.0), good.sink, good.on_done))
        assert good.done.wait(30)
        assert good.last.finish_reason in ("length", "stop") and good.last.completion_tokens >= 1
    finally:
        engine.shutdown()


def test_a_request_aborted_while_waiting_leaves_at_once_and_a_stopped_engine_refuses(lm):
    engine = Engine(lm, char_tokenizer(), max_batch=1)
    engine.start()
    try:
        running, waiting = Collector(), Collector()
        first = Request(prompts(5)[0], "a", SamplingParams(250, temperature=0.0, ignore_eos=True), running.sink)
        second = Request(prompts(4)[0], "b", SamplingParams(4, temperature=0.0), waiting.sink, waiting.on_done)
        engine.submit(first)
        engine.submit(second)
        deadline = time.monotonic() + 30
        while engine.load != (1, 1) and time.monotonic() < deadline:  # the batch is full: the second waits
            time.sleep(0.005)
        assert engine.load == (1, 1)
        engine.abort(second)
        assert waiting.done.wait(30) and not running.done.is_set()
        assert waiting.last.finish_reason == "abort" and waiting.released == 1 and not second.generated
        engine.abort(first)
        assert running.done.wait(30)
    finally:
        engine.shutdown()
    with pytest.raises(UnavailableError, match="shutting down"):
        engine.submit(Request([5], "a", SamplingParams(1), Collector().sink))


def test_an_engine_loop_that_dies_fails_its_requests_and_refuses_new_ones_instead_of_hanging(lm):
    """An error outside the steps the loop guards (here the observer's queue report, after a step) killed the
    engine thread silently: its requests and every later one waited forever. They end with ``error`` and new
    ones are refused (a 503) naming the failure."""

    class Broken:  # every report is taken, but the queue's raises
        def queue(self, waiting: int, running: int) -> None:
            raise RuntimeError("observer broke")

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: None

    engine = Engine(lm, char_tokenizer(), max_batch=2)
    engine.observer = Broken()
    engine.start()
    try:
        held = Collector()
        engine.submit(Request(prompts(5)[0], "a", SamplingParams(50, temperature=0.0), held.sink, held.on_done))
        assert held.done.wait(30)
        assert held.last.finish_reason == "error" and "observer broke" in held.last.error and held.released == 1
        assert "observer broke" in engine.failure
        with pytest.raises(UnavailableError, match="engine stopped after an internal error"):
            engine.submit(Request([5], "a", SamplingParams(1), Collector().sink))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fail_after", [0, 2])  # in the prefill step, in a decode step
def test_a_row_whose_sampling_fails_ends_alone_and_its_neighbours_go_on(lm, served, fail_after, monkeypatch):
    """A failure choosing one row's token fails that row only; it used to fail every row of the step
    (other clients' requests included) with the engine's 500."""
    model_dir, adapters = served
    engine = Engine(lm, char_tokenizer(), max_batch=4)
    good, bad = Collector(), Collector()
    p_good, p_bad = prompts(6, 4)
    ok = Request(p_good, "a", SamplingParams(8, temperature=0.0, ignore_eos=True), good.sink, good.on_done)
    broken = Request(p_bad, "b", SamplingParams(8, temperature=1.0, ignore_eos=True), bad.sink, bad.on_done)
    original, draws = torch.multinomial, []

    def multinomial(*args, generator=None, **kw):
        if generator is broken.rng:
            draws.append(1)
            if len(draws) > fail_after:
                raise RuntimeError("this row's sampling broke")
        return original(*args, generator=generator, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    engine.submit(broken)
    engine.submit(ok)  # both join the same prefill, then the same decode steps
    engine.start()
    try:
        assert good.done.wait(30) and bad.done.wait(30)
    finally:
        engine.shutdown()
    assert bad.last.finish_reason == "error" and "sampling broke" in bad.last.error and bad.released == 1
    assert len(broken.generated) == fail_after
    want = reference(model_dir, adapters / "a", p_good, 8)
    assert good.last.finish_reason == "length" and good.released == 1
    assert good.last.text == char_tokenizer().decode(want, skip_special_tokens=True)


def test_the_text_is_what_the_tokens_add_after_the_prompt_with_a_sentencepiece_tokenizer(lm):
    """A tokenizer that strips the leading space where decoding starts (Llama 2, Mistral; here every token is
    a word piece ``▁<char>``): the generated ids were decoded alone, so the completion lost its first space and
    prompt + completion read as one word."""
    tok = sentencepiece_like_tokenizer()
    ps = prompts(5, 3)
    results = run_engine(lm, [(p, "a", SamplingParams(6, temperature=0.0, ignore_eos=True)) for p in ps], tok)
    for p, c in zip(ps, results):
        after = len(tok.decode(p, skip_special_tokens=True))
        generated = tok.decode(p + c.request.generated, skip_special_tokens=True)[after:]
        assert c.last.text == generated and c.last.text.startswith(" ")
        assert "".join(e.delta for e in c.events) == c.last.text


def test_the_prompt_tokens_counted_are_those_of_prompts_that_ran(lm):
    """``lordba_prompt_tokens_total`` counted every request's prompt when it ended, one aborted while it waited
    for a slot too (a client that timed out in the queue of an overloaded server): prompt tokens the model never
    processed, counted as served."""
    from lordba.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    engine = Engine(lm, char_tokenizer(), max_batch=1, observer=metrics)
    engine.start()
    try:
        running, waiting = Collector(), Collector()
        first = Request(prompts(5)[0], "a", SamplingParams(250, temperature=0.0, ignore_eos=True), running.sink)
        second = Request(prompts(7)[0], "b", SamplingParams(4, temperature=0.0), waiting.sink)
        engine.submit(first)
        engine.submit(second)
        deadline = time.monotonic() + 30
        while engine.load != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.abort(second)
        assert waiting.done.wait(30) and waiting.last.finish_reason == "abort"
        engine.abort(first)
        assert running.done.wait(30)
    finally:
        engine.shutdown()
    assert metrics.prompt_tokens._value.get() == 5
    assert metrics.generation_tokens._value.get() == len(first.generated)
    assert metrics.finished_requests.labels("abort")._value.get() == 2


def test_a_pad_token_past_the_models_embeddings_does_not_fail_prompts_of_different_lengths(lm, served):
    """A tokenizer whose pad token was added after the model was made (id 99, the model's embeddings hold 99
    rows): the engine padded the shorter prompts with it, and every prefill of prompts of different lengths failed
    with 'IndexError: index out of range in self' (each prompt alone was served). Padded positions are masked:
    a valid id pads them, the outputs are those of each request alone."""
    model_dir, adapters = served
    tok = char_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad2>"})
    assert tok.pad_token_id == lm.base_model.get_input_embeddings().num_embeddings
    ps = prompts(6, 3)
    results = run_engine(lm, [(p, "a", SamplingParams(4, temperature=0.0)) for p in ps], tok)
    for p, c in zip(ps, results):
        assert c.last.finish_reason in ("length", "stop"), c.last.error
        assert c.request.generated == reference(model_dir, adapters / "a", p, 4)[: len(c.request.generated)]


@pytest.mark.parametrize("ending", ["length", "abort"])
def test_a_row_whose_release_fails_ends_alone_and_its_neighbours_go_on(lm, served, ending):
    """A row's ``on_done`` (the server's adapter release) raising in ``_finish`` left the step: every other row of
    that decode step ended with ``error`` (an abort's, outside the guarded steps, stopped the engine for good).
    The row whose release failed ends with ``error``; its neighbours run to their end."""
    model_dir, adapters = served
    engine = Engine(lm, char_tokenizer(), max_batch=4)
    good, bad = Collector(), Collector()
    p_good, p_bad = prompts(6, 4)

    def broken_release() -> None:
        bad.released += 1
        raise RuntimeError("release broke")

    ok = Request(p_good, "a", SamplingParams(8, temperature=0.0, ignore_eos=True), good.sink, good.on_done)
    n = 3 if ending == "length" else 200
    broken = Request(p_bad, "b", SamplingParams(n, temperature=0.0, ignore_eos=True), bad.sink, broken_release)
    if ending == "abort":
        broken.aborted = True  # aborted while it waits: dropped at the engine's next step
        engine.submit(ok)
        engine.start()
        engine.submit(broken)
    else:
        engine.submit(broken)
        engine.submit(ok)  # both join the same prefill, then the same decode steps
        engine.start()
    try:
        assert good.done.wait(30) and bad.done.wait(30)
        assert engine.failure is None
    finally:
        engine.shutdown()
    assert bad.last.finish_reason == "error" and "release broke" in bad.last.error and bad.released == 1
    want = reference(model_dir, adapters / "a", p_good, 8)
    assert good.last.finish_reason == "length" and good.released == 1
    assert good.last.text == char_tokenizer().decode(want, skip_special_tokens=True)


def test_a_shutdown_whose_join_times_out_leaves_the_step_in_progress_its_requests(lm):
    """``shutdown`` aborted the running requests from its own thread once its join timed out, under the step
    still in progress: their adapters were released while their forward was still to run, and the step then went
    on over a batch emptied under it. They are now aborted by the engine thread once its step ends."""
    engine = Engine(lm, char_tokenizer(), max_batch=2)
    held = Collector()
    req = Request(prompts(5)[0], "a", SamplingParams(200, temperature=0.0, ignore_eos=True), held.sink, held.on_done)
    engine.start()
    engine.submit(req)
    deadline = time.monotonic() + 30
    while len(req.generated) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    writing = lm._lock.write()
    writing.__enter__()  # the engine's next forward waits: its step outlasts the shutdown's join
    try:
        deadline = time.monotonic() + 30
        while not lm._lock._cond._waiters and time.monotonic() < deadline:  # the engine reaches that forward
            time.sleep(0.001)
        assert lm._lock._cond._waiters, "the engine's forward never waited for the lock"
        engine.shutdown(timeout=0.2)
        assert engine._thread.is_alive()
        assert held.released == 0 and not held.done.is_set()  # not released under the step in progress
    finally:
        writing.__exit__(None, None, None)
    assert held.done.wait(30)
    engine._thread.join(30)
    assert not engine._thread.is_alive() and engine.failure is None
    assert held.last.finish_reason == "abort" and held.released == 1
    assert [e.finish_reason for e in held.events].count("abort") == 1 and held.events[-1] is held.last
    assert engine.load == (0, 0)


def test_a_merge_whose_allocation_fails_leaves_the_running_batch_whole(lm, monkeypatch):
    """``KVBatch.merge`` put each layer's merged keys and values in place as it built them: an allocation failing
    part way (out of memory at the second layer) left the running batch with its first layer's caches holding the
    new rows too, the others not, and its mask not; the engine's next decode then failed every running row."""
    _, running = prefill(lm, prompts(5, 3), ["a", "b"])
    _, joining = prefill(lm, prompts(9), [BASE])
    before = [(layer.keys, layer.values) for layer in running.cache.layers]
    mask, lengths = running.mask, list(running.lengths)
    original, calls = torch.cat, []

    def cat(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the second layer's keys (a layer: its keys and values, each padded then joined)
            raise RuntimeError("CUDA out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat)
    with pytest.raises(RuntimeError, match="out of memory"):
        running.merge(joining)
    monkeypatch.setattr(torch, "cat", original)
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(running.cache.layers, before))
    assert running.mask is mask and running.lengths == lengths
    decode(lm, running, [5, 6], ["a", "b"])  # the batch still runs
    assert all(layer.keys.shape[0] == 2 for layer in running.cache.layers)


def test_dropping_an_aborted_row_that_fails_fails_the_running_rows_not_the_engine(lm, monkeypatch):
    """Dropping an aborted row copies the other rows' KV cache (``KVBatch.select``), outside the steps the loop
    guarded: an allocation failing there (out of memory) stopped the engine for good (``failure`` set, every
    later request a 503 until a restart). The running rows end with ``error`` and the engine goes on."""
    from lordba.serve.batch import KVBatch

    engine = Engine(lm, char_tokenizer(), max_batch=4)
    left, other = Collector(), Collector()
    params = SamplingParams(200, temperature=0.0, ignore_eos=True)
    leaving = Request(prompts(5)[0], "a", params, left.sink, left.on_done)
    staying = Request(prompts(4)[0], "b", params, other.sink, other.on_done)
    engine.submit(leaving)
    engine.submit(staying)
    original = KVBatch.select

    def select(self, keep):
        if leaving.aborted and keep:  # (keeping no row allocates nothing)
            raise RuntimeError("CUDA out of memory")
        return original(self, keep)

    monkeypatch.setattr(KVBatch, "select", select)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while len(staying.generated) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.abort(leaving)
        assert left.done.wait(30) and other.done.wait(30)
        monkeypatch.setattr(KVBatch, "select", original)
        assert engine.failure is None
        assert left.last.finish_reason == "abort" and left.released == 1
        assert other.last.finish_reason == "error" and "out of memory" in other.last.error and other.released == 1
        after = Collector()
        engine.submit(Request(prompts(4)[0], "a", SamplingParams(3, temperature=0.0), after.sink, after.on_done))
        assert after.done.wait(30) and after.last.finish_reason in ("length", "stop")
    finally:
        engine.shutdown()


def test_a_request_is_counted_before_its_last_event_is_sent(lm):
    """The engine sent a request's last event, then reported it to the metrics: a scrape right after a response
    could miss it (a finished request still counted as running). It is counted first."""
    from lordba.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    seen = []
    engine = Engine(lm, char_tokenizer(), max_batch=1, observer=metrics)
    done = Collector()

    def sink(event):
        if event.finish_reason is not None:
            seen.append(metrics.finished_requests.labels(event.finish_reason)._value.get())
        done.sink(event)

    engine.start()
    try:
        engine.submit(Request(prompts(5)[0], "a", SamplingParams(3, temperature=0.0, ignore_eos=True), sink))
        assert done.done.wait(30)
    finally:
        engine.shutdown()
    assert seen == [1]


def tiny_gemma(window: int):
    """A tiny random Gemma 3 (a sliding-window layer of ``window``, then a global one) with adapter ``a`` on every
    linear layer, its scales made large enough to change the greedy tokens."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=64)  # fmt: skip
    lm = get_lordba_model(Gemma3ForCausalLM(config).eval(), LoRDBAConfig(r=4, target_modules="all-linear"), "a")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "scale" in name:
                p.normal_(0, 0.3)
    return lm.eval()


def test_a_model_with_sliding_window_layers_gives_each_row_its_generate_alone_past_the_window():
    """Gemma 3 mixes sliding-window layers with global ones. The running batch kept every layer's whole history
    (a ``DynamicCache`` without a config): a long request's sliding layers held all its tokens, not its window's. Now
    they hold the batch's last ``window - 1`` columns, with rows of different lengths (longer and shorter than the
    window) joining and leaving the batch, and each row still decodes as ``generate`` alone."""
    window, n = 5, 9
    lm = tiny_gemma(window)
    ps, names = prompts(9, 3, 13, 2), ["a", BASE, "a", BASE]
    want = []
    for p, name in zip(ps, names):
        with torch.no_grad():
            out = lm.generate(torch.tensor([p]), adapter_names=[name], max_new_tokens=n, do_sample=False,
                              eos_token_id=[], pad_token_id=0)  # fmt: skip
        want.append(out[0, len(p) :].tolist())
    logits, batch = prefill(lm, ps[:2], names[:2])
    got = [[t] for t in logits.argmax(-1).tolist()]
    rows = [0, 1]

    def join(i: int):
        first, joining = prefill(lm, ps[i : i + 1], names[i : i + 1])
        got.append(first.argmax(-1).tolist())
        rows.append(i)
        return batch.merge(joining)

    for step in range(n - 1):
        if step in (1, 3):  # a row longer than the batch joins, then one shorter than the window
            batch = join(2 if step == 1 else 3)
        logits = decode(lm, batch, [got[r][-1] for r in rows], [names[r] for r in rows])
        for j, r in enumerate(rows):
            got[r].append(int(logits[j].argmax()))
        if step in (4, 6):  # the longest row leaves, then the next longest
            keep = [j for j, r in enumerate(rows) if batch.lengths[j] < max(batch.lengths)]
            batch, rows = batch.select(keep), [rows[j] for j in keep]
        sliding, full = batch.cache.layers
        assert sliding.keys.shape[2] == sliding.values.shape[2] == min(batch.width, window - 1), step
        assert full.keys.shape[2] == batch.width and sliding.cumulative_length == batch.width, step
    assert batch.width < window + n - 1 and rows == [1, 3]  # the last select left rows shorter than the window
    assert want[0] != want[1][: len(want[0])]
    for r in range(4):
        assert got[r] == want[r][: len(got[r])], names[r]


def test_a_long_request_on_sliding_window_layers_holds_its_window_there_and_generates_as_generate_alone():
    """The engine end to end: a request of 40 prompt tokens and 20 generated on a window of 4 holds 3 columns on the
    sliding layer at every step (it held all 58 by the last step, as the global layer does) and returns ``generate``'s
    tokens."""
    lm = tiny_gemma(4)
    prompt = prompts(40)[0]
    with torch.no_grad():
        want = lm.generate(torch.tensor([prompt]), adapter_names=["a"], max_new_tokens=20, do_sample=False,
                           eos_token_id=[], pad_token_id=0)[0, 40:].tolist()  # fmt: skip
    engine = Engine(lm, char_tokenizer(), max_batch=2)
    widths = []
    original = engine._decode_step

    def step() -> None:
        original()
        if engine._batch is not None:
            widths.append([layer.keys.shape[2] for layer in engine._batch.cache.layers])

    engine._decode_step = step
    c = Collector()
    request = Request(prompt, "a", SamplingParams(20, temperature=0.0, ignore_eos=True), c.sink, c.on_done)
    engine.submit(request)
    engine.start()
    try:
        assert c.done.wait(30) and c.last.finish_reason == "length"
    finally:
        engine.shutdown()
    assert request.generated == want
    assert widths[-1] == [3, 58] and max(w[0] for w in widths) == 3


def test_a_request_aborted_while_an_aborted_neighbour_is_ended_still_ends(lm):
    """Dropping the aborted running rows ended those aborted when it looked, then kept those not aborted when it
    looked again: a request aborted in between (its client gone, from another thread, while the first row's end was
    being sent) left the batch with no end event: its client waited for ever and its adapter was never released. Here
    the second request is aborted from the first one's release, in that window."""
    engine = Engine(lm, char_tokenizer(), max_batch=4)
    first, second = Collector(), Collector()
    params = SamplingParams(200, temperature=0.0, ignore_eos=True)
    neighbour = Request(prompts(4)[0], "b", params, second.sink, second.on_done)

    def release_and_abort_the_neighbour() -> None:
        first.on_done()
        engine.abort(neighbour)

    leaving = Request(prompts(5)[0], "a", params, first.sink, release_and_abort_the_neighbour)
    engine.submit(neighbour)  # (the row before the leaving one: the rows are looked at in order)
    engine.submit(leaving)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while len(neighbour.generated) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.abort(leaving)
        assert first.done.wait(30) and first.last.finish_reason == "abort" and first.released == 1
        assert second.done.wait(30), "the neighbour left the batch without its end"
        assert second.last.finish_reason == "abort" and second.released == 1
        assert engine.load == (0, 0) and engine.failure is None
    finally:
        engine.shutdown()
