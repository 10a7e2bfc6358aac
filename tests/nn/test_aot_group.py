"""``lordba.nn.aot_group``: in an exported graph, the q4 layers that read one input with the same settings
become one ``lordba::q4_group`` call (sliced back into their outputs), the same values bit for bit; a
layer on another input or with other settings stays a call of its own. (A plain layer's bias is added
after its op, so it joins the group.)"""

import pytest
import torch
from torch import nn

from lordba.kernels import cpu_available
from lordba.nn.aot_group import group_siblings
from lordba.quant.q4 import Q4Linear

pytestmark = pytest.mark.skipif(not cpu_available(), reason="CPU kernels needed")


def q4(out, in_f, bias=False, seed=0, compute="fast", bits=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_f, generator=g) * 0.1
    layer = Q4Linear.from_weight(w, torch.randn(out) if bias else None, 32, bits=bits)
    layer.compute = compute
    return layer


class Block(nn.Module):
    """q/k/v-like layers on one input (one with a bias, one with other settings: 8-bit codes, on every CPU;
    another compute mode has the same kernel flags where the CPU has no bfloat16), two on another input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = q4(64, 64, seed=1), q4(32, 64, seed=2), q4(32, 64, seed=3)
        self.biased, self.other = q4(16, 64, bias=True, seed=4), q4(16, 64, seed=5, bits=8)
        self.gate, self.up = q4(96, 64, seed=6), q4(96, 64, seed=7)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x), self.v(x) * 2, self.biased(x), self.other(x)], -1)
        y = torch.relu(h[..., :64])
        return h, self.gate(y) * self.up(y)


def calls(program, name):
    return [n for n in program.graph_module.graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.mark.parametrize("tokens", [1, 5])
def test_siblings_become_one_call_with_the_same_values(tokens):
    block = Block().eval()
    x = torch.randn(1, tokens, 64)
    with torch.no_grad():
        program = torch.export.export(block, (x,))
        want = program.module()(x)
        assert len(calls(program, "q4_linear")) == 7
        assert group_siblings(program) == 2  # q/k/v and gate/up
        got = program.module()(x)
    assert len(calls(program, "q4_group")) == 2 and len(calls(program, "q4_linear")) == 1  # the 8-bit one
    groups = {tuple(len(a) for a in n.args[1:4]) for n in calls(program, "q4_group")}
    assert groups == {(4, 4, 4), (2, 2, 2)}
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    with torch.no_grad():
        assert group_siblings(program) == 0  # nothing left to group


class Adapted(nn.Module):
    """Three ``q4_branch`` calls on one input, the third with a bias (inside the op: it stays alone)."""

    def __init__(self):
        super().__init__()
        from lordba.core.packing import pack_signs

        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(q4(out, 64, seed=i) for i, out in enumerate((64, 32, 32)))
        for i, layer in enumerate(self.layers):
            out, r = layer.out_features, 8
            s_a, s_b = (torch.randint(0, 2, shape, generator=g) * 2 - 1 for shape in ((r, 64), (out, r)))
            layer.register_buffer("sa", pack_signs(s_a.float()))
            layer.register_buffer("sb", pack_signs(s_b.float()))
            layer.register_buffer("b", torch.randint(-127, 128, (64,), generator=g, dtype=torch.int8))
            layer.register_buffer("m", torch.rand(r, generator=g) * 0.05)
            layer.register_buffer("a", torch.randn(out, generator=g))
            layer.register_buffer("bias_t", torch.randn(out, generator=g) if i == 2 else None)

    def forward(self, x):
        ys = []
        for layer in self.layers:
            base = (x, layer.qweight, layer.scale, layer.minus, 64, 16, 4, True, False, layer.bias_t)
            ys.append(torch.ops.lordba.q4_branch(*base, layer.sa, layer.sb, layer.b, layer.m, layer.a, 0.5, 4))
        return torch.cat(ys, -1)


def test_adapted_layers_group_and_a_layer_with_its_bias_in_the_op_stays_alone():
    from lordba.kernels.q4 import register_fakes

    register_fakes()
    module = Adapted().eval()
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        want = program.module()(x)
        assert group_siblings(program) == 1
        got = program.module()(x)
    assert len(calls(program, "q4_group")) == 1 and len(calls(program, "q4_branch")) == 1
    assert torch.equal(got, want)
