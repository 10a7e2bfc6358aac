"""``lordba::q4_group``: q4 layers that read one input (q/k/v, gate/up) in one call — bit for bit each
layer's own ``q4_branch`` / ``q4_linear`` call, side by side, on every one-token kernel, any number of
threads, odd sizes, every kind of adapter scales; a few tokens and mixed group sizes through the
per-layer path; bad lists refused."""

import pytest
import torch

from lordba.core.packing import pack_signs
from lordba.kernels import cpu_available
from lordba.kernels.q4 import register_fakes
from lordba.quant.q4 import Q4Linear

pytestmark = pytest.mark.skipif(not cpu_available(), reason="CPU kernels needed")

FLAGS = [(False, False), (True, False), (True, True)]  # exact, fast, fast-int8 (bf16, int8_dot)


def packed(out, in_f, group, seed=0, bits=4):
    """A random weight quantized to a q4 layer's ``(qweight, scale, minus)``."""
    w = torch.randn(out, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05
    layer = Q4Linear.from_weight(w, None, group, bits=bits)
    return layer.qweight, layer.scale, layer.minus


def adapter(out, in_f, r, scales, g):
    """A random packed LoRDBA adapter ``(sign_A, sign_B, b, m, a)`` with ``scales`` int8 or float32 b / a."""
    s_a, s_b = torch.randint(0, 2, (r, in_f), generator=g) * 2 - 1, torch.randint(0, 2, (out, r), generator=g) * 2 - 1
    if scales == "int8":
        b = torch.randint(-127, 128, (in_f,), generator=g, dtype=torch.int8)
        a = torch.randint(-127, 128, (out,), generator=g, dtype=torch.int8)
    else:
        b, a = torch.rand(in_f, generator=g), torch.randn(out, generator=g)
    return pack_signs(s_a.float()), pack_signs(s_b.float()), b, torch.rand(r, generator=g) * 0.05, a


def case(outs, in_f, r, scales, group=32, bits=4, seed=0):
    """Layers of ``outs`` rows reading ``in_f`` inputs, each with an adapter of rank ``r``."""
    g = torch.Generator().manual_seed(seed)
    layers = [packed(out, in_f, group, seed=seed + i, bits=bits) for i, out in enumerate(outs)]
    adapters = [adapter(out, in_f, r, scales, g) for out in outs]
    return layers, adapters, [0.5 + i for i in range(len(outs))]


def separate(x, layers, adapters, scalings, in_f, flags, bits=4):
    """Each layer's own call, outputs concatenated (what the group must equal)."""
    if not adapters:
        return torch.cat([torch.ops.lordba.q4_linear(x, *w, in_f, 16, bits, *flags) for w in layers], -1)
    return torch.cat(
        [
            torch.ops.lordba.q4_branch(x, *w, in_f, 16, bits, *flags, None, *ad, s, 4)
            for w, ad, s in zip(layers, adapters, scalings)
        ],
        -1,
    )


def grouped(x, layers, adapters, scalings, in_f, flags, bits=4):
    lists = [[w[i] for w in layers] for i in range(3)]
    parts = [[ad[i] for ad in adapters] for i in range(5)]
    return torch.ops.lordba.q4_group(x, *lists, in_f, 16, bits, *flags, *parts, scalings if adapters else [], 4)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("outs", "in_f"), [((96, 32, 32), 96), ((200, 200), 160), ((37, 5, 100), 40)])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("adapted", [True, False])
def test_one_token_group_is_each_layers_call_side_by_side_bit_for_bit(threads, outs, in_f, flags, adapted):
    """One token: every layer's rows in one parallel loop, each adapter's branch added to its own rows —
    the separate calls' values exactly, for rows not a multiple of the 16-row block, a rank across two
    groups of 8, and as many threads as layers or not."""
    layers, adapters, scalings = case(outs, in_f, 12, "int8", seed=threads)
    adapters = adapters if adapted else []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 1, in_f, generator=torch.Generator().manual_seed(7))
        want = separate(x, layers, adapters, scalings, in_f, flags)
        for _ in range(2):  # the same result call after call (buffers reused per member)
            got = grouped(x, layers, adapters, scalings, in_f, flags)
            assert got.shape == (1, 1, sum(outs)) and torch.equal(got, want)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("scales", ["float32", "int8"])
@pytest.mark.parametrize("tokens", [1, 3, 20])  # the one-token loop; few tokens and the GEMM: layer by layer
def test_other_token_counts_scales_and_eight_bit_codes_equal_the_separate_calls(scales, tokens):
    layers, adapters, scalings = case((48, 16, 16), 64, 8, scales, seed=tokens)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    for flags in FLAGS:
        want = separate(x, layers, adapters, scalings, 64, flags)
        assert torch.equal(grouped(x, layers, adapters, scalings, 64, flags), want)
    layers8 = [packed(out, 64, 32, seed=i, bits=8) for i, out in enumerate((48, 16))]
    got = grouped(x, layers8, adapters[:2], scalings[:2], 64, FLAGS[0], bits=8)
    assert torch.equal(got, separate(x, layers8, adapters[:2], scalings[:2], 64, FLAGS[0], bits=8))


def test_layers_of_different_group_sizes_and_a_bfloat16_input_take_the_per_layer_path():
    g = torch.Generator().manual_seed(2)
    layers = [packed(48, 64, 32, seed=1), packed(32, 64, 64, seed=2)]
    adapters = [adapter(48, 64, 8, "int8", g), adapter(32, 64, 8, "int8", g)]
    for x in (torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g).bfloat16()):
        got = grouped(x, layers, adapters, [1.0, 2.0], 64, FLAGS[1])
        assert got.dtype == x.dtype and torch.equal(got, separate(x, layers, adapters, [1.0, 2.0], 64, FLAGS[1]))


def views_at_odd_offsets(tensors):
    """Copies of ``tensors`` laid out in one byte buffer, each at an odd offset (storage_offset > 0), as
    views of their own dtype and shape: how the arena holds the weights and the kernels find them."""
    buf = torch.zeros(sum(t.numel() * t.element_size() + 64 for t in tensors), dtype=torch.uint8)
    views, at = [], 0
    for t in tensors:
        size = t.element_size()
        at = -(-at // size) * size + 3 * size  # aligned to its dtype, not at the buffer's start or a cache line
        n = t.numel() * size
        view = buf[at : at + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append(view)
        at += n
    return views


@pytest.mark.parametrize("flags", FLAGS)
def test_one_token_reads_tensors_that_are_views_into_a_shared_buffer(flags):
    """The one-token calls ask for their tensors' headers, storages and scale vectors before reading them
    (warm.h): views at offsets into one storage, float16 ``m``, give the values of the tensors' own copies."""
    layers, adapters, scalings = case((48, 16, 16), 64, 12, "float32", seed=5)
    adapters = [(sa, sb, b, m.half(), a) for sa, sb, b, m, a in adapters]
    flat = views_at_odd_offsets([t for w in layers for t in w] + [t for ad in adapters for t in ad])
    v_layers = [tuple(flat[3 * i : 3 * i + 3]) for i in range(3)]
    v_adapters = [tuple(flat[9 + 5 * i : 9 + 5 * i + 5]) for i in range(3)]
    assert all(v.storage_offset() > 0 for v in flat)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    want = separate(x, layers, adapters, scalings, 64, flags)
    assert torch.equal(grouped(x, v_layers, v_adapters, scalings, 64, flags), want)
    assert torch.equal(separate(x, v_layers, v_adapters, scalings, 64, flags), want)
    assert torch.equal(grouped(x, v_layers, [], [], 64, flags), separate(x, layers, [], [], 64, flags))


def test_bad_lists_and_inputs_are_refused():
    layers, adapters, scalings = case((16, 16), 32, 8, "int8")
    x = torch.randn(1, 32)
    lists = [[w[i] for w in layers] for i in range(3)]
    parts = [[ad[i] for ad in adapters] for i in range(5)]
    call = torch.ops.lordba.q4_group
    with pytest.raises(RuntimeError, match="q4_group: qweight, scale and minus"):
        call(x, lists[0], lists[1][:1], lists[2], 32, 16, 4, True, False, *parts, scalings, 4)
    with pytest.raises(RuntimeError, match="q4_group: the adapter lists"):
        call(x, *lists, 32, 16, 4, True, False, *parts[:4], parts[4][:1], scalings, 4)
    with pytest.raises(RuntimeError, match="q4_group: the adapter lists"):
        call(x, *lists, 32, 16, 4, True, False, *parts, scalings[:1], 4)
    with pytest.raises(RuntimeError, match="q4_group: x's last dimension must be 32"):
        call(torch.randn(1, 31), *lists, 32, 16, 4, True, False, *parts, scalings, 4)
    with pytest.raises(RuntimeError, match="q4_group: qweight, scale and minus"):
        call(x, [], [], [], 32, 16, 4, True, False, [], [], [], [], [], [], 4)


def test_the_fake_gives_the_groups_shape():
    register_fakes()
    layers, adapters, scalings = case((16, 8, 8), 32, 8, "int8")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = grouped(torch.empty(2, 1, 32), layers, adapters, scalings, 32, FLAGS[1])
    assert y.shape == (2, 1, 32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flags", FLAGS)
def test_calls_in_a_changing_order_over_replaced_tensors_and_many_sites_keep_their_values(threads, flags):
    """Each adapted one-token call remembers what it read and, once its rows are done, asks for what the
    call after it read last time (warm.h's look-ahead). Calls in a changing order, over a layer whose
    tensors were freed and replaced since, and over more call sites than a thread's table keeps (it
    starts again past 2,048) give, bit for bit, the values of the first calls."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [case((48, 16, 16), 64, 12, scales, seed=s) for s, scales in enumerate(["int8", "float32", "int8"])]
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(11))
        want = [grouped(x, *c, 64, flags) for c in cases]
        order = torch.Generator().manual_seed(threads)
        for _ in range(4):
            for i in torch.randperm(3, generator=order).tolist():
                assert torch.equal(grouped(x, *cases[i], 64, flags), want[i])
                assert torch.equal(separate(x, *cases[i], 64, flags), want[i])
            cases[1] = case((48, 16, 16), 64, 12, "float32", seed=1)  # the same values in new tensors
        kept = []  # each call site new (a view is a tensor of its own), all alive: more sites than the table keeps
        for _ in range(2100):
            layers, adapters, scalings = cases[0]
            views = [tuple(t.view_as(t) for t in w) for w in layers], [tuple(t.view_as(t) for t in a) for a in adapters]
            kept.append(views)
            assert torch.equal(grouped(x, *views, scalings, 64, flags), want[0])
    finally:
        torch.set_num_threads(saved)
