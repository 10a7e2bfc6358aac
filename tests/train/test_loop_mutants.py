"""``train.loop``'s resume check without a training run: what a checkpoint records of its run (settings, data digest,
adapter configs, origin) and which differences refuse a resume, on hand-made checkpoints of each kind."""

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

from lordba import ConfigError, LoRDBAConfig
from lordba.train import TrainSettings
from lordba.train.checkpoint import Checkpoint
from lordba.train.loop import RUN_ONLY_SETTINGS, _same_run, adapter_configs, settings_record

SETTINGS = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2)


class _Data:
    """A batcher whose data digest is ``digest`` (``None``: a batcher that has no digest)."""

    def __init__(self, digest):
        if digest is not None:
            self.digest = lambda: digest


def _lm(**configs):
    """A model with these adapter configs (what :func:`adapter_configs` reads of a LoRDBAModel)."""
    return types.SimpleNamespace(peft_config=configs)


def _checkpoint(data="d1", configs=None, origin=None, **changes):
    """A checkpoint whose run record is what ``_same_run`` records of a run of ``SETTINGS`` on these, with
    ``changes`` to the record."""
    run, _ = _same_run(SETTINGS, _Data(data), adapter_configs(_lm(**(configs or {}))), origin)
    run.update(changes)
    return Checkpoint(Path("step-00000004"), {}, {}, {}, {"step": 4, "extra": {"log": [], **run}})


def _check(ckpt, settings=SETTINGS, data="d1", configs=None, origin=None):
    _, check = _same_run(settings, _Data(data), adapter_configs(_lm(**(configs or {}))), origin)
    check(ckpt)


COMPARED = {
    "steps": 5, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.5, "weight_decay": 0.1,
    "max_grad_norm": 2.0, "seed": 1, "bf16": True, "first_batch": 3,
}  # fmt: skip


def test_every_setting_but_the_run_only_ones_is_compared():
    """Each setting that changes what is trained refuses the resume, naming it; those that only watch or checkpoint
    the run (and gradient checkpointing, the same tensors) may change."""
    assert set(COMPARED) | set(RUN_ONLY_SETTINGS) == {f.name for f in dataclasses.fields(TrainSettings)}
    ckpt = _checkpoint()
    for name, value in COMPARED.items():
        with pytest.raises(ConfigError, match=rf"step-00000004: .*other settings .*{name}: .* -> {value!r}"):
            _check(ckpt, dataclasses.replace(SETTINGS, **{name: value}))
    watched = dict(eval_every=3, checkpoint_every=1, keep_checkpoints=5, gradient_checkpointing=True)
    _check(ckpt, dataclasses.replace(SETTINGS, lr=np.float64(3e-3), steps=np.int64(4), **watched))


def test_settings_of_numpy_numbers_are_recorded_as_json_numbers():
    """The record goes into each checkpoint's state.json: a numpy integer there made every save fail."""
    record = settings_record(TrainSettings(steps=np.int64(4), lr=np.float32(1e-3), seed=np.uint64(2**64 - 1)))
    assert json.loads(json.dumps(record)) == record
    assert type(record["steps"]) is int and type(record["lr"]) is float and record["seed"] == 2**64 - 1


def test_a_record_of_an_earlier_version_is_compared_where_it_has_the_field():
    """A checkpoint of an earlier version recorded fewer settings (or none, or no data digest, adapters or origin):
    what it lacks is not compared, what it has is."""
    partial = {k: v for k, v in settings_record(SETTINGS).items() if k not in ("first_batch", "bf16")}
    adapters = {"default": LoRDBAConfig()}
    for ckpt in (_checkpoint(configs=adapters, settings=partial), _checkpoint(settings=None, data=None, adapters=None)):
        _check(ckpt, dataclasses.replace(SETTINGS, first_batch=7, bf16=True), configs=adapters)
    with pytest.raises(ConfigError, match=r"other settings .*lr: 0\.003 -> 0\.01"):
        _check(_checkpoint(settings=partial), dataclasses.replace(SETTINGS, lr=1e-2))


def test_a_data_digest_or_origin_is_compared_only_where_both_are_known():
    _check(_checkpoint(data="d1", origin="o1"), data="d1", origin="o1")
    _check(_checkpoint(data="d1", origin="o1"), data=None, origin=None)  # a batcher without a digest: not compared
    _check(_checkpoint(data=None), data="d2")  # a run of a batcher without one
    with pytest.raises(ConfigError, match="other training data"):
        _check(_checkpoint(data="d1"), data="d2")
    with pytest.raises(ConfigError, match="started from another LoRA"):
        _check(_checkpoint(origin="o1"), origin="o2")


def test_adapter_configs_are_compared_but_the_bases_name():
    """The base model's folder may move between runs: a config differing only in ``base_model_name_or_path`` resumes.
    Another field, or another set of adapters, is refused naming it."""
    saved = _checkpoint(configs={"default": LoRDBAConfig(r=4, base_model_name_or_path="/old/model")})
    _check(saved, configs={"default": LoRDBAConfig(r=4, base_model_name_or_path="/new/model")})
    with pytest.raises(ConfigError, match=r"configured otherwise .*default\.alpha: 32\.0 -> 8\.0"):
        _check(saved, configs={"default": LoRDBAConfig(r=4, alpha=8.0)})
    with pytest.raises(ConfigError, match=r"configured otherwise .*adapters: \['default'\] -> \['default', 'other'\]"):
        _check(saved, configs={"default": LoRDBAConfig(r=4), "other": LoRDBAConfig(r=4)})
    _check(saved, configs={})  # a model that is not a LoRDBAModel records none: nothing to compare
