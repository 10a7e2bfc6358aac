"""lordba.kernels: every mode against the reference branch, latent/packed equality, dispatch, fallback,
caches, routing and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lordba import ConfigError, LoRDBAConfig, get_lordba_model, kernels
from lordba.core.autograd import reference_delta
from lordba.core.scales import get_codec
from lordba.core.ste import STE
from lordba.nn.adapter import TrainableAdapter
from lordba.nn.layer import LoRDBALinear, Routing, route_index

from conftest import tiny_llama

CPU_MODES = ["auto", "sign", "unpack", "dense", "torch"]


def make_layer(in_f, out_f, r, seed=0, scale_dtype="float32", names=("a",)):
    torch.manual_seed(seed)
    layer = LoRDBALinear(nn.Linear(in_f, out_f))
    for i, name in enumerate(names):
        ad = TrainableAdapter(in_f, out_f, r + i, 1.5, get_codec(scale_dtype), STE(), init="random")
        with torch.no_grad():
            ad.scale_in.uniform_(0.5, 1.5)
            ad.scale_mid.uniform_(0.5, 1.5)
            ad.scale_out.normal_(0, 0.5)
        layer.add_adapter(name, ad)
    layer.set_adapter(names[0])
    return layer


def pack(layer, name="a"):
    """Put adapter ``name`` of ``layer`` into its inference form; returns it."""
    layer.add_adapter(name, layer.lordba_adapters[name].pack())
    return layer.lordba_adapters[name]


def freeze(layer, name="a"):
    """Adapter ``name`` with frozen packed signs and float32 scale parameters; returns it."""
    layer.add_adapter(name, layer.lordba_adapters[name].freeze_signs())
    return layer.lordba_adapters[name]


def reference(layer, x, name="a"):
    ad = layer.lordba_adapters[name]
    sign_A, sign_B = (s.double() for s in ad.signs())
    b, m, a = (v.detach().double() for v in ad.scales())
    return layer.base_layer(x).double() + reference_delta(x.double(), sign_A, sign_B, b, m, a, ad.scaling)


@pytest.fixture(params=CPU_MODES)
def each_mode(request):
    with kernels.mode(request.param):
        yield request.param


@settings(max_examples=12, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (23,), (2, 3), (3, 1, 2)]),
    in_f=st.integers(1, 45),
    out_f=st.integers(1, 40),
    r=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_every_mode_matches_the_reference_layer(lead, in_f, out_f, r, dtype, seed):
    layer = make_layer(in_f, out_f, r, seed).to(dtype)
    pack(layer)
    x = torch.randn(*lead, in_f).to(dtype)
    want = reference(layer, x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    # the scale of a rounding error: the output with every term's magnitude added (cancellation
    # inside S_A x or S_B h can leave an output far smaller than the sums that were rounded)
    ad = layer.lordba_adapters["a"]
    b, m, a = (v.detach().double().abs() for v in ad.scales())
    xa = x.double().abs()
    terms = xa @ layer.base_layer.weight.double().abs().t() + ad.scaling * ((xa @ b).unsqueeze(-1) * m.sum() * a)
    outputs = {}
    with torch.no_grad():
        for name in CPU_MODES:
            with kernels.mode(name):
                got = layer(x)
            assert got.shape == (*lead, out_f) and got.dtype == dtype
            scale = max(want.abs().max().item(), terms.max().item()) + 1e-3
            assert (got.double() - want).abs().max().item() <= tol * scale, name
            outputs[name] = got
    limit = kernels.sign_max_tokens(in_f, out_f, r, dtype)
    tokens = x.numel() // in_f
    if kernels.cpu_available():  # auto is exactly one of the two compiled paths
        assert torch.equal(outputs["auto"], outputs["sign" if tokens <= limit else "unpack"])


def test_latent_and_packed_forms_are_bit_identical_in_every_mode(each_mode):
    layer = make_layer(37, 29, 5, names=("a", "b"))
    layer.set_adapter(["a", "b"])
    for x in (torch.randn(1, 37), torch.randn(4, 6, 37)):
        with torch.no_grad():
            latent = layer(x)
            trained = dict(layer.lordba_adapters.items())
            for name in trained:
                pack(layer, name)
            packed = layer(x)
            for name, ad in trained.items():
                layer.add_adapter(name, ad)
        assert torch.equal(latent, packed), each_mode


def test_training_path_is_unchanged_and_close_to_inference():
    layer = make_layer(21, 13, 3)
    x = torch.randn(5, 21, requires_grad=True)
    trained = layer(x)
    trained.sum().backward()
    assert x.grad is not None and layer.lordba_adapters["a"].latent_A.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), trained.detach(), rtol=1e-5, atol=1e-5)


def test_a_trainable_base_still_gets_its_gradient_past_a_frozen_adapter():
    layer = make_layer(21, 13, 3)
    pack(layer)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 21)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, torch.ones(4, 13).t() @ x)
    with torch.no_grad():
        assert torch.equal(out, layer(x))


def test_caches_follow_in_place_writes():
    layer = make_layer(30, 20, 4)
    ad = pack(layer)
    x = torch.randn(3, 30)
    with torch.no_grad():
        before = layer(x)
        ad.scale_out.mul_(2.0)  # optimizer-like in-place write bumps the version counter
        torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * (before - layer.base_layer(x)))
        other = make_layer(30, 20, 4, seed=9).lordba_adapters["a"].pack()
        ad.load_stored(other.stored_tensors())  # what hotswap_adapter does
        torch.testing.assert_close(layer(x), reference(layer, x).float(), rtol=1e-5, atol=1e-5)
        with kernels.mode("dense"):
            dense = layer(x)
            ad.scale_in.add_(0.25)
            assert not torch.equal(layer(x), dense)
            torch.testing.assert_close(layer(x), reference(layer, x).float(), rtol=1e-5, atol=1e-5)


def test_cache_memory_is_reported():
    layer = make_layer(64, 48, 8)
    ad = freeze(layer)
    assert ad.cache_nbytes()["total"] == 0
    with torch.no_grad():
        layer(torch.randn(2, 64))
        sizes = ad.cache_nbytes()  # float32 scales: the cache views the parameters
        assert sizes == {"scales": 0, "signs": 0, "dense": 0, "total": 0}
        with kernels.mode("dense"):
            layer(torch.randn(2, 64))
        assert ad.cache_nbytes()["dense"] == 4 * 8 * (64 + 48)
        ad.clear_cache()
        assert ad.cache_nbytes()["total"] == 0
        layer.add_adapter("a", ad.unfreeze_signs())
        layer(torch.randn(2, 64))
        assert layer.lordba_adapters["a"].cache_nbytes()["signs"] == (8 * 64 + 48 * 8) // 8


def test_decoded_scales_are_copied_only_when_they_differ_from_the_parameters():
    layer = make_layer(64, 48, 8, scale_dtype="int8")  # latent int8 scales: decoding rounds them
    ad = freeze(layer)
    x = torch.randn(2, 64)
    with torch.no_grad():
        trained = layer(x)
        assert ad.cache_nbytes()["scales"] == 4 * (64 + 8 + 48)
        ad.load_stored(ad.stored_tensors())  # as loaded from its file: parameters hold decoded values
        assert ad.cache_nbytes()["scales"] == 4 * (64 + 8 + 48)  # not rebuilt before a call
        loaded = layer(x)
        assert ad.cache_nbytes()["total"] == 0
        assert torch.equal(loaded, trained)  # the file's adapter computes exactly what the trained one did
        ad.scale_in.mul_(0.5)  # a write to the viewed parameter is seen through the version counter
        torch.testing.assert_close(layer(x), reference(layer, x).float(), rtol=1e-5, atol=1e-5)


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setenv("LORDBA_NO_EXT", "1")
    monkeypatch.setattr(kernels._STATE, "cpu", None)
    x = torch.randn(2, 4, 26)
    with pytest.warns(kernels.KernelFallbackWarning, match="LORDBA_NO_EXT"):
        layer = make_layer(26, 11, 3)  # building a CPU layer loads the kernels (tracing cannot)
    with torch.no_grad():
        latent = layer(x)
    assert not kernels.cpu_available()
    pack(layer)
    with torch.no_grad():
        packed = layer(x)
        with kernels.mode("torch"):
            assert torch.equal(layer(x), packed)  # auto fell back to the reference path
    assert torch.equal(latent, packed)


def test_mode_switches_and_dispatch_rule():
    with pytest.raises(ConfigError, match="kernel mode"):
        kernels.set_mode("fast")
    before = kernels.get_mode()
    with kernels.mode("unpack"):
        assert kernels.get_mode() == "unpack"
    assert kernels.get_mode() == before
    for isa in ("avx512", "avx2", "portable"):
        small = kernels.sign_max_tokens(576, 1536, 16, torch.float32, isa)
        big = kernels.sign_max_tokens(11008, 4096, 16, torch.float32, isa)
        assert 1 <= big <= small
        assert kernels.sign_max_tokens(576, 1536, 16, torch.bfloat16, isa) >= small
    assert kernels.dispatch_limit(8, 8, 2, torch.float32, "sign") > 10**9
    assert kernels.dispatch_limit(8, 8, 2, torch.float32, "unpack") < 0


@pytest.mark.parametrize("which", ["mode", "branch_compute"])
def test_setting_blocks_of_two_threads_ending_out_of_order_restore_the_setting(which):
    """The kernel mode and the branch compute are the process's; two threads' blocks that end in the order
    they began (not nested) leave the setting of the block still open, then the one from before both (each
    block restored the value it saw on entry: the first thread's setting was left in force for good)."""
    import threading

    block, get = {
        "mode": (kernels.mode, kernels.get_mode),
        "branch_compute": (kernels.with_branch_compute, kernels.branch_compute),
    }[which]
    first, second = ("torch", "unpack") if which == "mode" else ("fast", "exact")
    before, seen = get(), []
    opened, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def one() -> None:
        with block(first):
            opened.set()
            second_in.wait(10)
        seen.append(get())  # the second thread's block is still open
        first_out.set()

    def two() -> None:
        opened.wait(10)
        with block(second):
            second_in.set()
            first_out.wait(10)

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [second]
    assert get() == before


@pytest.mark.parametrize("which", ["mode", "branch_compute"])
def test_a_setting_made_beside_another_threads_block_is_not_undone_by_it(which):
    """A thread's set (``set_mode``) outside any block of its own, while another thread's block is open, is the
    process's lasting setting: that block's end leaves it (it restored the value from before the block). A set
    inside a thread's own block stays that block's, even where another thread's block began after it: it was
    written into that newer block, and lost when it ended (the first block then ran in its entry value again)."""
    import threading

    block, get, put = {
        "mode": (kernels.mode, kernels.get_mode, kernels.set_mode),
        "branch_compute": (kernels.with_branch_compute, kernels.branch_compute, kernels.set_branch_compute),
    }[which]
    # values[1] and values[2] differ from values[3] (the value outside) and values[0] (the first block's)
    values = ("sign", "torch", "unpack", "dense") if which == "mode" else ("fast", "exact", "exact", "fast")
    before = get()
    try:
        # a lasting set beside another thread's block
        put(values[3])
        inside, done = threading.Event(), threading.Event()

        def holder() -> None:
            with block(values[0]):
                inside.set()
                done.wait(10)

        thread = threading.Thread(target=holder)
        thread.start()
        inside.wait(10)
        put(values[1])
        assert get() == values[1]  # now, for the process
        done.set()
        thread.join(20)
        assert get() == values[1]  # not undone by the other thread's block ending
        # a set inside a thread's own block, while a newer block of another thread is open
        put(values[3])
        a_in, b_in, a_set, b_out = (threading.Event() for _ in range(4))
        seen = []

        def first() -> None:
            with block(values[0]):
                a_in.set()
                b_in.wait(10)
                put(values[2])
                a_set.set()
                b_out.wait(10)
                seen.append(get())  # the newer block has ended: this block's own set

        def second() -> None:
            a_in.wait(10)
            with block(values[3]):
                b_in.set()
                a_set.wait(10)
            b_out.set()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == [values[2]]
        assert get() == values[3]  # the first block's set ended with it
    finally:
        put(before)


def test_branch_compute_switches_and_refuses_other_names(monkeypatch):
    """``exact`` by default, ``fast`` on request (a block, or the process), nothing else; a bad
    ``$LORDBA_BRANCH_COMPUTE`` warns and means ``exact`` (read when lordba is imported)."""
    import subprocess
    import sys

    before = kernels.branch_compute()  # "exact" unless $LORDBA_BRANCH_COMPUTE says otherwise (below)
    with pytest.raises(ConfigError, match="branch compute must be one of"):
        kernels.set_branch_compute("bf16")
    for name in kernels.BRANCH_COMPUTE:
        with kernels.with_branch_compute(name):
            assert kernels.branch_compute() == name
        assert kernels.branch_compute() == before
    code = "from lordba import kernels; print(kernels.branch_compute())"
    for value, want in (("", "exact"), ("fast", "fast"), ("bogus", "exact")):
        monkeypatch.setenv("LORDBA_BRANCH_COMPUTE", value)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == want
        assert ("is not one of" in done.stderr) == (value == "bogus")


def test_mixed_batch_routing_uses_shared_indices():
    layer = make_layer(24, 10, 3, names=("a", "b"))
    names = ("b", "__base__", "a", "b")
    assert route_index(names, torch.device("cpu")) is route_index(list(names), torch.device("cpu"))
    x = torch.randn(4, 3, 24)
    with layer.gate.enter(Routing(adapter_names=names)):
        with torch.no_grad():
            mixed = layer(x)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer.set_adapter([] if name == "__base__" else [name])
            torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], rtol=1e-6, atol=1e-6)
    with layer.gate.enter(Routing(adapter_names=("a",) * 4)):  # one adapter for every row: fused path
        with torch.no_grad():
            layer.set_adapter("a")
            assert torch.equal(layer(x), layer.base_layer(x) + layer.lordba_adapters["a"](x))


@pytest.mark.parametrize("compact", [False, True])
def test_torch_compile_traces_the_kernels_without_graph_breaks(compact):
    torch.manual_seed(5)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    if compact:  # inference form: int8 codes, read by the kernel in eager and traced graphs alike
        lm.pack()
    else:  # training form, frozen: float32 scale parameters decoded on the way
        lm.freeze_signs("default")
        lm.set_trainable("default", signs=False, scales=False)
    ids = torch.randint(0, 101, (2, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        for length in (9, 1):  # unpack path, then the sign path (a recompile for the new shape)
            eager = lm(input_ids=ids[:, :length]).logits
            compiled = torch.compile(lm.base_model, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(input_ids=ids[:, :length]).logits, eager)


def test_inductor_compiles_a_layer():
    layer = make_layer(40, 52, 5)
    pack(layer)
    x = torch.randn(3, 40)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiles_the_whole_model():
    torch.manual_seed(5)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    lm.pack()
    ids = torch.randint(0, 101, (2, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = lm(input_ids=ids).logits
        compiled = torch.compile(lm.base_model)(input_ids=ids).logits
    # inductor re-fuses the model's own ops: ~1e-3 relative, as for the original reference branch
    torch.testing.assert_close(compiled, eager, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("mode", ["auto", "sign", "unpack", "torch"])
def test_float64_scales_run_in_every_mode(mode):
    """Scales are "float tensors": float64 ones (a float64 solver's factors, as ``convert`` works) ran in the
    ``torch`` mode but made the compiled op raise a RuntimeError (it reads float32 / float16 / bfloat16 /
    int8 only), in ``packed_branch`` and ``packed_branch_rows`` alike. Now they run as their float32 values."""
    from lordba.core.packing import pack_signs

    g = torch.Generator().manual_seed(3)
    in_f, out_f, r = 37, 29, 5
    signs = pack_signs(torch.randn(r, in_f, generator=g)), pack_signs(torch.randn(out_f, r, generator=g))
    scales = torch.rand(in_f, generator=g), torch.rand(r, generator=g), torch.randn(out_f, generator=g)
    wide = tuple(v.double() for v in scales)
    x, base = torch.randn(3, 2, in_f, generator=g), torch.randn(3, 2, out_f, generator=g)
    with kernels.mode(mode):
        want = kernels.packed_branch(x, *signs, *scales, 0.5, base=base)
        assert torch.equal(kernels.packed_branch(x, *signs, *wide, 0.5, base=base), want)
        index = torch.tensor([0, -1, 0])
        rows = kernels.packed_branch_rows(x, index, [(*signs, *wide)], [0.5], base)
        assert torch.equal(rows, kernels.packed_branch_rows(x, index, [(*signs, *scales)], [0.5], base))


def test_the_triton_mode_on_cpu_tensors_outside_the_interpreter_is_the_librarys_error():
    """Kernel mode ``triton`` on CPU tensors without Triton's interpreter was a bare RuntimeError."""
    from lordba.kernels.triton import _interpreting

    if _interpreting():  # (a run under TRITON_INTERPRET=1 runs the kernels instead)
        return
    layer = make_layer(16, 8, 4)
    pack(layer)
    with kernels.mode("triton"), torch.no_grad(), pytest.raises(ConfigError, match="kernel mode 'triton'"):
        layer(torch.randn(2, 16))
