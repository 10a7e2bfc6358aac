"""Cases for the Triton kernels, run by test_triton_interpreter.py in a fresh process with
``TRITON_INTERPRET=1`` (Triton chooses interpreted or compiled kernels when it is first imported),
on CPU tensors; with ``LORDBA_TRITON_DEVICE=cuda`` the same cases run on a GPU."""

import os

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model, kernels
from lordba.core.packing import pack_signs
from lordba.kernels import triton as tri

from conftest import tiny_llama

DEVICE = os.environ.get("LORDBA_TRITON_DEVICE", "cpu")


def case(seed, lead, in_f, out_f, r, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    lat_A, lat_B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    b, m, a = torch.rand(in_f, generator=g) + 0.5, torch.randn(r, generator=g), torch.randn(out_f, generator=g)
    S_A, S_B = torch.where(lat_A >= 0, 1.0, -1.0).double(), torch.where(lat_B >= 0, 1.0, -1.0).double()
    want = (((x.double() * b.double()) @ S_A.t()) * m.double()) @ S_B.t() * (a.double() * 0.5)
    args = [t.to(DEVICE) for t in (x, pack_signs(lat_A), pack_signs(lat_B), b, m, a)]
    return args, want


# widths/ranks off multiples of 8 and of the blocks (BK=128 over in with several splits, BO=64, RP=16/32)
SHAPES = [((1,), 300, 130, 20), ((3,), 21, 13, 3), ((2, 5), 40, 52, 9), ((17,), 129, 65, 16), ((1, 2), 7, 70, 1)]


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("strategy", ["sign", "unpack"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_reference(lead, in_f, out_f, r, strategy, dtype):
    args, want = case(in_f + r, lead, in_f, out_f, r, dtype)
    got = tri.packed_branch(*args, 0.5, strategy)
    assert got.shape == (*lead, out_f) and got.dtype == dtype and got.device.type == DEVICE
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.cpu().double() - want).abs().max().item() <= tol * want.abs().max().item()
    base = torch.randn(*lead, out_f).to(dtype).to(DEVICE)
    fused = tri.packed_branch(*args, 0.5, strategy, base)
    scale = (base.cpu().double().abs() + want.abs()).max().item()
    assert (fused.cpu().double() - base.cpu().double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("strategy", ["auto", "sign", "unpack"])
def test_no_tokens_give_an_empty_output(strategy):
    """An input with no tokens (an empty batch or prompt) gives an empty output, as the CPU op and the
    reference do; the fused kernels' launch plan divided by its zero token blocks (ZeroDivisionError)."""
    args, _ = case(2, (0,), 21, 13, 3, torch.float32)
    got = tri.packed_branch(*args, 0.5, strategy)
    assert got.shape == (0, 13) and got.dtype == torch.float32 and got.device.type == DEVICE
    base = torch.empty(2, 0, 13, dtype=torch.bfloat16, device=DEVICE)
    x = args[0].reshape(2, 0, 21)
    fused = tri.packed_branch(x, *args[1:], 0.5, strategy, base)
    assert fused.shape == (2, 0, 13) and fused.dtype == torch.bfloat16


def test_tracers_record_the_op_not_its_launches():
    """Eagerly the op's function runs directly; a tracer (make_fx, real or fake tensors) must still see
    the op, else the traced graph would silently lose the branch."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args, _ = case(3, (2,), 40, 24, 8, torch.float32)
    for tracing_mode in ("real", "fake"):
        graph = make_fx(lambda *t: tri.packed_branch(*t, 0.5), tracing_mode=tracing_mode)(*args)
        assert "lordba.triton_branch" in str(graph.code), tracing_mode
        torch.testing.assert_close(graph(*args), tri.packed_branch(*args, 0.5))


def test_the_layer_runs_triton_and_keeps_latent_equal_to_packed():
    torch.manual_seed(4)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=5, init="random")).to(DEVICE)
    ids = torch.randint(0, 101, (2, 6), device=DEVICE)
    with torch.no_grad():
        with kernels.mode("torch"):
            want = lm(input_ids=ids).logits
        with kernels.mode("triton"):
            latent = lm(input_ids=ids).logits
            lm.pack()
            packed = lm(input_ids=ids).logits
            step = lm(input_ids=ids[:, :1]).logits  # one token per row: the fused decode kernels
    assert torch.equal(latent, packed)
    torch.testing.assert_close(packed, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), kernels.mode("torch"):
        torch.testing.assert_close(step, lm(input_ids=ids[:, :1]).logits, rtol=1e-4, atol=1e-4)


def test_int8_scales_follow_a_hot_swap(tmp_path):
    """A packed adapter with int8 scale codes (decoded once and kept, on a GPU) gives the reference's
    output, and after a hot-swap the new adapter's, never the stale decoded scales."""
    from lordba import LoRDBAModel

    for seed, name in ((6, "a"), (7, "b")):
        base = tiny_llama(0)  # seeds the generator itself: draw the adapter after it
        torch.manual_seed(seed)
        get_lordba_model(base, LoRDBAConfig(r=5, init="random", scale_dtype="int8")).save_pretrained(tmp_path / name)
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a").to(DEVICE).eval()
    ids = torch.randint(0, 101, (2, 6), device=DEVICE)

    def both():
        with torch.no_grad():
            with kernels.mode("torch"):
                want = lm(input_ids=ids).logits
            return lm(input_ids=ids).logits, lm(input_ids=ids[:, :1]).logits, want

    got_a, step_a, want_a = both()
    torch.testing.assert_close(got_a, want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_a, want_a[:, :1], rtol=1e-4, atol=1e-4)
    lm.hotswap_adapter(tmp_path / "b", "default")
    got_b, step_b, want_b = both()
    assert not torch.allclose(want_a, want_b, atol=1e-3)
    torch.testing.assert_close(got_b, want_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_b, want_b[:, :1], rtol=1e-4, atol=1e-4)


if DEVICE == "cuda":  # inductor on CPU tensors through the interpreter would add minutes to the suite

    def test_compiled_model_equals_eager_on_the_gpu():
        """Inductor on the wrapper (whose own frame runs eagerly by design) and the wrapped model compiled
        whole (``fullgraph``: no graph break at ``lordba::triton_branch``) give the eager logits."""
        torch.manual_seed(5)
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=5, init="random")).to(DEVICE).eval()
        lm.pack()
        ids = torch.randint(0, 101, (2, 6), device=DEVICE)
        with torch.no_grad():
            eager = [lm(input_ids=ids).logits, lm(input_ids=ids[:, :1]).logits]
            compiled = torch.compile(lm)
            got = [compiled(input_ids=ids).logits, compiled(input_ids=ids[:, :1]).logits]
            lm.base_model = torch.compile(lm.base_model, fullgraph=True)
            whole = [lm(input_ids=ids).logits, lm(input_ids=ids[:, :1]).logits]
        for g, w, e in zip(got, whole, eager):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-5)
