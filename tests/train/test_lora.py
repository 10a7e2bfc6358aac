"""``train.lora``: a PEFT LoRA on a q4 base, made without touching the process's warning filters."""

import warnings

import pytest

from conftest import tiny_q4


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
    assert seen == [outside]
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    wrapped = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Q4Linear)]
    assert wrapped and all(
        (m.in_features, m.out_features) == (m.base_layer.in_features, m.base_layer.out_features) for m in wrapped
    )
