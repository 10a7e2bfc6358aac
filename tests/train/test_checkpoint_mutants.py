"""``train.checkpoint`` without a training run: one optimizer step of the tiny model, saved and read back, pinning
what the resume tests of test_checkpoint.py (minutes of training) leave open: every generator restored, the newest
complete checkpoint found, the manifest's and the state's checks, a checkpoint that does not fit refused before the
model or the optimizer changes, parameter groups of another count or of an earlier version."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save
from test_checkpoint import forge_state
from test_loop import model

from lordba import LoRDBAConfig, TrainingError, get_lordba_model
from lordba.train.checkpoint import (
    GROUP_NAMES,
    MANIFEST,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

from conftest import tiny_llama


def _stepped(lm, optimizer):
    """``lm`` after one optimizer step (every trainable tensor has Adam state)."""
    ids = torch.arange(1, 9)[None]
    lm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lm


def _adamw(lm):
    return torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint at step 3 of the tiny model after one optimizer step."""
    lm = model()
    optimizer = _adamw(lm)
    _stepped(lm, optimizer)
    return save_checkpoint(tmp_path, 3, lm, optimizer, {"log": []})


def _draws():
    """Draws of each generator, one Gaussian each: Python's and NumPy's make them in pairs and keep the second for the
    next draw (part of their state)."""
    python = [random.random(), random.gauss(0, 1)]
    return torch.rand(4).tolist(), python, [*np.random.rand(2).tolist(), np.random.standard_normal()]


def test_loading_restores_every_generator_a_run_draws_from(tmp_path):
    """An exact resume continues the torch, Python and NumPy generators where the saving run left them (a user's
    evaluation, data augmentation or dropout draws from them), not where the resumed run's seeding put them."""
    lm = model()
    optimizer = _adamw(lm)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    _draws()  # (a state no seed gives, a Gaussian pending in Python's and NumPy's)
    path = save_checkpoint(tmp_path, 1, lm, optimizer, {})
    want = _draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    other = model(seed=5)
    load_checkpoint(path, other, _adamw(other))
    assert _draws() == want


def test_latest_checkpoint_is_the_newest_complete_one(saved):
    """The newest by step (8-digit names: step 10 after step 9), and never a folder without its state.json."""
    lm = model()
    optimizer = _adamw(lm)
    for step in (9, 10):
        save_checkpoint(saved.parent, step, lm, optimizer, {}, keep=5)
    (saved.parent / "step-00000011").mkdir()  # a folder of that name without a checkpoint in it
    assert latest_checkpoint(saved.parent) == saved.parent / "step-00000010"
    assert sorted(p.name for p in saved.parent.iterdir()) == [f"step-000000{s:02d}" for s in (3, 9, 10, 11)]


def test_pruning_keeps_the_newest_up_to_the_one_just_written(saved):
    """``keep`` counts the checkpoint just written and those before it; a newer one (a damaged step a resume skipped)
    stays until its step is written again."""
    lm = model()
    optimizer = _adamw(lm)
    save_checkpoint(saved.parent, 9, lm, optimizer, {}, keep=5)
    for step in (4, 5):
        save_checkpoint(saved.parent, step, lm, optimizer, {}, keep=2)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-00000004", "step-00000005", "step-00000009"]
    save_checkpoint(saved.parent, 9, lm, optimizer, {"again": True}, keep=2)  # its step written again: replaced
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-00000005", "step-00000009"]
    assert read_checkpoint(saved.parent / "step-00000009").meta["extra"] == {"again": True}


def _set_manifest(path, manifest):
    (path / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def test_the_manifest_is_read_up_to_its_size_limit(saved):
    manifest = json.dumps(json.loads((saved / MANIFEST).read_text()))
    _set_manifest(saved, manifest + " " * ((1 << 16) - len(manifest)))
    assert read_checkpoint(saved).meta["step"] == 3
    _set_manifest(saved, manifest + " " * ((1 << 16) + 1 - len(manifest)))
    with pytest.raises(TrainingError, match=rf"{MANIFEST}: larger than 65536 bytes"):
        read_checkpoint(saved)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m["sha256"].pop("rng.safetensors"), "expected the sha256 of"),
        (lambda m: m["sha256"].update({"extra.bin": "0" * 64}), "expected the sha256 of"),
        (lambda m: m.update(sha256=list(m["sha256"].values())), "expected the sha256 of"),
        (lambda m: m.clear(), "expected the sha256 of"),
    ],
    ids=["a digest missing", "an extra digest", "a list", "no digests"],
)
def test_a_manifest_without_exactly_the_files_digests_is_refused(saved, change, reason):
    manifest = json.loads((saved / MANIFEST).read_text())
    change(manifest)
    _set_manifest(saved, manifest)
    with pytest.raises(TrainingError, match=f"{MANIFEST}: {reason}"):
        read_checkpoint(saved)


def test_a_manifest_that_is_not_an_object_is_refused(saved):
    _set_manifest(saved, "[]")
    with pytest.raises(TrainingError, match=f"{MANIFEST}: expected a JSON object"):
        read_checkpoint(saved)


@pytest.mark.parametrize("key", ["step", "optimizer", "extra", "python_random", "numpy_random"])
def test_a_state_without_one_of_its_fields_is_refused_naming_it(saved, key):
    forge_state(saved, lambda s: s.pop(key))
    with pytest.raises(TrainingError, match=rf"incomplete training state .*{key}"):
        read_checkpoint(saved)


def _forge_rng(path, tensors):
    """Replace the checkpoint's rng.safetensors and record its checksum (intact by its manifest)."""
    import hashlib

    data = save(tensors)
    (path / "rng.safetensors").write_bytes(data)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["sha256"]["rng.safetensors"] = hashlib.sha256(data).hexdigest()
    _set_manifest(path, manifest)


def _unchanged_after_refusal(path, lm, optimizer, match):
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with pytest.raises(TrainingError, match=match):
        load_checkpoint(path, lm, optimizer)
    assert all(torch.equal(before[n], p) for n, p in lm.named_parameters())
    assert not optimizer.state


def test_an_rng_file_without_the_torch_generator_is_refused(saved):
    _forge_rng(saved, {"cuda.0": torch.zeros(16, dtype=torch.uint8)})
    with pytest.raises(TrainingError, match=r"incomplete training state .*torch RNG"):
        read_checkpoint(saved)


def test_a_malformed_torch_generator_state_is_refused_before_the_model_changes(saved):
    _forge_rng(saved, {"torch": torch.zeros(7, dtype=torch.uint8)})
    other = model(seed=5)
    _unchanged_after_refusal(saved, other, _adamw(other), r"rng.safetensors: malformed torch generator state")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (LoRDBAConfig(r=2), r"step-00000003: .* has shape \(4,.*\), the model \(2,.*\)"),
        (LoRDBAConfig(r=4, target_modules=["q_proj"]), r"step-00000003: .*other trainable tensors.*extra \["),
        (LoRDBAConfig(r=4, modules_to_save=["lm_head"]), r"step-00000003: .*other trainable tensors.*missing \["),
    ],
    ids=["rank", "fewer modules", "more tensors"],
)
def test_a_checkpoint_of_other_tensors_is_refused_before_the_model_changes(saved, config, match):
    torch.manual_seed(5)
    other = get_lordba_model(tiny_llama(0), config)
    _unchanged_after_refusal(saved, other, _adamw(other), match)


def _two_groups(lm):
    latents = [p for n, p in lm.named_parameters() if p.requires_grad and "latent" in n]
    scales = [p for n, p in lm.named_parameters() if p.requires_grad and "latent" not in n]
    return [{"params": latents, "weight_decay": 0.1, "lr": 1e-2}, {"params": scales, "weight_decay": 0.0}]


def test_an_optimizer_of_another_number_of_groups_is_refused(tmp_path):
    """The checkpoint's two groups (latents, scales) resumed into an optimizer over the latents alone: its one group
    matches one of them by name, but the other group's parameters would be left out of the resume."""
    lm = model()
    optimizer = torch.optim.AdamW(_two_groups(lm), lr=1e-3)
    path = save_checkpoint(tmp_path, 1, _stepped(lm, optimizer), optimizer, {})
    other = model(seed=5)
    latents_only = torch.optim.AdamW(_two_groups(other)[:1], lr=1e-3)
    _unchanged_after_refusal(path, other, latents_only, r"optimizer's 1 parameter group\(s\) are not the .* 2 ")


def test_the_groups_of_a_checkpoint_without_their_names_are_restored_by_position(tmp_path):
    """A checkpoint of an earlier version records its groups' hyper-parameters without their parameters' names:
    they are restored by position, and an optimizer with another number of groups is refused."""
    lm = model()
    optimizer = torch.optim.AdamW(_two_groups(lm), lr=1e-3)
    path = save_checkpoint(tmp_path, 1, _stepped(lm, optimizer), optimizer, {})
    forge_state(path, lambda s: [g.pop(GROUP_NAMES) for g in s["optimizer"]["groups"]])
    other = model(seed=5)
    resumed = torch.optim.AdamW(_two_groups(other), lr=1e-3)
    for group in resumed.param_groups:
        group.update(weight_decay=0.5, lr=0.5)
    load_checkpoint(path, other, resumed)
    assert [(g["weight_decay"], g["lr"]) for g in resumed.param_groups] == [(0.1, 1e-2), (0.0, 1e-3)]
    single = model(seed=6)
    _unchanged_after_refusal(
        path, single, _adamw(single), r"step-00000001: the optimizer has 1 parameter group\(s\), the checkpoint 2"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_optimizer_state_and_weights_are_restored_exactly(tmp_path, dtype):
    """Every trainable tensor and every optimizer state tensor as the saving run had it, in its dtype (the Adam
    moments of a float64 model's trained copy of its head too)."""

    def build(seed):
        torch.manual_seed(seed)
        return get_lordba_model(tiny_llama(0).to(dtype), LoRDBAConfig(r=4, modules_to_save=["lm_head"]))

    lm = build(0)
    optimizer = _adamw(lm)
    path = save_checkpoint(tmp_path, 1, _stepped(lm, optimizer), optimizer, {})
    other = build(5)
    resumed = _adamw(other)
    load_checkpoint(path, other, resumed)
    want = dict(lm.named_parameters())
    for name, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, want[name]), name
            state, saved = resumed.state[p], optimizer.state[want[name]]
            assert sorted(state) == sorted(saved) == ["exp_avg", "exp_avg_sq", "step"]
            for key in saved:
                assert state[key].dtype == saved[key].dtype and torch.equal(state[key], saved[key]), (name, key)
