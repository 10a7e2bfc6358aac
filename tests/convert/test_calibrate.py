"""Calibration statistics (lordba.convert.calibrate) under a Ctrl-C: the user's model is left as it was."""

import contextlib

import torch
from torch import nn

from _interrupts import ctrl_c_at_each_check
from lordba._util import modules
from lordba.convert import calibrate, collect_input_moments


def test_a_ctrl_c_anywhere_while_calibrating_leaves_no_hook_on_the_model():
    """Ctrl-C at each point where Python handles it in ``collect_input_moments`` (its hooks put on and taken off, its
    eval-mode block, torch's ``register_forward_pre_hook`` and the modules' mode changes), its traceback kept (a
    notebook keeps the last one): no calibration hook is left on the model (was:
    one just after ``register_forward_pre_hook`` returned, before its handle was kept, or between two handles'
    ``remove()``, left a hook on the model for good, summing the inputs of every later forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4)).train()
    batches = [torch.randn(2, 4)]
    expected = collect_input_moments(model, batches, ["0", "2"])
    files = {calibrate.__file__, modules.__file__, contextlib.__file__, nn.modules.module.__file__}
    names = {"collect_input_moments", "_remove_hook", "register_forward_pre_hook", "eval_mode", "block", "helper"}
    names |= {"__enter__", "__exit__", "__call__", "done", "_set_training", "eval", "train", "__setattr__"}
    for attempt in ctrl_c_at_each_check(files, functions=names):
        with attempt:
            moments = collect_input_moments(model, batches, ["0", "2"])
            attempt.reached()
            assert all(torch.equal(moments[p], expected[p]) for p in expected)
        hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks]
        assert not hooked, (attempt.n, hooked)  # (attempt.error, its traceback, kept)


def test_another_threads_call_of_the_model_while_calibrating_is_not_counted():
    """A model served in one thread while another collects its calibration moments: the serving call's inputs were
    summed into the moments (the hooks are the model's; 100s in its input made every moment ~4286 where the batches
    alone give ~1), and its mask was taken as the calibration batch's."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    first, second = torch.randn(2, 4), torch.randn(2, 4)
    alone = collect_input_moments(model, [first, second], ["0"])
    between, served = threading.Event(), threading.Event()

    def batches():
        yield first
        between.set()
        assert served.wait(20)
        yield second

    found = {}
    thread = threading.Thread(target=lambda: found.update(collect_input_moments(model, batches(), ["0"])), daemon=True)
    thread.start()
    assert between.wait(20)
    with torch.no_grad():
        model(torch.full((3, 4), 100.0))  # (this thread serving the model meanwhile)
    served.set()
    thread.join(20)
    assert torch.equal(found["0"], alone["0"])
