"""Training checkpoints: checksummed files, and resume from the newest intact one."""

import hashlib
import json
import warnings
from dataclasses import replace

import pytest
import torch
from test_loop import model, rows

from lordba import LoRDBAConfig, TrainingError, get_lordba_model
from lordba.train import TrainSettings, train_loop
from lordba.train.checkpoint import FILES, MANIFEST, load_checkpoint, read_checkpoint, save_checkpoint
from lordba.train.tokenize import Batcher

from conftest import tiny_llama

SETTINGS = TrainSettings(steps=6, lr=3e-3, checkpoint_every=2, keep_checkpoints=3)


@pytest.fixture
def run_dir(tmp_path):
    """A finished run with checkpoints at steps 2, 4 and 6."""
    train_loop(model(), Batcher(rows(), 4), SETTINGS, tmp_path, progress=False)
    return tmp_path


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:08d}"


def flip_bit(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resume(run_dir):
    """Resume the finished run; returns (step resumed from, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train_loop(model(seed=5), Batcher(rows(), 4), SETTINGS, run_dir, progress=False)
    return res.resumed_from, [str(w.message) for w in caught]


def test_every_file_is_checksummed(run_dir):
    manifest = json.loads((ckpt(run_dir, 6) / MANIFEST).read_text())
    assert set(manifest["sha256"]) == set(FILES)
    assert read_checkpoint(ckpt(run_dir, 6)).meta["step"] == 6


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (flip_bit, "trainable.safetensors", "checksum mismatch"),
        (flip_bit, "optimizer.safetensors", "checksum mismatch"),
        (flip_bit, "state.json", "checksum mismatch"),
        (truncate, "trainable.safetensors", "checksum mismatch"),
        (truncate, "state.json", "checksum mismatch"),
        (truncate, MANIFEST, "not valid JSON"),
        (lambda p: p.unlink(), "rng.safetensors", "missing"),
        (lambda p: p.unlink(), MANIFEST, "missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_dir, damage, file, reason):
    damage(ckpt(run_dir, 6) / file)
    with pytest.raises(TrainingError, match=reason):
        read_checkpoint(ckpt(run_dir, 6))
    step, messages = resume(run_dir)
    assert step == 4
    skipped = [m for m in messages if "skipping damaged training checkpoint" in m]
    assert len(skipped) == 1 and "step-00000006" in skipped[0] and reason in skipped[0] and file in skipped[0]
    assert any("resuming from" in m and "step-00000004" in m for m in messages)


def test_the_fallback_resume_ends_where_an_uninterrupted_run_ends(run_dir, tmp_path):
    flip_bit(ckpt(run_dir, 6) / "trainable.safetensors")
    resumed = model(seed=5)
    with pytest.warns(UserWarning, match="skipping damaged"):
        train_loop(resumed, Batcher(rows(), 4), SETTINGS, run_dir, progress=False)
    full = model()
    train_loop(full, Batcher(rows(), 4), SETTINGS, tmp_path / "full", progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_when_every_checkpoint_is_damaged_resuming_is_refused_with_the_reasons(run_dir):
    for step in (2, 4, 6):
        truncate(ckpt(run_dir, step) / "trainable.safetensors")
    with pytest.raises(TrainingError, match=r"every training checkpoint is damaged.*step-00000002.*--no-resume"):
        resume(run_dir)
    res = train_loop(model(), Batcher(rows(), 4), SETTINGS, run_dir, resume=False, progress=False)
    assert res.resumed_from == 0  # starting over stays possible


def test_a_forged_checksum_still_gives_a_training_error_not_a_raw_one(run_dir):
    path = ckpt(run_dir, 6)
    (path / "trainable.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["sha256"]["trainable.safetensors"] = hashlib.sha256(
        (path / "trainable.safetensors").read_bytes()
    ).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="not a readable safetensors file"):
        read_checkpoint(path)


def test_a_checksummed_but_incomplete_state_is_a_training_error(run_dir):
    path = ckpt(run_dir, 6)
    state = json.loads((path / "state.json").read_text())
    del state["numpy_random"]
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256((path / "state.json").read_bytes()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match=r"incomplete training state .*numpy_random"):
        read_checkpoint(path)


def forge_state(path, change):
    """Apply ``change`` to the checkpoint's state.json and record its new checksum (a checkpoint intact by its
    manifest, malformed inside)."""
    state = json.loads((path / "state.json").read_text())
    change(state)
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256((path / "state.json").read_bytes()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "field, change",
    [
        ("optimizer.scalars", lambda s: s["optimizer"].update(scalars="x")),
        ("optimizer.scalars", lambda s: s["optimizer"].update(scalars={"a::step": "x"})),
        ("optimizer.groups", lambda s: s["optimizer"].update(groups="x")),
        ("python_random", lambda s: s.update(python_random=[3])),
        ("python_random", lambda s: s.update(python_random=[3, [1, 2], None])),
        ("numpy_random", lambda s: s.update(numpy_random=["MT19937", [1], 0, 0, 0.0])),
    ],
)
def test_a_malformed_state_is_refused_naming_the_field_before_the_model_changes(run_dir, field, change):
    """A checkpoint whose optimizer structure or generator states are malformed (checksums recomputed) raised a raw
    AttributeError / ValueError / IndexError after its weights were copied into the model."""
    path = ckpt(run_dir, 6)
    forge_state(path, change)
    lm = model(seed=5)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    with pytest.raises(TrainingError, match=f"state.json: malformed {field}"):
        load_checkpoint(path, lm, opt)
    assert all(torch.equal(before[n], p) for n, p in lm.named_parameters())
    assert not opt.state


def test_the_cuda_generators_are_saved_and_restored(tmp_path, monkeypatch):
    """On a CUDA machine the checkpoint holds every GPU's generator state and resuming restores it:
    dropout on the GPU draws from it, and before this a resumed run restarted it from the seed (its
    masks differed from an uninterrupted run's). Simulated here with fake CUDA generator functions."""
    from lordba.train.checkpoint import load_checkpoint, save_checkpoint

    lm, other = model(), model(seed=5)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    resumed = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append([s.clone() for s in new]))
    path = save_checkpoint(tmp_path, 3, lm, optimizer, {})
    load_checkpoint(path, other, resumed)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states, strict=True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with fewer GPUs
    with pytest.warns(UserWarning, match="2 CUDA generator states"):
        load_checkpoint(path, other, resumed)
    assert len(restored) == 1


def test_starting_over_removes_the_earlier_runs_checkpoints_so_none_outlives_the_new_run(run_dir):
    """resume=False beside a finished run of 6 steps (checkpoints 2, 4, 6), for 4 steps with other settings:
    pruning kept the old step 6 as the newest and dropped the new run's own, and a later resume continued the
    old run's weights as if they were this one's. Starting over now leaves only this run's checkpoints."""
    import dataclasses

    short = dataclasses.replace(SETTINGS, steps=4, lr=1e-2)
    new = model(seed=7)
    train_loop(new, Batcher(rows(), 4), short, run_dir, resume=False, progress=False)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    again = model(seed=9)
    res = train_loop(again, Batcher(rows(), 4), short, run_dir, progress=False)
    assert res.resumed_from == 4
    for (name, a), b in zip(new.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # the new run's weights, not the old run's


_KILLED_SAVE = """
import sys, time
from pathlib import Path
from lordba.format.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1]) / "step-00000009", overwrite=True) as tmp:
    (tmp / "trainable.safetensors").write_bytes(b"half a checkpoint")
    print("half written", flush=True)
    time.sleep(60)
"""


def test_starting_over_removes_the_half_written_checkpoint_of_a_killed_save(run_dir):
    """A save killed by SIGKILL leaves its temporary folder (.step-00000009.lordba-tmp.PID.HEX); starting over
    (resume=False, lordba train --no-resume) removed the checkpoints but left it for good, as did every later save
    of another step. One of a process still running (saving now) stays."""
    import os
    import signal
    import subprocess
    import sys

    from lordba.format.atomic import TMP_MARK

    folder = run_dir / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "half written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = [p for p in folder.iterdir() if TMP_MARK in p.name]
    assert len(left) == 1 and left[0].name.startswith(f".step-00000009{TMP_MARK}{child.pid}.")
    live = folder / f".step-00000010{TMP_MARK}{os.getpid()}.0123abcd"
    live.mkdir()
    no_saves = replace(SETTINGS, checkpoint_every=0)
    train_loop(model(), Batcher(rows(), 4), no_saves, run_dir, resume=False, progress=False)
    assert [p.name for p in folder.iterdir()] == [live.name]
    # a resumed run's saves remove them too (one of a step it never saves again: another --checkpoint-every)
    (folder / f".step-00000003{TMP_MARK}{child.pid}.0123abcd").mkdir()
    train_loop(model(), Batcher(rows(), 4), SETTINGS, run_dir, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, *(f"step-0000000{i}" for i in (2, 4, 6))])


def test_pruning_after_a_fallback_resume_keeps_the_checkpoint_just_written(run_dir):
    """After resuming from step 4 past a damaged step 6, the checkpoints were pruned by name: the damaged newer
    one counted among the ``keep_checkpoints`` newest, so with one kept the checkpoint just written (step 5)
    was deleted at once, with the good step 4, and a run stopped before step 6 was written again left only
    the damaged one ("every training checkpoint is damaged"). Now the checkpoint just written and those
    before it are what is kept."""
    import dataclasses

    from test_loop import InterruptAt

    flip_bit(ckpt(run_dir, 6) / "trainable.safetensors")
    settings = dataclasses.replace(SETTINGS, checkpoint_every=1, keep_checkpoints=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):  # batch 5 is step 6's: step 5 was trained and checkpointed
            train_loop(model(), InterruptAt(rows(), 4, stop=5), settings, run_dir, progress=False)
        assert ckpt(run_dir, 5).is_dir() and not ckpt(run_dir, 4).exists()
        assert train_loop(model(), Batcher(rows(), 4), settings, run_dir, progress=False).resumed_from == 5


def test_an_optimizer_built_over_frozen_parameters_too_saves_and_resumes(tmp_path):
    """An optimizer over ``model.parameters()`` (frozen base included, as many scripts build it) is checkpointed and
    restored by parameter name: the frozen ones have no state. Was: save_checkpoint raised a bare KeyError (a
    parameter's id). An optimizer holding a parameter of another model is refused with a TrainingError."""
    from lordba.train.checkpoint import load_checkpoint, save_checkpoint

    lm, other = model(), model(seed=5)
    optimizer = torch.optim.AdamW(lm.parameters())
    ids = torch.arange(6)[None]
    lm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, lm, optimizer, {})
    resumed = torch.optim.AdamW(other.parameters())
    load_checkpoint(path, other, resumed)
    want = {n: optimizer.state[p] for n, p in lm.named_parameters() if p in optimizer.state}
    got = {n: resumed.state[p] for n, p in other.named_parameters() if p in resumed.state}
    assert want and sorted(got) == sorted(want)
    assert all(torch.equal(got[n]["exp_avg"], want[n]["exp_avg"]) for n in want)
    with pytest.raises(TrainingError, match="not one of the model's"):
        save_checkpoint(tmp_path, 2, other, optimizer, {})


def test_parameter_groups_are_restored_by_their_parameters_names_not_their_position(tmp_path):
    """An optimizer of two groups (weight decay on the latents, none on the scales) resumed with its groups built in
    the other order got the groups' hyper-parameters by position: the scales' group took weight_decay 0.1 and lr 1e-2
    silently. Now each group's are matched by its parameters' names; a grouping of other parameters is refused."""
    from lordba.train.checkpoint import load_checkpoint, save_checkpoint

    def grouped(lm, reverse=False):
        latents = [p for n, p in lm.named_parameters() if p.requires_grad and "latent" in n]
        scales = [p for n, p in lm.named_parameters() if p.requires_grad and "latent" not in n]
        groups = [{"params": latents, "weight_decay": 0.1, "lr": 1e-2}, {"params": scales, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups[::-1] if reverse else groups, lr=1e-3)

    lm = model()
    optimizer = grouped(lm)
    ids = torch.arange(6)[None]
    lm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, lm, optimizer, {})
    other = model(seed=5)
    resumed = grouped(other, reverse=True)
    for group in resumed.param_groups:  # what the saved groups must overwrite
        group.update(weight_decay=0.5, lr=0.5)
    load_checkpoint(path, other, resumed)
    assert [(g["weight_decay"], g["lr"]) for g in resumed.param_groups] == [(0.0, 1e-3), (0.1, 1e-2)]
    one = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(TrainingError, match=r"step-00000001: the optimizer's 1 parameter group\(s\) are not the"):
        load_checkpoint(path, other, one)


def test_a_float64_models_checkpoint_saves_and_restores(tmp_path):
    """A float64 model's trained copy (modules_to_save) and its optimizer state are float64: the checkpoint's writer
    knew the adapter file's dtypes only and crashed with a bare ``KeyError: torch.float64``."""
    lm = get_lordba_model(tiny_llama().double(), LoRDBAConfig(r=4, modules_to_save=["lm_head"]))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    ids = torch.arange(1, 9)[None]
    lm(ids, labels=ids).loss.backward()
    opt.step()
    trained = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    assert torch.float64 in {p.dtype for p in trained.values()}
    path = save_checkpoint(tmp_path, 1, lm, opt, {})
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.zero_()
    assert load_checkpoint(path, lm, opt)["step"] == 1
    assert all(torch.equal(p, trained[n]) for n, p in lm.named_parameters() if p.requires_grad)
