"""Ctrl-C (``KeyboardInterrupt``) as a model call or a ``disable_adapter`` block begins or ends, its traceback kept (a
notebook keeps the last one): the model's gate and lock are free, the thread is in no block and no model call's token
(``fastpath.armed``) is left published."""

import contextlib
import threading

import pytest
import torch

from _interrupts import ctrl_c_at_each_check
from lordba import LoRDBAConfig, get_lordba_model
from lordba._util import interrupts
from lordba.nn import fastpath, lock, model, routing
from lordba.nn.fastpath import ARMED
from lordba.nn.routing import in_disable_block

from conftest import tiny_llama

FILES = {contextlib.__file__, threading.__file__, model.__file__, lock.__file__, routing.__file__, fastpath.__file__}
FILES |= {interrupts.__file__}  # (the lock's and the gate's context managers: GeneratorBlock)
IDS = torch.tensor([[5, 17, 3]])


@pytest.fixture
def lm():
    torch.manual_seed(3)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    lm.pack()  # (the inference form: a call with gradients off keeps the layers' one-op calls, fastpath.decode_call)
    return lm


def check_free(lm, n):
    """The model is as before the interrupted call: nothing holds its gate or lock, this thread is in no block and no
    call's token is published, this thread may change adapters and another thread's merge does not wait."""
    gate, rw = lm._gate, lm._lock
    state = (gate._holders, gate.routing, gate._blocks, rw._readers, rw._writer, getattr(rw._local, "depth", 0))
    assert state == ({}, None, 0, 0, None, 0), (n, state)
    assert not in_disable_block(gate), n  # (else this thread's calls ran the base alone)
    assert ARMED.token is None, n
    with torch.no_grad():  # (a token left: the layers of the base model called directly took their kept calls)
        lm(input_ids=IDS)  # (kept calls made under the token of a call like the interrupted one)
        with lm.disable_adapter():
            direct, base = lm.get_base_model()(input_ids=IDS).logits, lm(input_ids=IDS).logits
    assert torch.equal(direct, base), (n, "the base model called in a disable_adapter block added the adapter")
    lm.set_adapter("default")  # (raised AdapterStateError: "from inside a forward call")
    done = threading.Event()

    def merge():
        lm.merge_adapter()
        lm.unmerge_adapter()
        done.set()

    other = threading.Thread(target=merge, daemon=True)
    other.start()
    assert done.wait(10), (n, "another thread's merge_adapter waited")
    other.join(10)


@pytest.mark.parametrize("how", ["call", "call with names", "disable_adapter"])
def test_a_ctrl_c_anywhere_as_a_call_or_block_begins_leaves_the_model_free(lm, how):
    """Ctrl-C at each point where Python handles it as a model call (``_calling``, run by every forward and
    generate) or a ``disable_adapter`` block begins, up to the block's first line, its traceback kept: the model is
    free (was: one in contextlib's ``__enter__`` as the generator yielded left it suspended in the gate and the read
    lock: this thread's set_adapter raised AdapterStateError and another thread's merge_adapter waited while the
    traceback lived; one there or just after the block was recorded in the thread's context left the thread in the
    block: its later calls ran the base alone)."""
    for attempt in ctrl_c_at_each_check(FILES):
        if how == "disable_adapter":
            cm = lm.disable_adapter()
        else:
            cm = lm._calling(["default"] if how.endswith("names") else None)
        with attempt, torch.no_grad(), cm:  # (gradients off: the call is armed)
            attempt.reached()
        cm = None
        check_free(lm, attempt.n)  # (attempt.error, its traceback, kept)


@pytest.mark.parametrize("how", ["call", "disable_adapter"])
def test_a_ctrl_c_anywhere_as_a_call_or_block_ends_leaves_the_model_free(lm, how):
    """Ctrl-C at each point where Python handles it as a model call or a ``disable_adapter`` block ends, its
    traceback kept: the model is free (was: one as the gate's, the read lock's or ``armed``'s block inside the call's
    ended, at the start of that block's ``__exit__``, kept the gate, a reader or the call's token while the traceback
    lived: another thread's call or merge waited, this thread's set_adapter raised AdapterStateError; and one as the
    call's own block's exit began, Python code whose frame the traceback kept, held the call's generator suspended
    in the gate and the read lock)."""
    for attempt in ctrl_c_at_each_check(FILES):
        cm = lm.disable_adapter() if how == "disable_adapter" else lm._calling(None)
        with torch.no_grad():  # (gradients off: the call is armed)
            cm.__enter__()
            with attempt:
                cm.__exit__(None, None, None)
                attempt.reached()
        cm = None
        check_free(lm, attempt.n)  # (attempt.error, its traceback, kept)


WRITES = {
    "set_adapter": lambda lm, folder: lm.set_adapter("default"),
    "load_adapter": lambda lm, folder: lm.load_adapter(folder, "other"),
    "hotswap_adapter": lambda lm, folder: lm.hotswap_adapter(folder, "default"),
    "delete_adapter": lambda lm, folder: lm.delete_adapter("default"),
    "merge_adapter": lambda lm, folder: lm.merge_adapter(),
}


@pytest.mark.parametrize("call", sorted(WRITES))
def test_a_ctrl_c_as_any_block_of_a_change_of_adapters_ends_leaves_the_model_free(tmp_path, call):
    """Ctrl-C at each point where Python handles it in the blocks' own ends (``GeneratorBlock``'s exit: the write
    lock's, the read lock's, eval mode's) inside a call that changes adapters, its traceback kept (a notebook keeps
    the last one): nothing holds the model's gate or lock, and another thread's call and change do not wait (was:
    one as the write lock's block's ``__exit__`` began, Python code whose frame the traceback kept, kept the lock's
    generator suspended, the lock held: every model call and change of any other thread waited for ever)."""
    torch.manual_seed(3)
    folder = tmp_path / "saved"
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random")).save_pretrained(folder)
    for attempt in ctrl_c_at_each_check({interrupts.__file__}, functions={"__exit__", "_finish"}):
        torch.manual_seed(3)
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
        with attempt:
            WRITES[call](lm, folder)
            attempt.reached()
        gate, rw = lm._gate, lm._lock
        state = (gate._holders, gate.routing, rw._readers, rw._writer, getattr(rw._local, "depth", 0))
        assert state == ({}, None, 0, None, 0), (attempt.n, state)  # (attempt.error, its traceback, kept)
        done = threading.Event()

        def other(lm=lm, done=done):
            with torch.no_grad():
                lm(input_ids=IDS)
            with lm._lock.write():
                done.set()

        threading.Thread(target=other, daemon=True).start()
        assert done.wait(10), (attempt.n, "another thread's model call or change waited")
