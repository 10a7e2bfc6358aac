"""``lordba.nn.aot_step``: building a compiled step's static-cache wrapper never writes the model's generation config,
which another thread's ``generate`` (or another model sharing the config) reads meanwhile."""

import threading

import pytest
import torch
import transformers.integrations.executorch as executorch

from lordba.nn.aot_step import CompiledStep

from conftest import tiny_llama


class _Stop(Exception):
    """Ends the step's construction once its wrapper is built (nothing is exported)."""


def test_another_threads_generate_while_a_step_is_built_keeps_the_models_dynamic_cache(monkeypatch):
    """The wrapper was built with the model's generation config set to the static cache and put back after: another
    thread's ``generate`` meanwhile made a StaticCache, and two decoders building at once left it set for good."""
    model, other = tiny_llama(), tiny_llama()
    other.generation_config = model.generation_config  # one config object, two models
    built, go, seen = threading.Event(), threading.Event(), []

    class Waiting(executorch.TorchExportableModuleForDecoderOnlyLM):
        def __init__(self, wrapped, **kwargs):
            super().__init__(wrapped, **kwargs)
            seen.append((wrapped.generation_config.use_cache, wrapped.generation_config.cache_implementation))
            built.set()
            go.wait(10)
            raise _Stop

    def build():
        with pytest.raises(_Stop):
            CompiledStep(model, 16, None, print, torch.float32)

    monkeypatch.setattr(executorch, "TorchExportableModuleForDecoderOnlyLM", Waiting)
    thread = threading.Thread(target=build)
    thread.start()
    try:
        assert built.wait(10)
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            out = other.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
        during = model.generation_config.cache_implementation
    finally:
        go.set()
        thread.join(10)
    assert seen == [(True, "static")]  # what the exporter asks for, on its own copy
    assert during is None and type(out.past_key_values).__name__ == "DynamicCache"
    assert model.generation_config.cache_implementation is None and other.generation_config is model.generation_config
