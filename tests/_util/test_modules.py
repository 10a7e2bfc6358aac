"""The rules about a model's modules in lordba._util.modules."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig

from lordba import LoRDBAConfig, get_lordba_model
from lordba._util.modules import context_positions, own_config

from conftest import tiny_llama


def _with_config(config: object) -> nn.Module:
    module = nn.Module()
    module.config = config
    return module


def test_context_positions_reads_a_multimodal_configs_text_model():
    """gemma-3-4b-it loads (AutoModelForCausalLM) as Gemma3ForConditionalGeneration, whose config keeps the
    context in ``text_config``: it read as none, and ``lordba serve`` took the tokenizer's limit (2048 for
    Gemma 3's, not its 131072 positions) while ``lordba generate`` capped nothing."""
    text = Gemma3TextConfig(max_position_embeddings=512)
    assert context_positions(_with_config(Gemma3Config(text_config=text))) == 512
    assert context_positions(_with_config(LlamaConfig(max_position_embeddings=64))) == 64
    assert context_positions(nn.Linear(1, 1)) is None


def test_own_config_gives_every_module_holding_the_config_or_a_sub_config_the_models_copy():
    """A multimodal model's text modules hold its config's ``text_config``: they get the copy's, not the shared one."""
    shared = Gemma3Config(text_config=Gemma3TextConfig(max_position_embeddings=512))
    model = _with_config(shared)
    model.text = _with_config(shared.text_config)
    model.plain = nn.Linear(1, 1)
    other = _with_config(shared)
    own = own_config(model)
    assert model.config is own and own is not shared and model.text.config is own.text_config
    assert own.text_config is not shared.text_config and own.to_dict() == shared.to_dict()
    assert other.config is shared and not hasattr(model.plain, "config")


def test_the_cache_keyword_and_output_follow_the_models_own_names():
    """transformers 5.25 renamed the KV cache's keyword and output field ``past_key_values`` to ``cache`` (the old
    name warns until 5.40): the serving batch and the ahead-of-time step pass and read whichever the model has."""
    from types import SimpleNamespace

    from lordba._util.modules import cache_keyword, output_cache

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return SimpleNamespace(cache=cache)

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return SimpleNamespace(past_key_values=past_key_values)

    for model in (New(), Old()):
        out = model(None, **{cache_keyword(model): "kv"})
        assert output_cache(out) == "kv"
    assert cache_keyword(New()) == "cache" and cache_keyword(Old()) == "past_key_values"
    model = tiny_llama()
    assert cache_keyword(model) == cache_keyword(get_lordba_model(model, LoRDBAConfig(r=2)))  # the wrapper's forward
    assert cache_keyword(torch.compile(New())) == "cache"  # (a compiled module's forward: (*args, **kwargs))


def _small_model() -> nn.Module:
    """A model whose modules are in both modes, one parameter frozen already."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))).train()
    model[2][1].eval()
    model[0].bias.requires_grad_(False)
    return model


def _traced():
    """The files and functions a Ctrl-C is tried in for the blocks of lordba._util.modules: the blocks' code, their
    put-backs' (lordba._util.interrupts), contextlib's, and the module methods they call (``eval``, ``train``,
    ``__setattr__``)."""
    import contextlib

    from lordba._util import interrupts, modules

    files = {modules.__file__, interrupts.__file__, contextlib.__file__, nn.modules.module.__file__}
    names = {"eval_mode", "frozen_unless_failed", "generation_stopping_only", "block", "helper", "_set_training"}
    names |= {"_shared", "_begin", "_end", "_modes", "_saved_generation_config", "_stopping_only_of", "<lambda>"}
    names |= {"_hold", "_release", "_finish", "_keep", "_trainable", "_freeze"}
    return files, names | {"__init__", "__enter__", "__exit__", "__call__", "done", "eval", "train", "__setattr__"}


@pytest.mark.parametrize("then", [None, 1, 2])
def test_a_ctrl_c_anywhere_in_an_eval_mode_block_puts_every_mode_back(then):
    """Ctrl-C at each point where Python handles it as an ``eval_mode`` block begins or ends, its traceback kept (a
    notebook keeps the last one): every module is in its own mode again (was: one in the loop putting the modes back
    left the modules after it in eval mode for good, dropout off in later training; one in contextlib's
    ``__enter__`` as the block began left the model in eval mode while the traceback lived). ``then``: a second
    Ctrl-C that many points after the first (was: one as the put-back's loop jumped back, after a first it caught,
    was raised outside its ``try`` and left the modules after the first's in eval mode)."""
    from _interrupts import ctrl_c_at_each_check
    from lordba._util.modules import eval_mode

    model = _small_model()
    before = [m.training for m in model.modules()]
    files, names = _traced()
    for attempt in ctrl_c_at_each_check(files, functions=names, then=then):
        with attempt:
            with eval_mode(model):
                assert not any(m.training for m in model.modules())
            attempt.reached()
        assert [m.training for m in model.modules()] == before, attempt.n  # (attempt.error, its traceback, kept)


@pytest.mark.parametrize("then", [None, 1, 2])
def test_a_ctrl_c_anywhere_in_a_frozen_unless_failed_block_gives_the_parameters_back(then):
    """Ctrl-C at each point where Python handles it as a ``frozen_unless_failed`` block begins or ends (the block of
    ``LoRDBAModel(model, config)`` and ``from_pretrained``), its traceback kept: the parameters that were trainable
    are again, unless the block had ended (then all stay frozen, never some) (was: one in the loop freezing them, or
    in the one giving them back, left the rest frozen for good: the caller's model changed by a failed call)."""
    from _interrupts import ctrl_c_at_each_check
    from lordba._util.modules import frozen_unless_failed

    model = _small_model()
    before = [p.requires_grad for p in model.parameters()]
    frozen = [False] * len(before)
    files, names = _traced()
    for attempt in ctrl_c_at_each_check(files, functions=names, then=then):
        ended = False
        with attempt:
            with frozen_unless_failed(model):
                assert not any(p.requires_grad for p in model.parameters())
                ended = True
            attempt.reached()
        now = [p.requires_grad for p in model.parameters()]
        assert now == before or (ended and now == frozen), (attempt.n, now)
        for p, trainable in zip(model.parameters(), before):
            p.requires_grad_(trainable)


@pytest.mark.parametrize("then", [None, 1, 2])
def test_a_ctrl_c_anywhere_in_a_generation_stopping_only_block_puts_the_config_back(then):
    """Ctrl-C at each point where Python handles it as a ``generation_stopping_only`` block begins or ends (``lordba``
    evaluation's generation), its traceback kept: the model has its own generation config again (was: one just after
    the stopping-only config was set, before the ``try``, left it for good: the model's sampling settings lost)."""
    from transformers import GenerationConfig

    from _interrupts import ctrl_c_at_each_check
    from lordba._util.modules import generation_stopping_only

    model = _small_model()
    own = model.generation_config = GenerationConfig(repetition_penalty=1.3, eos_token_id=2)
    files, names = _traced()
    for attempt in ctrl_c_at_each_check(files, functions=names, then=then):
        with attempt:
            with generation_stopping_only(model):
                assert model.generation_config is not own and model.generation_config.repetition_penalty is None
            attempt.reached()
        assert model.generation_config is own, attempt.n  # (attempt.error, its traceback, kept)


def test_eval_mode_blocks_overlapping_in_two_threads_put_the_modes_back_when_the_last_ends():
    """An evaluation in each of two threads on one training model, the first to begin ending first: the other's went on
    in eval mode, and after both every module is in its own mode again (was: each block saved and put back on its own,
    so the first's end put the training modes back under the other's evaluation (dropout on), and the other, which had
    saved the eval modes, left the model in eval mode for good)."""
    from _interrupts import held_by_another_thread
    from lordba._util.modules import eval_mode

    model = _small_model()
    before = [m.training for m in model.modules()]
    first = eval_mode(model)
    first.__enter__()
    with held_by_another_thread(lambda: eval_mode(model)):
        first.__exit__(None, None, None)
        assert not any(m.training for m in model.modules())  # (the other thread's block is still open)
    assert [m.training for m in model.modules()] == before


def test_generation_stopping_only_blocks_overlapping_in_two_threads_put_the_models_config_back():
    """Two threads each generating answers for an evaluation on one model, the first to begin ending first: the
    other's block kept the stopping-only config, and after both the model has its own again (was: the second saved
    the first's stopping-only config and put it back last: the model's repetition penalty and sampling settings lost
    for good)."""
    from transformers import GenerationConfig

    from _interrupts import held_by_another_thread
    from lordba._util.modules import generation_stopping_only

    model = _small_model()
    own = model.generation_config = GenerationConfig(repetition_penalty=1.3, eos_token_id=2)
    first = generation_stopping_only(model)
    first.__enter__()
    with held_by_another_thread(lambda: generation_stopping_only(model)):
        first.__exit__(None, None, None)
        assert model.generation_config.repetition_penalty is None and model.generation_config.eos_token_id == 2
    assert model.generation_config is own


def test_a_failed_frozen_unless_failed_block_leaves_frozen_what_another_threads_block_built_on_meanwhile():
    """Two threads wrapping one base at once, the first refused after the second's block began and succeeded: the
    base stays frozen under the second's wrapper (was: the first gave back every parameter it had frozen, the
    second's LoRDBAModel then trained the base's weights too), and a block failing alone still gives them back."""
    from _interrupts import held_by_another_thread
    from lordba._util.modules import frozen_unless_failed

    model = _small_model()
    before = [p.requires_grad for p in model.parameters()]
    first = frozen_unless_failed(model)
    first.__enter__()
    with held_by_another_thread(lambda: frozen_unless_failed(model)):  # (ends well as this one is still open)
        pass
    assert first.__exit__(ValueError, ValueError("refused"), None) is False
    assert not any(p.requires_grad for p in model.parameters())
    with contextlib.suppress(ValueError), frozen_unless_failed(model):  # (alone, refused: given back)
        raise ValueError
    assert not any(p.requires_grad for p in model.parameters())  # (none was trainable as it began)
    for p, trainable in zip(model.parameters(), before):
        p.requires_grad_(trainable)
    with contextlib.suppress(ValueError), frozen_unless_failed(model):
        with frozen_unless_failed(model):  # (a block inside in the same thread: LoRDBAModel() in from_pretrained's)
            pass
        raise ValueError
    assert [p.requires_grad for p in model.parameters()] == before
