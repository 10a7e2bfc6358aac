import numpy as np
import pytest
import torch

from lordba.core.autograd import reference_delta, sign_branch
from lordba.core.ste import STE, SignSTE


def _dense_numpy(x, S_A, S_B, b, m, a, s):
    """Independent reference: y = x ΔWᵀ with ΔW = s·diag(a) S_B diag(m) S_A diag(b), in float64 numpy."""
    dw = s * np.diag(a) @ S_B @ np.diag(m) @ S_A @ np.diag(b)
    return x @ dw.T


def _rand(seed, tokens=(2, 5), in_f=19, out_f=11, r=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_f, generator=g, dtype=torch.float64)
    lat_A = torch.randn(r, in_f, generator=g, dtype=torch.float64) * 0.01
    lat_B = torch.randn(out_f, r, generator=g, dtype=torch.float64) * 0.01
    b = torch.rand(in_f, generator=g, dtype=torch.float64) + 0.5
    m = torch.randn(r, generator=g, dtype=torch.float64)
    a = torch.randn(out_f, generator=g, dtype=torch.float64)
    return x, lat_A, lat_B, b, m, a


def test_forward_matches_independent_dense_computation():
    x, lat_A, lat_B, b, m, a = _rand(0)
    S_A, S_B = np.where(lat_A.numpy() >= 0, 1.0, -1.0), np.where(lat_B.numpy() >= 0, 1.0, -1.0)
    expected = _dense_numpy(x.numpy(), S_A, S_B, b.numpy(), m.numpy(), a.numpy(), 2.5)
    got = sign_branch(x, lat_A, lat_B, b, m, a, 2.5, STE())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    ref = reference_delta(x, torch.tensor(S_A), torch.tensor(S_B), b, m, a, 2.5)
    assert torch.equal(ref, got.detach())


@pytest.mark.parametrize("ste", [STE("smoothsign", 100.0), STE("smoothsign", 3.0), STE("identity", clip=0.005)])
def test_fused_backward_equals_autograd_of_the_unfused_chain(ste):
    x, lat_A, lat_B, b, m, a = _rand(1)
    s = 0.75
    leaves = [t.clone().requires_grad_(True) for t in (x, lat_A, lat_B, b, m, a)]
    g_out = torch.randn(2, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    sign_branch(*leaves[:3], *leaves[3:], s, ste).backward(g_out)
    fused = [t.grad for t in leaves]

    leaves2 = [t.clone().requires_grad_(True) for t in (x, lat_A, lat_B, b, m, a)]
    xx, la, lb, bb, mm, aa = leaves2
    h = ((xx * bb) @ SignSTE.apply(la, ste).t() * mm) @ SignSTE.apply(lb, ste).t()
    (s * h * aa).backward(g_out)
    for got, want in zip(fused, (t.grad for t in leaves2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_second_derivatives_match_the_unfused_chain():
    """``create_graph=True`` (a gradient penalty, MAML's inner step): the backward's use of the saved,
    non-differentiable ``h1`` must not drop the second-order terms through ``x`` and ``b``."""
    x, lat_A, lat_B, b, m, a = _rand(3, tokens=(4,), in_f=6, out_f=5)
    S_A, S_B = torch.where(lat_A >= 0, 1.0, -1.0), torch.where(lat_B >= 0, 1.0, -1.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, m, a)]
    assert torch.autograd.gradgradcheck(lambda *t: sign_branch(t[0], S_A, S_B, *t[1:], 0.7), leaves)

    def inner_step(branch):
        leaves = [t.clone().requires_grad_(True) for t in (x, b, m, a)]
        xx, bb, mm, aa = leaves
        loss = (branch(xx, S_A, S_B, bb, mm, aa, 0.7) ** 2).sum()
        grads = torch.autograd.grad(loss, (bb, mm, aa), create_graph=True)
        stepped = [v - 0.1 * g for v, g in zip((bb, mm, aa), grads)]
        return torch.autograd.grad(branch(xx, S_A, S_B, *stepped, 0.7).sum(), leaves)

    for got, want in zip(inner_step(sign_branch), inner_step(reference_delta)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fixed_signs_get_no_gradient_and_bf16_inputs_work():
    x, lat_A, lat_B, b, m, a = _rand(2)
    S_A, S_B = torch.sign(lat_A).float(), torch.sign(lat_B).float()
    xb = x.bfloat16().requires_grad_(True)
    scales = [t.float().requires_grad_(True) for t in (b, m, a)]
    out = sign_branch(xb, S_A, S_B, *scales, 1.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16
    assert all(s.grad is not None and s.grad.dtype == torch.float32 for s in scales)


@pytest.mark.parametrize("grad_scale", [1e-6, 3e3])
def test_float16_inputs_give_the_parameters_float32_gradients(grad_scale):
    """A float16 model (``torch_dtype=torch.float16``): the float32 parameters' gradients are sums over every token
    and were computed in float16: small ones lost their bits or flushed to zero (a tiny Llama's scale_mid gradients,
    ~6e-6, were 58% off float32's), large ones overflowed to inf (GradScaler's initial 65536 made a gradient of 1.2
    infinite). They are now float64's to float32 rounding of the float16 inputs; ``x``'s gradient stays float16."""
    x, lat_A, lat_B, b, m, a = _rand(4, tokens=(4, 64), in_f=40, out_f=24, r=4)
    g_out = torch.randn(4, 64, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * grad_scale
    xh, gh = x.half(), g_out.half()
    grads = {}
    for dtype in (torch.float16, torch.float64):
        xx = xh.to(dtype).requires_grad_(True)
        params = [t.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
                  for t in (lat_A, lat_B, b, m, a)]  # fmt: skip
        sign_branch(xx, params[0], params[1], *params[2:], 0.5, STE()).backward(gh.to(dtype))
        grads[dtype] = [xx.grad, *(p.grad for p in params)]
    assert grads[torch.float16][0].dtype == torch.float16
    for got, want in zip(grads[torch.float16][1:], grads[torch.float64][1:]):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert float((got.double() - want).norm() / want.norm()) < 1e-3


def test_training_saves_only_input_and_rank_sized_activation():
    """The fused function keeps x (shared with the caller) and h1 (tokens × r), not every stage."""
    x, lat_A, lat_B, b, m, a = _rand(3, tokens=(4, 64), in_f=96, out_f=80, r=4)
    params = [t.float().requires_grad_(True) for t in (lat_A, lat_B, b, m, a)]
    xf = x.float()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sign_branch(xf, params[0], params[1], *params[2:], 1.0, STE())
    own = {xf.data_ptr()} | {p.data_ptr() for p in params}
    activation = [t for t in saved if t.data_ptr() not in own]
    assert sum(t.numel() for t in activation) == 4 * 64 * 4  # h1 only: tokens × r


def test_fold_factors_multiply_to_the_float64_delta_w_and_give_the_branch_output():
    from lordba.core.autograd import fold_factors

    x, lat_A, lat_B, b, m, a = _rand(4, in_f=9, out_f=7, r=3)
    S_A, S_B = torch.where(lat_A >= 0, 1.0, -1.0).double(), torch.where(lat_B >= 0, 1.0, -1.0).double()
    folded_A, folded_B = fold_factors(S_A, S_B, b, m, a, 1.75, dtype=torch.float64)
    assert folded_A.shape == (3, 9) and folded_B.shape == (7, 3) and folded_A.dtype == torch.float64
    dw = 1.75 * np.diag(a.numpy()) @ S_B.numpy() @ np.diag(m.numpy()) @ S_A.numpy() @ np.diag(b.numpy())
    np.testing.assert_allclose((folded_B @ folded_A).numpy(), dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x @ folded_A.t() @ folded_B.t(), reference_delta(x, S_A, S_B, b, m, a, 1.75))


def test_a_gradient_for_latent_signs_without_an_estimator_is_refused():
    x, lat_A, lat_B, b, m, a = _rand(5)
    lat_A.requires_grad_(True)
    with pytest.raises(RuntimeError, match="straight-through estimator"):
        sign_branch(x, lat_A, lat_B, b, m, a, 1.0).sum().backward()
