"""Ctrl-C (``KeyboardInterrupt``) or a failure inside ``hotswap_adapter``: the adapter is the old one everywhere (its
tensors, scale format, scaling, form and config) or the new one everywhere, never a mix of both."""

import pytest
import torch
from test_interrupt import logits
from transformers import LlamaConfig, LlamaForSequenceClassification

from _interrupts import ctrl_c_at_each_check, interrupt
from lordba import LoRDBAConfig, get_lordba_model
from lordba.errors import ShapeMismatchError
from lordba.nn.adapter import PackedAdapter, TrainableAdapter
from lordba.nn.model import LoRDBAModel
from lordba.nn.saved import SavedModule

from conftest import TINY, tiny_llama


def visible(lm):
    """``lm`` with its adapter's output scales ×50 (a swap half-done shows in the logits)."""
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.scale_out.mul_(50)
    return lm


@pytest.fixture
def files(tmp_path):
    """Two adapter files of the tiny Llama: ``a`` (float16 scales, scaling 2) and ``b`` (int8 scales, scaling 1)."""
    torch.manual_seed(1)
    visible(get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, alpha=8, init="random"))).save_pretrained(tmp_path / "a")
    torch.manual_seed(2)
    config = LoRDBAConfig(r=4, init="random", scale_dtype="int8")
    visible(get_lordba_model(tiny_llama(0), config)).save_pretrained(tmp_path / "b")
    torch.manual_seed(3)
    config = LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "v_proj"])
    visible(get_lordba_model(tiny_llama(0), config)).save_pretrained(tmp_path / "sub")
    return tmp_path


def model_of(form, files):
    if form == "packed":
        return LoRDBAModel.from_pretrained(tiny_llama(0), files / "a")
    if form == "frozen":  # a trainable load: float32 scales, packed signs
        return LoRDBAModel.from_pretrained(tiny_llama(0), files / "a", is_trainable=True).eval()
    torch.manual_seed(1)  # latent signs: the swap puts another form of each adapter in its layer
    return visible(get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, alpha=8, init="random"))).eval()


def state(lm):
    items = lm.adapter_modules("default").items()
    held = {
        p: (a, a.codec.name, a.scaling, {n: (t.data_ptr(), t.clone()) for n, t in a.state_dict().items()})
        for p, a in items
    }
    return held, lm.peft_config["default"]


def check_unchanged(lm, before):
    held, config = before
    assert lm.peft_config["default"] is config
    for path, adapter in lm.adapter_modules("default").items():
        old, codec, scaling, tensors = held[path]
        assert adapter is old and (adapter.codec.name, adapter.scaling) == (codec, scaling), path
        now = adapter.state_dict()
        assert now.keys() == tensors.keys(), path
        for name, (pointer, value) in tensors.items():  # the same tensors (compiled graphs read them), as they were
            assert now[name].data_ptr() == pointer and torch.equal(now[name], value), f"{path}.{name}"


@pytest.mark.parametrize("form", ["packed", "frozen", "latent"])
@pytest.mark.parametrize("k", range(1, 15))
def test_a_hotswap_interrupted_at_any_layer_keeps_the_old_adapter_and_a_second_one_swaps(
    monkeypatch, files, input_ids, form, k
):
    # Interrupted at layer k, layers 1..k-1 held b's tensors, layer k b's scale format over a's tensors and the
    # rest a's, under a's config (logits 0.03 off a's, a mix of neither); now a's everywhere, bit for bit.
    lm = model_of(form, files)
    want, before = logits(lm, input_ids), state(lm)
    owner = PackedAdapter if form == "packed" else TrainableAdapter
    interrupt(monkeypatch, owner, "load_stored", k)
    with pytest.raises(KeyboardInterrupt):
        lm.hotswap_adapter(files / "b")
    monkeypatch.undo()
    check_unchanged(lm, before)
    assert torch.equal(logits(lm, input_ids), want)
    lm.hotswap_adapter(files / "b")
    assert lm.peft_config["default"].scale_dtype == "int8"
    assert torch.equal(
        logits(lm, input_ids), logits(LoRDBAModel.from_pretrained(tiny_llama(0), files / "b"), input_ids)
    )


@pytest.mark.parametrize("k", [1, 5, 10])
def test_a_hotswap_to_a_subset_interrupted_while_silencing_keeps_the_old_adapter(monkeypatch, files, input_ids, k):
    lm = model_of("packed", files)
    want, before = logits(lm, input_ids), state(lm)
    interrupt(monkeypatch, PackedAdapter, "silence", k)
    with pytest.raises(KeyboardInterrupt):
        lm.hotswap_adapter(files / "sub")
    monkeypatch.undo()
    check_unchanged(lm, before)
    assert torch.equal(logits(lm, input_ids), want)
    lm.hotswap_adapter(files / "sub")
    fresh = LoRDBAModel.from_pretrained(tiny_llama(0), files / "sub")
    assert torch.equal(logits(lm, input_ids), logits(fresh, input_ids))


def test_a_hotswap_failing_at_a_layer_keeps_the_old_adapter(monkeypatch, files, input_ids):
    # Any error half-way (here a layer refusing its tensors), not only Ctrl-C, leaves the model as it was.
    lm = model_of("packed", files)
    want, before = logits(lm, input_ids), state(lm)
    original = PackedAdapter.load_stored
    count = [0]

    def refuse_the_ninth(self, tensors):
        count[0] += 1
        if count[0] == 9:
            raise ShapeMismatchError("refused")
        return original(self, tensors)

    monkeypatch.setattr(PackedAdapter, "load_stored", refuse_the_ninth)
    with pytest.raises(ShapeMismatchError):
        lm.hotswap_adapter(files / "b")
    monkeypatch.undo()
    check_unchanged(lm, before)
    assert torch.equal(logits(lm, input_ids), want)


def seq_cls():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3, pad_token_id=0)).eval()


def test_a_hotswap_interrupted_while_loading_a_module_trained_in_full_keeps_the_old_adapter(monkeypatch, tmp_path):
    # Every layer and the score head's copy had taken the new adapter's tensors when the Ctrl-C came: they kept
    # them under the old config.
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    config = LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS")
    other = get_lordba_model(seq_cls(), config)
    with torch.no_grad():
        other.base_model.score.lordba_saved["default"].weight.mul_(5)
    other.save_pretrained(tmp_path / "other")
    lm = visible(get_lordba_model(seq_cls(), config))
    head = lm.base_model.score.lordba_saved["default"].weight.detach().clone()
    with torch.no_grad():
        want = lm(input_ids=ids).logits
    original = SavedModule.load_saved

    def ctrl_c_after(self, adapter_name, tensors):  # the head written, then the Ctrl-C
        original(self, adapter_name, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(SavedModule, "load_saved", ctrl_c_after)
    with pytest.raises(KeyboardInterrupt):
        lm.hotswap_adapter(tmp_path / "other")
    monkeypatch.undo()
    assert torch.equal(lm.base_model.score.lordba_saved["default"].weight, head)
    assert all(isinstance(a, TrainableAdapter) and a.has_latent_signs for a in lm.adapter_modules("default").values())
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, want)
    lm.hotswap_adapter(tmp_path / "other")
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, other(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["packed", "latent"])
def test_a_second_ctrl_c_while_a_hotswap_is_undone_still_keeps_the_old_adapter(monkeypatch, files, input_ids, form):
    # Interrupted at layer 7, then again at each point of the undoing in turn (a second Ctrl-C, pressed while the
    # first one's undo ran): the undo stopped there, the layers after it kept b's tensors or scale format under a's
    # config (a mix of both adapters, with no error); it now finishes the undo, then raises.
    from lordba.nn import model_load

    owner = PackedAdapter if form == "packed" else TrainableAdapter
    for attempt in ctrl_c_at_each_check({model_load.__file__}, functions={"restore", "<lambda>"}):
        lm = model_of(form, files)
        want, before = logits(lm, input_ids), state(lm)
        interrupt(monkeypatch, owner, "load_stored", 7)
        original = model_load._SwapUndo.restore

        def restore(self, put_back, attempt=attempt, original=original, calls=[]):  # noqa: B006 (one per attempt)
            calls.append(put_back)
            if len(calls) > 1:  # the undo started again
                return original(self, put_back)
            with attempt:  # (the trace stops at the undo's end: every later point of it was tried)
                original(self, put_back)
                attempt.reached()
            if attempt.error is not None:
                raise attempt.error

        monkeypatch.setattr(model_load._SwapUndo, "restore", restore)
        with pytest.raises(KeyboardInterrupt):
            lm.hotswap_adapter(files / "b")
        monkeypatch.undo()
        check_unchanged(lm, before)
        assert torch.equal(logits(lm, input_ids), want), attempt.n
