"""The library leaves the process's global state as it found it: a user's script calls lordba between its own code,
and a call that quietly changed a global (the random generators, the thread count, grad mode, warning filters,
loggers) would change the user's results elsewhere."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama


def _rng() -> torch.Tensor:
    return torch.get_rng_state().clone()


@pytest.fixture
def threads():
    """torch at a thread count other than the worker's for the test (2, or 3 where it was 2), put back after: these
    tests left it there, and a later test's float results in that worker differed from a 1-thread subprocess's."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2 if saved != 2 else 3)
    yield torch.get_num_threads()
    torch.set_num_threads(saved)


def test_bnb_quantize_and_merge_leave_the_global_generator_alone():
    """Quantizing to bitsandbytes NF4 and merging into an NF4 base drew from torch's global generator: each new
    ``Linear4bit`` ran ``nn.Linear``'s random initialisation (Kaiming-uniform) before its weight was replaced, so a
    seeded script's adapter initialisation or sampled tokens after the call differed from those without it, and a q4
    base (which draws nothing) and an NF4 one started the same seeded adapter differently. transformers builds its
    bitsandbytes layers empty (on ``meta``), and PEFT's NF4 merge makes no layer."""
    pytest.importorskip("bitsandbytes")
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.quant import quantize_model

    model = tiny_llama(0)
    before = _rng()
    base = quantize_model(model, backend="bnb", bits=4)
    assert torch.equal(_rng(), before)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"))
    lm.pack()
    before = _rng()
    with pytest.warns(UserWarning, match="requantized"):
        lm.merge_and_unload()
    assert torch.equal(_rng(), before)


def test_bnb_int8_layer_leaves_the_global_generator_alone():
    """A ``Linear8bitLt`` made by lordba (an int8 base, its requantizing merge) drew its random initialisation too."""
    pytest.importorskip("bitsandbytes")
    from lordba.quant.bnb import make_linear8bit

    weight, bias = torch.randn(32, 64), torch.randn(32)
    before = _rng()
    layer = make_linear8bit(weight, bias)
    assert torch.equal(_rng(), before)
    assert torch.equal(layer.bias, bias)


def test_the_cli_restores_the_threads_generator_and_loggers_it_changes(tmp_path, capsys, threads):
    """``lordba generate --threads 1 --seed 7`` run through ``lordba.cli.main`` (a test, a notebook, the lab) left
    the caller's process with torch's thread count at 1, its global generator seeded at 7 and advanced by the
    sampling, bitsandbytes' CPU logger at ERROR and a stderr handler on ``lordba.decode`` (so the library's later
    decode warnings went to stderr a second time)."""
    import logging

    from lordba.cli import main
    from tiny_model import tiny_model_dir

    folder = tiny_model_dir(tmp_path / "model")
    torch.manual_seed(123)
    before, bnb, decode = _rng(), logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("lordba.decode")
    level, handlers = bnb.level, list(decode.handlers)
    argv = ["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "3", "--threads", "1"]
    assert main([*argv, "--seed", "7", "--temperature", "1", "ab"]) == 0
    assert torch.get_num_threads() == threads
    assert torch.equal(_rng(), before)
    assert bnb.level == level and decode.handlers == handlers
    first = capsys.readouterr().out
    assert main([*argv, "--seed", "7", "--temperature", "1", "ab"]) == 0
    assert capsys.readouterr().out == first  # (the command still samples from its own seed)


def test_main_gives_back_the_generators_and_threads_a_command_changed(monkeypatch, threads):
    """A command that seeds the generators (the lab's ``train`` and ``bench``: ``seed_everything``, per-case
    ``torch.manual_seed``) or sets torch's thread count, run through ``lordba.cli.main``, left them so for the caller:
    its own draws after the call depended on the command's seed."""
    import random
    import types

    import numpy as np

    import lordba.cli as cli
    from lordba.train.loop import seed_everything

    def run(args):
        seed_everything(5)
        torch.set_num_threads(1)
        return 0

    module = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "commands", lambda: [cli.Command("seeding", "seeds", lambda: module)])
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), _rng())
    assert cli.main(["seeding"]) == 0
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(_rng(), before[2]) and torch.get_num_threads() == threads
