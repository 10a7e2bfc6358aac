"""``lordba.nn.fastpath.decode_call`` (eager) and ``fused_direct`` (compiled): on a q4 base one active
packed adapter runs as one op call per layer (``lordba::q4_branch``), bit for bit the base layer's and
the branch's two calls — eager, with a bias, at every token count, under ``torch.compile`` — except
``fast`` prefill, where the branch joins the bfloat16 GEMM (as accurate, not bit for bit); anything the
fused call would skip (hooks, a gradient, a second adapter, routing) takes the ordinary path."""

import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lordba import LoRDBAConfig, kernels
from lordba.kernels.q4 import amx_prefill_available, native_bfloat16
from lordba.nn import fastpath, layer
from lordba.quant import q4 as q4_module
from lordba.quant import set_compute
from lordba.quant.q4 import Q4Linear

from conftest import tiny_q4

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="compiled CPU kernels unavailable")
IDS = torch.tensor([[5, 17, 3, 44, 9, 21, 60, 2, 11, 30, 7, 19, 40, 8, 1, 33, 12]])


def _fused(call) -> bool:
    return getattr(call, "__qualname__", "").startswith("Q4Linear.forward_with_branch")


@pytest.fixture
def count(monkeypatch):
    """For every eager layer call: whether it ran as the kept fused op (``decode_call``)."""
    calls = []
    real = fastpath.decode_call

    def counted(*args):
        out = real(*args)
        calls.append(_fused(out))
        return out

    monkeypatch.setattr(layer, "decode_call", counted)
    return calls


def _two_calls(m):
    """The ordinary path: the base layer, then the adapter's branch (the reference of the fused op)."""
    m.setattr(layer, "decode_call", lambda *a: None)
    m.setattr(layer, "fused_direct", lambda *a: None)
    m.setattr(layer, "ARMED", types.SimpleNamespace(token=None))  # no kept call taken again either


def unfused(model, ids, monkeypatch):
    with monkeypatch.context() as m:
        _two_calls(m)
        return model(input_ids=ids).logits


def _bit_for_bit_cases():
    """Every (kernel mode, compute, tokens) but ``fast`` prefill on the unpack path (the branch joins the
    bfloat16 GEMM there: :func:`test_fast_prefill_joins_the_gemm_as_accurately`)."""
    for kernel_mode in ("auto", "sign", "unpack"):
        for compute in ("exact", "fast"):
            for tokens in (1, 3, 17):
                if not (compute == "fast" and tokens == 17 and kernel_mode != "sign" and native_bfloat16()):
                    yield kernel_mode, compute, tokens


@pytest.mark.parametrize(("kernel_mode", "compute", "tokens"), list(_bit_for_bit_cases()))
def test_the_fused_call_equals_the_two_calls_bit_for_bit(kernel_mode, compute, tokens, count, monkeypatch):
    """Both branch paths: the sign path (decode) and the unpack path (many tokens; the fused call adds
    into the q4 layer's fresh output, the two calls into a new tensor)."""
    lm = tiny_q4(adapter=True, compute=compute)
    ids = IDS[:, :tokens]
    with torch.no_grad(), kernels.mode(kernel_mode):
        got = lm(input_ids=ids).logits
        assert count and all(count)  # every adapted layer fused
        want = unfused(lm, ids, monkeypatch)
    assert torch.equal(got, want)
    with torch.no_grad(), kernels.mode(kernel_mode), lm.disable_adapter():  # disabled: no branch, the base alone
        assert not torch.equal(lm(input_ids=ids).logits, got)


@pytest.mark.skipif(not native_bfloat16(), reason="the bfloat16 GEMM needs native bfloat16 dot products")
@pytest.mark.parametrize("kernel_mode", ["auto", "unpack"])
def test_fast_prefill_joins_the_gemm_as_accurately(kernel_mode, count, monkeypatch):
    """``fast`` with many tokens: the fused call puts the branch into the q4 layer's bfloat16 GEMM (r more
    inputs; not bit for bit the two calls, whose branch is a float32 GEMM after it), and its logits are as
    close to the float32 (``exact``) model's as the two calls' are — for a branch of a trained adapter's
    size, a fraction of the base output (the random test adapters' branches are 6-10 times the base
    output; there bfloat16's 2^-9 of the branch itself shows)."""
    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(3)
    lm = get_lordba_model(tiny_q4(adapter=False, compute="fast"), LoRDBAConfig(r=4, init="random"))
    for a in lm.adapter_modules("default").values():
        with torch.no_grad():
            a.scale_out.mul_(0.03)  # branch ~ 0.2-0.3 x the base output
    lm.pack()
    lm.eval()
    with torch.no_grad(), kernels.mode(kernel_mode):
        got = lm(input_ids=IDS).logits
        assert count and all(count)
        two = unfused(lm, IDS, monkeypatch)
        set_compute(lm, "exact")
        want = lm(input_ids=IDS).logits
    err, err_two = ((t - want).norm() / want.norm() for t in (got, two))
    assert not torch.equal(got, two) and err < 1.5 * err_two + 1e-4, (err, err_two)


@pytest.mark.skipif(not native_bfloat16(), reason="the bfloat16 GEMM needs native bfloat16 dot products")
def test_fast_prefill_keeps_the_folded_factors_until_an_adapter_tensor_changes(monkeypatch):
    """A prompt on the bfloat16 GEMM folds each layer's factors once (``lordba::q4_prefill_factors``) and
    keeps them for the next prompts; a tensor of an adapter changed in place refolds that layer's (its
    version counter, shared by the adapter's views of one buffer), with the result a fresh model computes;
    decode (one token) never folds."""
    import copy

    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(4)
    lm = get_lordba_model(tiny_q4(adapter=False, compute="fast"), LoRDBAConfig(r=4, init="random"))
    lm.pack()
    lm.eval()
    real, folds = torch.ops.lordba.q4_prefill_factors, []

    def counted(*args):
        folds.append(args[0])
        return real(*args)

    monkeypatch.setattr(torch.ops.lordba, "q4_prefill_factors", counted)
    adapters = list(lm.adapter_modules("default").values())
    with torch.no_grad():
        first = lm(input_ids=IDS).logits
        assert len(folds) == len(adapters)  # one fold per adapted layer
        assert torch.equal(lm(input_ids=IDS).logits, first) and len(folds) == len(adapters)  # kept
        lm(input_ids=IDS[:, :1])
        assert len(folds) == len(adapters)  # one token: the sign path, nothing folded
        sign_B = adapters[0]._buffers["sign_B"]
        sign_B.bitwise_not_()  # in place: the layer's kept call reads the same tensor
        changed = lm(input_ids=IDS).logits
        # the adapter's tensors are views of one buffer (a loaded file's, or pack()'s) sharing one version
        # counter: every layer of it refolds exactly once, the changed one among them
        refolded = folds[len(adapters) :]
        assert any(f is adapters[0]._buffers["sign_A"] for f in refolded) and len(refolded) == len(adapters)
        assert not torch.equal(changed, first)
        assert torch.equal(copy.deepcopy(lm)(input_ids=IDS).logits, changed)


def test_an_adapter_loaded_under_inference_mode_keeps_its_prompt_factors(tmp_path, monkeypatch):
    """A model quantized and given its adapter under ``torch.inference_mode`` holds ordinary tensors
    (``ordinary_tensors``), so its layers fold their prompt factors once and keep them, as a model loaded
    normally does, with the same result, on q4 (``fast``) and on a float32 base (``fast`` branch compute: folded
    factors on the tile unit only, AMX; elsewhere it computes as ``exact``, nothing folded).
    (Inference tensors have no version counter; the factors were folded again at every prompt.)"""
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.nn.model import LoRDBAModel

    from conftest import tiny_llama

    real, folds = torch.ops.lordba.q4_prefill_factors, []
    monkeypatch.setattr(torch.ops.lordba, "q4_prefill_factors", lambda *a: folds.append(1) or real(*a))
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    bases = (
        (lambda: tiny_q4(adapter=False, compute="fast"), native_bfloat16()),  # (fast: the bfloat16 GEMM where native)
        (lambda: tiny_llama(0), amx_prefill_available()),
    )
    for make, folding in bases:
        torch.manual_seed(3)
        get_lordba_model(make(), LoRDBAConfig(r=4, init="random")).save_pretrained(tmp_path / "a")
        with kernels.with_branch_compute("fast"):
            with torch.no_grad():
                want = LoRDBAModel.from_pretrained(make(), tmp_path / "a").eval()(input_ids=ids).logits
            with torch.inference_mode():
                model = LoRDBAModel.from_pretrained(make(), tmp_path / "a").eval()
                adapters = list(model.adapter_modules("default").values())
                assert not any(t.is_inference() for a in adapters for t in a.buffers())
                folds.clear()
                got = model(input_ids=ids).logits
                assert len(folds) == len(adapters) * folding  # one fold per adapted layer
                assert torch.equal(model(input_ids=ids).logits, got) and len(folds) == len(adapters) * folding  # kept
        assert torch.equal(got, want)


def test_inference_tensors_are_folded_at_every_call():
    """``kept_factors`` keeps factors by the tensors' version counters; an inference tensor has none (a user's
    own tensor set into an adapter under inference mode), so for it the factors are made again each call."""
    from lordba.quant.backend import kept_factors

    kept, made = [], []
    ordinary = (torch.ones(3),)
    for _ in range(2):
        kept_factors(kept, ordinary, lambda: made.append(1) or (torch.zeros(1),))
    assert made == [1]
    with torch.inference_mode():
        inference = (torch.ones(3),)
    kept.clear()
    for _ in range(2):
        kept_factors(kept, inference, lambda: made.append(2) or (torch.zeros(1),))
    assert made == [1, 2, 2]


def test_a_base_bias_is_added_before_the_branch_as_the_two_calls_do(monkeypatch):
    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(Q4Linear.from_weight(torch.randn(48, 96), torch.randn(48), group_size=32))
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random", target_modules=["0"])).eval()
    lm.pack()
    x = torch.randn(2, 96)
    with torch.no_grad():
        got = lm(x)
        with monkeypatch.context() as m:
            _two_calls(m)
            want = lm(x)
    assert torch.equal(got, want)


def test_hooks_and_gradient_mode_take_the_ordinary_path(count):
    """A hook on the base layer runs (that layer is not fused); with gradients on nothing is fused (the
    fused op has no backward: the input and a trainable base bias keep their gradients)."""
    lm = tiny_q4(adapter=True)
    q = lm.get_base_model().model.layers[0].self_attn.q_proj
    seen = []
    handle = q.base_layer.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        lm(input_ids=IDS[:, :2])
    handle.remove()
    assert seen == [1]  # the base layer's hook ran: that layer was not fused
    x = torch.randn(1, 2, q.in_features, requires_grad=True)
    count.clear()
    q(x).sum().backward()  # a gradient to x: the two calls, differentiable
    assert x.grad is not None and count == [False]
    q.base_layer.bias = torch.nn.Parameter(torch.zeros(q.out_features))
    q(x.detach()).sum().backward()
    assert q.base_layer.bias.grad is not None and count == [False, False]
    with torch.no_grad():
        q(x.detach())
    assert count == [False, False, True]


def test_compiled_decode_graph_calls_the_fused_op():
    """Under torch.compile the fused call is built in the trace (no caches) and gives the eager logits."""
    lm = tiny_q4(adapter=True)
    ids = IDS[:, :1]
    counter = CompileCounterWithBackend("aot_eager")  # keeps the graphs it was given
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = lm(input_ids=ids).logits
            got = torch.compile(lm, backend=counter)(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("q4_branch" in o for o in ops), sorted(ops)[:20]


@pytest.mark.parametrize("bound", ["op", "callable", None], ids=["bound-op", "bound-callable", "python"])
def test_a_layer_takes_its_kept_call_again_only_while_nothing_changed(count, monkeypatch, bound):
    """Within a model call with gradients off (``fastpath.armed``), a layer that has taken its kept call takes it
    again without ``decode_call``'s checks; whatever changes its result defeats that: another adapter, a scaling,
    the kernel mode, a disabled adapter, a hook on the base layer, gradients on. Each result equals the two-call
    path's bit for bit — with the checks and the call bound in C++ (``kernels.bound_calls``) and without."""
    if bound is None:
        monkeypatch.setattr(kernels, "bound_calls", lambda: None)
        monkeypatch.setattr(q4_module, "bound_calls", lambda: None)
    elif kernels.bound_calls() is None:
        pytest.skip("bound calls unavailable")
    elif bound == "callable":  # the checks in C++, then the Python call (a base without a bound op: HQQ)
        monkeypatch.setattr(q4_module.Q4Backend, "bound_branch", lambda *a: None)
    lm = tiny_q4(adapter=True)
    lm.eval()
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    lm.pack()

    def reference():
        with monkeypatch.context() as m:
            _two_calls(m)
            return lm(input_ids=IDS).logits

    with torch.no_grad():
        first = lm(input_ids=IDS).logits
        checked = len(count)
        assert torch.equal(lm(input_ids=IDS).logits, first) and len(count) == checked  # taken again, no checks
        assert torch.equal(first, reference())
        lm(input_ids=IDS)  # kept calls taken again under the present state
        seen = []
        base = lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        handle = base.register_forward_hook(lambda *a: seen.append(1))
        lm(input_ids=IDS)
        handle.remove()
        assert seen == [1]
        lm.set_adapter("b")
        assert torch.equal(lm(input_ids=IDS).logits, reference()) and not torch.equal(reference(), first)
        lm(input_ids=IDS)  # and a change within a call (a hook between blocks): the later layers see it
        blocks = lm.get_base_model().model.layers
        later = [a for n, a in lm.adapter_modules("b").items() if ".layers.1." in n]

        def double(*_):
            for a in later:
                a.scaling = a.scaling * 2

        handle = blocks[0].register_forward_hook(double)
        got = lm(input_ids=IDS).logits
        for a in later:
            a.scaling = a.scaling / 2
        want = reference()
        handle.remove()
        for a in later:
            a.scaling = a.scaling / 2
        assert torch.equal(got, want)
        for a in lm.adapter_modules("b").values():
            a.scaling = a.scaling * 2
        assert torch.equal(lm(input_ids=IDS).logits, reference())
        with kernels.mode("unpack"):
            assert torch.equal(lm(input_ids=IDS).logits, reference())
        with lm.disable_adapter():
            assert torch.equal(lm(input_ids=IDS).logits, reference())
        lm(input_ids=IDS)  # kept calls taken again under the present state, then gradients on
    embeds = lm.get_base_model().get_input_embeddings()(IDS).detach().requires_grad_()
    lm(inputs_embeds=embeds).logits.sum().backward()  # gradients on: the ordinary path, which has a backward
    want = embeds.detach().clone().requires_grad_()
    with monkeypatch.context() as m:
        _two_calls(m)
        lm(inputs_embeds=want).logits.sum().backward()
    assert embeds.grad is not None and torch.equal(embeds.grad, want.grad)


def test_generate_takes_the_kept_calls_with_gradients_on_at_the_call(monkeypatch):
    """transformers' generate runs under no_grad, but it was entered after the model call was armed: called
    with gradients on (as most scripts do), generation never took the kept decode calls. The tokens are
    those of a generate under no_grad."""
    from lordba.nn.fastpath import ARMED

    from conftest import tiny_q4

    lm = tiny_q4(adapter=True)
    ids = torch.tensor([[5, 17, 3, 44, 9]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = lm.generate(input_ids=ids, **kwargs)
    seen, real = [], lm.base_model.generate
    monkeypatch.setattr(lm.base_model, "generate", lambda *a, **k: (seen.append(ARMED.token), real(*a, **k))[1])
    assert torch.is_grad_enabled()
    assert torch.equal(lm.generate(input_ids=ids, **kwargs), want) and seen[0] is not None


@pytest.mark.parametrize("grad", [True, False])
def test_a_hook_set_on_the_adapter_after_its_direct_call_was_kept_runs(grad):
    """The branch's kept direct call (``fastpath.direct_branch``: gradients on for an input that needs none, as in
    an eval forward without ``no_grad``) checked the adapter's hooks only when it was built: a forward hook set on
    the adapter after the first call never ran (and an output it replaced was silently not replaced), in that mode
    and, once kept, under ``no_grad`` too (the whole-layer call declines for the hook, then the kept one ran)."""
    from torch import nn as tnn

    from nn.test_layer import make_layer

    lordba_layer = make_layer(names=("a",))
    lordba_layer.add_adapter("a", lordba_layer.lordba_adapters["a"].pack())
    lordba_layer.set_adapter("a")
    for p in lordba_layer.base_layer.parameters():
        p.requires_grad_(False)
    assert isinstance(lordba_layer.base_layer, tnn.Linear)
    x = torch.randn(2, lordba_layer.in_features)
    plain = lordba_layer(x)  # gradients on, nothing needs one: the direct call is built and kept
    seen = []
    handle = lordba_layer.lordba_adapters["a"].register_forward_hook(lambda m, i, out: seen.append(1) or out * 2)
    with torch.set_grad_enabled(grad):
        hooked = lordba_layer(x)
    handle.remove()
    assert seen == [1]
    torch.testing.assert_close(hooked, 2 * plain, rtol=0, atol=0)  # the adapter's output is base + branch
    torch.testing.assert_close(lordba_layer(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_a_mixed_batch_runs_the_hooks_of_its_adapters_in_every_kernel_mode(mode):
    """A forward hook on an adapter runs in a mixed batch (rows routed to different adapters) as it does in a
    uniform one and in the ``torch`` mode: the batched op (``routed_branches``) ran the adapters' kernels
    without their hooks, so with a hook that changes the output ``auto`` and ``torch`` gave different rows."""
    from nn.test_layer import make_layer

    lordba_layer = make_layer(names=("a", "b"))
    for name in ("a", "b"):
        lordba_layer.add_adapter(name, lordba_layer.lordba_adapters[name].pack())
    x = torch.randn(3, lordba_layer.in_features)
    names = ["a", "b", "a"]
    with torch.no_grad(), kernels.mode(mode):
        base = lordba_layer.base_layer(x)
        plain = lordba_layer._mixed_batch_forward(x, base, names)  # the composition's call is kept
        seen = []
        handle = lordba_layer.lordba_adapters["a"].register_forward_hook(lambda m, i, out: seen.append(1) or out * 0)
        hooked = lordba_layer._mixed_batch_forward(x, base, names)
        handle.remove()
        assert seen == [1]
        torch.testing.assert_close(hooked[[0, 2]], base[[0, 2]], rtol=0, atol=0)  # the hook zeroed a's branch
        torch.testing.assert_close(hooked[1], plain[1], rtol=0, atol=0)
        torch.testing.assert_close(lordba_layer._mixed_batch_forward(x, base, names), plain, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("tokens", [1, 17])
def test_functional_call_with_other_adapter_tensors_is_not_answered_by_a_kept_call(tokens, grad):
    """``torch.func.functional_call`` swaps a module's tensors by writing its ``_buffers`` directly (no
    ``__setattr__``, no ``register_buffer``): the layers' kept calls, made for the held tensors, must not run
    instead of the adapters' with the given ones — on a q4 base (fused op; with gradients on: the direct branch)
    and a mixed batch (routed call)."""
    import copy

    from torch.func import functional_call

    lm = tiny_q4(adapter=True)
    flipped = {k: torch.flip(v, [0]) if k.endswith("scale_out") else v.clone() for k, v in lm.state_dict().items()}
    fresh = copy.deepcopy(lm)
    fresh.load_state_dict(flipped)
    ids = IDS[:, :tokens]
    with torch.set_grad_enabled(grad):
        held = lm(input_ids=ids).logits
        lm(input_ids=ids)  # the kept calls are made and taken again
        got = functional_call(lm, flipped, (), {"input_ids": ids}).logits
        assert not torch.allclose(got, held)
        assert torch.equal(got, fresh(input_ids=ids).logits)
        assert torch.equal(lm(input_ids=ids).logits, held)  # its own tensors again afterwards
        rows = torch.cat([ids, ids])
        names = ["default", layer.BASE_ROW]
        lm(input_ids=rows, adapter_names=names)
        got = functional_call(lm, flipped, (), {"input_ids": rows, "adapter_names": names}).logits
        torch.testing.assert_close(got, fresh(input_ids=rows, adapter_names=names).logits, rtol=1e-5, atol=1e-5)


def test_moving_the_model_drops_the_kept_calls_and_their_tensors():
    """``model.to(device)`` after eager decode (e.g. onto a GPU, where no CPU call is kept again): the layers' kept
    calls (``_fast``, ``_fast_for``, ``_decode``) held the tensors from before the move, the q4 base's and the
    adapters' (tiny q4 Llama: 14 of 14 layers' old ``qweight`` and ``sign_A`` alive), for as long as the model."""
    import gc
    import weakref

    lm = tiny_q4(True)
    with torch.no_grad():
        lm.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=3, do_sample=False)
    layers = [m for m in lm.modules() if isinstance(m, layer.LoRDBALinear)]
    assert all(held._fast is not None for held in layers)  # (the kept calls the test is about)
    old = [weakref.ref(held.base_layer.qweight) for held in layers]
    old += [weakref.ref(held.lordba_adapters["default"].sign_A) for held in layers]
    lm.to("meta")  # (as a move to a GPU: nothing calls the kept CPU calls again)
    gc.collect()
    assert sum(ref() is not None for ref in old) == 0
