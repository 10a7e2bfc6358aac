"""A crafted adapter file whose patterns would make a backtracking engine take exponential time on
the module names its own header supplies: every entry point finishes (loads or refuses) promptly.

Each case runs in a subprocess with a 30 s timeout, so a regression fails instead of hanging."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.format.adapter import ModuleRecord, write_adapter

from conftest import tiny_llama

N = 30
SHAPES = {
    "optional items": {"rank_pattern": {"a?" * N + "a" * N: 2}},
    "bounded repeats": {"alpha_pattern": {"a{0,1}" * N + "a" * N: 5.0}},
    "alternations": {"rank_pattern": {"(a|a)?" * N + "b": 3}},
    "whole-path target": {"target_modules": "(model.*|" + "a?" * N + "a" * N + ")"},
}


def crafted(directory, changes):
    """A valid adapter on the tiny model plus a module named ``"a" * N`` (a module path the
    header may hold), with the hostile patterns in its config."""
    torch.manual_seed(0)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    state = lm.adapter_state("default")
    q = state.modules["model.layers.0.self_attn.q_proj"]
    modules = dict(state.modules)
    modules["a" * N] = ModuleRecord("a" * N, q.in_features, q.out_features, q.r, dict(q.tensors))
    config = dataclasses.replace(state.config, **{"target_modules": None, **changes})
    write_adapter(directory, config, modules)
    lm.save_pretrained(directory / "clean")


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from lordba import LoRDBAError, LoRDBAModel
    from lordba.cli import main

    crafted = Path({directory!r})
    outcomes = []
    for step in ("from_pretrained", "load_adapter", "hotswap_adapter"):
        try:
            if step == "from_pretrained":
                LoRDBAModel.from_pretrained(tiny_llama(0), crafted)
            else:
                lm = LoRDBAModel.from_pretrained(tiny_llama(0), crafted / "clean")
                if step == "load_adapter":
                    lm.load_adapter(crafted, "other")
                else:
                    lm.hotswap_adapter(crafted, "default")
            outcomes.append("loaded")
        except LoRDBAError as err:
            assert str(crafted) in str(err), err
            outcomes.append("refused")
    code = main(["inspect", str(crafted)])
    assert code in (0, 3), code
    print(outcomes)
    """
)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hostile_patterns_in_a_file_do_not_hang_any_entry_point(tmp_path, shape):
    crafted(tmp_path, SHAPES[shape])
    code = CHILD.format(tests=str(Path(__file__).parents[1]), directory=str(tmp_path))
    # a child that imports torch and builds three tiny models took 23-26 s on a loaded 2-core machine; a pattern
    # matched by backtracking would take hours ("(a|a)?" * 30: 2**30 paths), so 120 s still tells the two apart
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['refused', 'refused', 'refused']" in proc.stdout  # the extra module is not in the model
