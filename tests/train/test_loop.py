"""The shared training loop: learning, frozen base, checkpoints, exact resume after a kill, NaN stop."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from lordba import ConfigError, LoRDBAConfig, TrainingError, get_lordba_model
from lordba.train import TrainSettings, train_loop
from lordba.train.checkpoint import latest_checkpoint
from lordba.train.loop import resolve_device, seed_everything
from lordba.train.tokenize import Batcher

from conftest import tiny_llama


def rows(n=32, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 101, (4, length), generator=g)
    picks = torch.randint(0, 4, (n,), generator=g)
    return [{"input_ids": patterns[i].tolist(), "labels": patterns[i].tolist()} for i in picks]


def model(seed=0):
    m = tiny_llama(0)
    torch.manual_seed(seed)
    return get_lordba_model(m, LoRDBAConfig(r=4))


def test_qat_lowers_the_loss_and_only_the_adapter_has_optimizer_state(tmp_path):
    lm = model()
    res = train_loop(lm, Batcher(rows(), 4), TrainSettings(steps=20, lr=3e-3), tmp_path, progress=False)
    losses = [e["loss"] for e in res.log]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.15
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [e["step"] for e in log] == list(range(1, 21)) and all({"step", "loss", "lr"} <= set(e) for e in log)
    assert all(p.grad is None for p in lm.parameters() if not p.requires_grad)


class InterruptAt(Batcher):
    """Raises KeyboardInterrupt (Ctrl-C) when batch ``stop`` is requested."""

    def __init__(self, *args, stop, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = stop

    def batch(self, k):
        if k == self.stop:
            raise KeyboardInterrupt
        return super().batch(k)


class Recording(Batcher):
    """Records the batch numbers the loop asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def batch(self, k):
        self.asked.append(k)
        return super().batch(k)


def test_first_batch_continues_the_data_where_an_earlier_phase_stopped():
    data = Recording(rows(), 4)
    train_loop(model(), data, TrainSettings(steps=3, grad_accum=2, first_batch=5), progress=False)
    assert data.asked == [5, 6, 7, 8, 9, 10]


def uneven_rows():
    """Eight rows of 14 tokens whose completions (scored labels) have 1 to 12 tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (2, 9, 1, 7, 3, 12, 1, 5):
        ids = torch.randint(0, 101, (14,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (14 - n) + ids[14 - n :]})
    return out


@pytest.mark.parametrize(("batch_size", "grad_accum"), [(4, 2), (1, 8)])
def test_gradient_accumulation_equals_one_batch_of_all_its_examples(batch_size, grad_accum):
    """A step of ``grad_accum`` micro-batches takes the mean over all of its scored tokens, as one batch of
    them all does (the same examples: batch k of size 8 is batches 2k, 2k+1 of size 4). Each micro-batch's
    mean was divided by ``grad_accum``, weighing a token of a micro-batch with a short completion more than
    one of a long completion: a different loss and different weights than the one big batch."""

    def run(bs, accum):
        torch.manual_seed(0)
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
        settings = TrainSettings(steps=2, lr=1e-3, grad_accum=accum)
        return train_loop(lm, Batcher(uneven_rows(), bs), settings, progress=False).log, lm

    (one_log, one), (acc_log, acc) = run(8, 1), run(batch_size, grad_accum)
    assert [e["loss"] for e in acc_log] == pytest.approx([e["loss"] for e in one_log], rel=1e-6)
    for (n, a), b in zip(one.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=n)


def test_a_micro_batch_with_nothing_to_score_adds_nothing_to_its_step():
    """A micro-batch whose only label is its first token (never predicted) has no scored token: its mean
    loss is NaN, and the step stopped as a non-finite loss ("learning rate too high?"). It weighs nothing."""
    data = [{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}, {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]
    log = train_loop(model(), Batcher(data, 1), TrainSettings(steps=2, grad_accum=2), progress=False).log
    assert [e["step"] for e in log] == [1, 2] and all(math.isfinite(e["loss"]) for e in log)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", -1), ("steps", 2.0), ("batch_size", 0), ("grad_accum", 0), ("lr", -1e-4), ("lr", float("nan")),
        ("lr", float("inf")), ("lr", "1e-4"), ("warmup_ratio", 1.5), ("warmup_ratio", -0.1),
        ("weight_decay", -1e-3), ("max_grad_norm", 0.0), ("max_grad_norm", float("nan")), ("eval_every", -5),
        ("checkpoint_every", -1), ("keep_checkpoints", 0), ("seed", 1.5), ("seed", None), ("first_batch", -1),
        ("bf16", 1), ("gradient_checkpointing", "yes"), ("steps", True), ("lr", 10**400), ("seed", 2**64),
        ("seed", -(2**63) - 1),
    ],
)  # fmt: skip
def test_settings_refuse_a_bad_value_naming_the_field(field, value):
    """A run's settings are checked when they are made (not steps into a run, nor silently: a
    ``keep_checkpoints`` of 0 would keep every checkpoint, a ``max_grad_norm`` of 0 would zero every
    gradient), with the library's ConfigError naming the field."""
    with pytest.raises(ConfigError, match=rf"TrainSettings\.{field} must be"):
        TrainSettings(**{field: value})


def test_settings_accept_the_edges_and_numpy_numbers():
    TrainSettings(steps=0, warmup_ratio=0, max_grad_norm=float("inf"), weight_decay=0, seed=-3, eval_every=0)
    for seed in (2**64 - 1, -(2**63)):  # the ends of what torch's generators take: seed_everything runs
        seed_everything(TrainSettings(seed=seed).seed)
    s = TrainSettings(steps=np.int64(3), lr=np.float32(1e-3), warmup_ratio=1)
    assert s.steps == 3 and s.warmup_ratio == 1


def test_a_batcher_built_without_a_seed_follows_the_runs_seed():
    """TrainSettings.seed, the seed of everything random, did not reach the data order: a Batcher's own seed
    (default 0) made it, so with the model built by the caller TrainSettings(seed=1) trained exactly seed 0's
    adapter. Now a Batcher built without a seed shuffles with the run's (one given a seed keeps it), and only within
    the run."""

    def run(seed, batcher):
        lm = model()
        train_loop(lm, batcher, TrainSettings(steps=3, lr=3e-3, seed=seed), progress=False)
        return torch.cat([p.detach().flatten() for p in lm.parameters() if p.requires_grad])

    following = Batcher(rows(), 4)
    assert not torch.equal(run(0, following), run(1, following))
    assert torch.equal(run(1, following), run(1, Batcher(rows(), 4, seed=1)))
    assert torch.equal(run(0, Batcher(rows(), 4, seed=1)), run(1, Batcher(rows(), 4, seed=1)))
    assert following.shuffle_seed == 0 and following.digest() == Batcher(rows(), 4, seed=0).digest()


def test_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    settings = TrainSettings(steps=8, lr=3e-3, checkpoint_every=3)
    full = model()
    train_loop(full, Batcher(rows(), 4), settings, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_loop(model(), InterruptAt(rows(), 4, stop=7), settings, tmp_path / "p", progress=False)
    resumed = model(seed=99)  # different initial state: everything must come from the checkpoint
    res = train_loop(resumed, Batcher(rows(), 4), settings, tmp_path / "p", progress=False)
    assert res.resumed_from == 6
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_run_with_other_settings_is_refused_not_resumed_from_the_checkpoints(tmp_path):
    """The checkpoints did not record the settings of their run: a run with another lr (or fewer steps) into the same
    out_dir resumed the finished run's step 4 and returned its adapter silently (resumed_from 4, 4 logged steps for a
    run of 2). Now it is refused naming the settings that differ, before the model changes; those that do not change
    what is trained (checkpoint_every, eval_every, ...) may differ."""
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2)
    train_loop(model(), Batcher(rows(), 4), settings, tmp_path, progress=False)
    fresh = model(seed=99)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for other, differ in ((dict(lr=1e-2), "lr: 0.003 -> 0.01"), (dict(steps=2), "steps: 4 -> 2")):
        with pytest.raises(ConfigError, match=rf"step-00000004: .*other settings .*{differ}.*resume=False"):
            train_loop(fresh, Batcher(rows(), 4), replace(settings, **other), tmp_path, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    watched = replace(settings, checkpoint_every=1, eval_every=3, keep_checkpoints=4, lr=np.float64(3e-3))
    assert train_loop(model(), Batcher(rows(), 4), watched, tmp_path, progress=False).resumed_from == 4


def test_a_run_on_other_data_is_refused_not_resumed_from_the_checkpoints(tmp_path):
    """The checkpoints recorded the settings of their run but not its data: a run with the same settings on other
    rows (or another shuffle seed) into the same out_dir resumed the finished run's step 4 and returned its adapter
    (resumed_from 4). Now it is refused, before the model changes; the same data resumes."""
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2)
    train_loop(model(), Batcher(rows(), 4), settings, tmp_path, progress=False)
    fresh = model(seed=99)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for other in (Batcher(rows(seed=1), 4), Batcher(rows(), 4, seed=1), Batcher(rows(n=31), 4)):
        with pytest.raises(ConfigError, match=r"step-00000004: .*other training data.*lordba train --no-resume"):
            train_loop(fresh, other, settings, tmp_path, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    assert train_loop(model(), Recording(rows(), 4), settings, tmp_path, progress=False).resumed_from == 4


def test_a_run_of_adapters_configured_otherwise_is_refused_not_resumed(tmp_path):
    """The checkpoints recorded the settings and the data of their run but not the adapter's config: the same run
    with another alpha or scale dtype (tensors of the same shapes) into the same out_dir resumed the finished run's
    step 4 and returned its adapter, trained at the other alpha. Now it is refused naming the field; the same config
    resumes."""
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2)
    train_loop(model(), Batcher(rows(), 4), settings, tmp_path, progress=False)
    for other in (LoRDBAConfig(r=4, alpha=8.0), LoRDBAConfig(r=4, scale_dtype="float32")):
        with pytest.raises(ConfigError, match=r"step-00000004: .*configured otherwise.*default\.(alpha|scale_dtype)"):
            train_loop(get_lordba_model(tiny_llama(0), other), Batcher(rows(), 4), settings, tmp_path, progress=False)
    assert train_loop(model(), Batcher(rows(), 4), settings, tmp_path, progress=False).resumed_from == 4


def test_a_run_whose_evaluation_gave_nan_resumes_from_its_checkpoint(tmp_path):
    """An evaluation may give NaN (held-out rows with nothing left to score: ``heldout_loss`` is NaN) and
    the log travels in each checkpoint's state.json. It was written there as a bare ``NaN``, which the
    strict reader refuses, so every later checkpoint was "damaged" and the run could not resume."""
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=1, eval_every=1)

    def evaluate():
        return {"eval_loss": math.nan, "metric": math.inf}

    full = model()
    want = train_loop(full, Batcher(rows(), 4), settings, tmp_path / "full", evaluate, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_loop(model(), InterruptAt(rows(), 4, stop=3), settings, tmp_path / "p", evaluate, progress=False)
    resumed = model(seed=99)
    res = train_loop(resumed, Batcher(rows(), 4), settings, tmp_path / "p", evaluate, progress=False)
    assert res.resumed_from == 3
    assert json.dumps(res.log) == json.dumps(want.log)  # the log as it was (NaN where the evaluation gave NaN)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_loop_child import run
run({out!r})
"""


def test_resume_after_sigkill_continues_from_the_last_checkpoint(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(tests=os.path.dirname(__file__), out=str(tmp_path / "run")))
    proc = subprocess.Popen([sys.executable, str(child)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "run" / "checkpoints") is None and time.time() < deadline:
        assert proc.poll() is None, "child ended before writing a checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    done = int(last.name.split("-")[1])
    assert 0 < done < 40
    from test_loop_child import SETTINGS, build

    # The child and both runs here at one thread: reductions split over other thread counts round otherwise (a test
    # worker left at 3 threads by an earlier test made the resumed run differ from the child's steps by up to 0.01).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = build()
        res = train_loop(resumed, Batcher(rows(), 4), SETTINGS, tmp_path / "run", progress=False)
        assert res.resumed_from >= done
        full = build()
        train_loop(full, Batcher(rows(), 4), SETTINGS, tmp_path / "fresh", progress=False)
    finally:
        torch.set_num_threads(threads)
    # (this failed twice in full-suite runs, never alone: the message says what differed and from which step)
    pairs = zip(full.state_dict().items(), resumed.state_dict().values())
    differ = {n: float((a - b).abs().max()) for (n, a), b in pairs if not torch.equal(a, b)}
    if differ:  # (what differs between this process and a new one like the killed child, said with the failure)
        from test_loop_child import numeric_state

        code = "import json, sys; sys.path.insert(0, sys.argv[1]); from test_loop_child import numeric_state; "
        code += "print(json.dumps(numeric_state()))"
        child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        argv = [sys.executable, "-c", code, os.path.dirname(__file__)]
        out = subprocess.run(argv, env=child_env, capture_output=True, text=True)
        states = f"this process {numeric_state()}, a new one {out.stdout.strip() or out.stderr[-500:]}"
        worst = sorted(differ.items(), key=lambda kv: -kv[1])[:3]
        where = f"resumed from {res.resumed_from} (killed after {done})"
        raise AssertionError(f"{where}: {len(differ)} tensors differ, most {worst}; {states}")
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no half-written checkpoint is visible


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    lm = model()
    with pytest.raises(
        TrainingError, match=r"non-finite loss or gradient at step \d+.*last good checkpoint is .*step-"
    ):
        train_loop(
            lm,
            Batcher(rows(), 4),
            TrainSettings(steps=30, lr=1e9, checkpoint_every=1, max_grad_norm=1e12),
            tmp_path,
            progress=False,
        )
    last = latest_checkpoint(tmp_path / "checkpoints")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(last / "trainable.safetensors")).values())


def test_nothing_to_train():
    frozen = tiny_llama(0)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train_loop(frozen, Batcher(rows(), 4), TrainSettings(steps=1), progress=False)


def test_bf16_autocast_trains_on_cpu_with_float32_weights(tmp_path):
    lm = model()
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    res = train_loop(lm, Batcher(rows(), 4), TrainSettings(steps=4, lr=3e-3, bf16=True), progress=False)
    assert all(math.isfinite(e["loss"]) for e in res.log)
    for n, p in lm.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, before[n]), n


def test_resolve_device():
    best = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device() == best and resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="one of"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(ConfigError, match="'cuda' is not available"):
            resolve_device("cuda")


def test_bf16_trains_on_an_hqq_base():
    """``TrainSettings(bf16=True)`` on an HQQ base was refused (HQQ's backward multiplied the bfloat16 gradient by
    its float32 weight); since ``LordbaHQQLinear.matmul`` casts the weight it trains: finite losses, every
    trainable tensor changed."""
    from lordba.quant import quantize_model

    base = quantize_model(tiny_llama(0), backend="hqq", group_size=8)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    result = train_loop(lm, Batcher(rows(), 4), TrainSettings(steps=2, bf16=True), progress=False)
    assert all(math.isfinite(e["loss"]) for e in result.log if "loss" in e) and result.log
    assert all(not torch.equal(p, before[n]) for n, p in lm.named_parameters() if p.requires_grad)


def test_train_loop_takes_a_string_out_dir_and_names_bad_arguments(tmp_path):
    # out_dir="run" (a str): TypeError 'str' / 'str' (build_adapter's too); settings None or a dict: AttributeError
    # 'bf16'; Batcher(rows, 0): ZeroDivisionError at the first batch.
    settings = TrainSettings(steps=2, checkpoint_every=1)
    train_loop(model(), Batcher(rows(), 4), settings, str(tmp_path / "run"), progress=False)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    assert (tmp_path / "run" / "train_log.json").is_file()
    for bad in (None, {"steps": 2}):
        with pytest.raises(ConfigError, match="TrainSettings"):
            train_loop(model(), Batcher(rows(), 4), bad, progress=False)
    for size in (0, -1, 2.0, None):
        with pytest.raises(ConfigError, match="batch_size"):
            Batcher(rows(), size)
