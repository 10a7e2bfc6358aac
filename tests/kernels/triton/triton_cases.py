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
