"""Shared fixtures: tiny random Llama models (fast) and helpers to craft adapter files."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=101,
    hidden_size=40,
    intermediate_size=52,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama (hidden 40, not a multiple of 8, to exercise padding bits)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    return model.eval()


def tiny_q4(adapter: bool, compute: str = "exact"):
    """:func:`tiny_llama` on the q4 base (groups of 64), with (``adapter``) a packed random LoRDBA adapter
    (r=4, output scales ×30: large enough to change the greedy tokens) in eval mode.

    ``compute`` defaults to ``exact``: tests that compare two paths (compiled and eager, static and
    dynamic cache) to 1e-4 need float32 inputs — with ``fast`` a 1-ulp difference upstream can flip an
    input's bfloat16 rounding (2^-9 of it)."""
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.quant import quantize_model, set_compute

    base = quantize_model(tiny_llama(0), backend="q4", group_size=64)
    set_compute(base, compute)
    if not adapter:
        return base
    torch.manual_seed(3)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"))
    for a in lm.adapter_modules("default").values():
        with torch.no_grad():
            a.scale_out.mul_(30)
    lm.pack()
    return lm.eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (3, 9), generator=g)


def rewrite_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Replace an adapter's weights with crafted content and fix the config checksum, so that
    validation beyond the checksum is exercised."""
    from lordba.format.tensorfile import to_bytes

    data = to_bytes(tensors, metadata)
    (directory / "lordba_model.safetensors").write_bytes(data)
    set_config(directory, weights_sha256=hashlib.sha256(data).hexdigest())


def set_config(directory: Path, reseal: bool = True, **changes) -> None:
    """Change fields of an adapter's config. With ``reseal`` (the default), also store the new
    config's digest in the weights file (``config_sha256``, if it has one) and fix the checksum, as an
    attacker who controls every byte would, so that validation beyond the digest is exercised."""
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    weights = directory / "lordba_model.safetensors"
    if reseal and weights.is_file() and set(changes) - {"weights_sha256", "library_version"}:
        from lordba.format.integrity import CONFIG_DIGEST_KEY, config_digest
        from lordba.format.tensorfile import to_bytes

        tensors, metadata = load_weights(directory)
        if CONFIG_DIGEST_KEY in (metadata or {}):
            metadata[CONFIG_DIGEST_KEY] = config_digest(cfg)
            data = to_bytes(tensors, metadata)
            weights.write_bytes(data)
            cfg["weights_sha256"] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(cfg))


def load_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(directory / "lordba_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def refuse(directory: Path, match: str) -> None:
    """The adapter in ``directory`` is refused both on its own and when loaded onto a model, which
    stays unchanged."""
    from lordba import LoRDBAError, LoRDBAModel
    from lordba.format.adapter import read_adapter

    with pytest.raises(LoRDBAError, match=match):
        read_adapter(directory)
    model = tiny_llama(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRDBAError, match=match):
        LoRDBAModel.from_pretrained(model, directory)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test worker, and its subprocesses: they share the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_as_found():
    """torch's thread count put back after each test that changed it, with a warning naming the test in the summary:
    a worker left at 3 threads once made a later test's float results differ from a 1-thread subprocess's."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        warnings.warn(f"this test left torch at {after} threads (found at {before}; put back)", stacklevel=1)


def refuse_directory_locks(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """NFS's flock on a directory opened read-only, simulated: refused with ``code`` (EBADF: an emulated fcntl write
    lock needs a file open for writing; ENOLCK: no lock manager); a file opened for writing still gets its lock."""
    import fcntl
    import stat

    real = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def locked_elsewhere(path: str | Path, flags: int = os.O_RDONLY) -> bool:
    """Whether another process would be refused ``path``'s exclusive ``flock`` now (a second open file of it: flock
    treats it as another process); the probe's own lock, if taken, is given back at once."""
    import fcntl

    fd = os.open(path, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``long`` first, the rest in their order: in a parallel run (scripts/test.sh) they start at
    once, spread over the workers, instead of the last of them holding one worker after the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
