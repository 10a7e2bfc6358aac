"""``train.lora``: a PEFT LoRA on a q4 base, made without touching the process's warning filters."""

import warnings

import pytest

from conftest import tiny_llama, tiny_q4


def test_a_lora_on_a_q4_base_neither_warns_nor_swaps_the_warning_filters(monkeypatch):
    """PEFT warned "Unsupported layer type" for each q4 layer, which lordba silenced with ``warnings.catch_warnings``
    around ``get_peft_model``: the process's one filter list swapped, so another thread's warnings matching it were
    lost meanwhile and a filter it added was dropped (or this one's kept). The q4 layers' LoRA layer reads their
    features itself: PEFT has nothing to warn about, and the filters stay as they are."""
    peft = pytest.importorskip("peft")
    from lordba.quant.q4 import Q4Linear
    from lordba.train.lora import add_lora

    seen = []
    make = peft.get_peft_model

    def watched(*args, **kwargs):
        seen.append(list(warnings.filters))
        return make(*args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", watched)
    base = tiny_q4(adapter=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outside = list(warnings.filters)
        model = add_lora(base, 4, 8.0, None)
    from lordba.train._peft_q4 import reads_features

    if reads_features():  # (PEFT 0.19 on: an earlier one warns itself, silenced with catch_warnings as before)
        assert seen == [outside]
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    wrapped = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Q4Linear)]
    assert wrapped and all(
        (m.in_features, m.out_features) == (m.base_layer.in_features, m.base_layer.out_features) for m in wrapped
    )


def test_a_lora_on_a_q4_base_made_with_a_peft_that_warns_about_q4_layers_itself_still_does_not_warn(monkeypatch):
    """PEFT before 0.19 (``peft>=0.14`` is supported) reads a custom layer's features itself, never asking the LoRA
    layer (``LoraLayer._get_in_out_features`` does not exist), and warns "Unsupported layer type ... proceed at your
    own risk" for each q4 layer: once the warning was no longer silenced, every q4 LoRA (qat-from-lora) warned there.
    Simulated: PEFT's method taken away, and the q4 layer's features read with that PEFT's warning."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import LoraLayer

    from lordba.train._peft_q4 import Q4LoraLinear
    from lordba.train.lora import add_lora

    def old_peft(self, module):
        warnings.warn(
            f"Unsupported layer type '{type(module)}' encountered, proceed at your own risk.", UserWarning, stacklevel=2
        )
        return module.in_features, module.out_features

    monkeypatch.delattr(LoraLayer, "_get_in_out_features")
    monkeypatch.setattr(Q4LoraLinear, "_get_in_out_features", old_peft)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = add_lora(tiny_q4(adapter=False), 4, 8.0, None)
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    assert isinstance(model, peft.PeftModel)


def test_a_lora_on_an_hqq_base_does_not_warn_and_starts_as_the_base():
    """PEFT knows HQQ's layer by its class name (``HQQLinear``) and warned "Unsupported layer type
    '<class 'lordba.quant.hqq.LordbaHQQLinear'>' encountered, proceed at your own risk" for each of lordba's HQQ
    layers (a new user's first ``lordba demo`` printed it). They are wrapped by PEFT's HQQ LoRA layer reading their
    features itself: no warning, the features right, and the model's output at B = 0 the base's."""
    pytest.importorskip("hqq")
    import torch
    from peft.tuners.lora.hqq import HqqLoraLinear

    from lordba.quant import quantize_model
    from lordba.quant.hqq import LordbaHQQLinear
    from lordba.train._peft_q4 import reads_features
    from lordba.train.lora import add_lora

    base = quantize_model(tiny_llama(0), backend="hqq", group_size=8)
    ids = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        want = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = add_lora(base, 4, 8.0, None)
    if reads_features():
        assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    wrapped = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), LordbaHQQLinear)]
    assert len(wrapped) == 14 and all(isinstance(m, HqqLoraLinear) for m in wrapped)  # 2 layers x 7
    assert all(
        (m.in_features, m.out_features) == (m.base_layer.in_features, m.base_layer.out_features) for m in wrapped
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
