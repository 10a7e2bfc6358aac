"""The base ``lordba generate`` / ``chat`` and ``lordba serve`` load (:func:`lordba.quant.pretrained.load_base`, one
loader for both): the same model, frozen, for each ``--quant``."""

import pytest
import torch

from lordba.quant.pretrained import load_base


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    """The CPU kernels of the usual cache, where a test moves it (``LORDBA_CACHE``): never built again."""
    from lordba import kernels
    from lordba.kernels.cpu import cache_root

    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(cache_root()))
    kernels.cpu_available()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_model import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("quant", ["none", "q4"])
def test_generate_and_serve_load_the_same_frozen_base(folder, tmp_path, monkeypatch, quant):
    """One loader: the model ``lordba generate`` runs on is the one ``lordba serve`` wraps, in eval mode and frozen
    (unquantized too, as ``quantize_model``'s ``none`` leaves it), with the same tokenizer."""
    from lordba.serve.server import load_base as serve_base

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_base(folder, quant=quant, group_size=32)
    served, served_tokenizer = serve_base(folder, quant=quant, group_size=32)
    assert [n for n, p in served.named_parameters() if p.requires_grad] == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert not model.training and not served.base_model.training
    assert served_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, served(input_ids=ids).logits)


def test_a_folder_it_cannot_load_says_so_as_both_commands_did(tmp_path):
    from lordba.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--model .*: not a transformers model folder \(no config.json\)"):
        load_base(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"--model .*: transformers cannot load it"):
        load_base(tmp_path)
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        load_base(tmp_path, dtype="float8")


def test_an_unknown_quantization_is_refused_before_the_float_model_is_read(folder, monkeypatch):
    """The library loader read the whole float model, then let ``quantize_model`` refuse the name (the CLI checks
    it first; a library caller paid the load, seconds to minutes on a large model)."""
    import transformers

    from lordba.errors import ConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("the float model was read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ConfigError, match=r"quantization backend must be one of .* got 'q3'"):
        load_base(folder, quant="q3")
