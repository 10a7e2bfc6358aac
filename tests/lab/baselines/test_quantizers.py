import torch

from lordba_lab.baselines import bitdelta, loraquant, rtn, svd_truncate


def factors(r=16, n_in=96, n_out=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)


def rel(q, A, B):
    return ((q.B @ q.A - B @ A).norm() / (B @ A).norm()).item()


def test_rtn_error_falls_and_bytes_grow_with_bits():
    A, B = factors()
    errs, sizes = zip(*[(rel(q, A, B), q.nbytes) for q in (rtn(A, B, b, 32) for b in (1, 2, 4, 8))])
    assert list(errs) == sorted(errs, reverse=True) and errs[-1] < 0.01
    assert list(sizes) == sorted(sizes)
    q = rtn(A, B, 2, 32)
    # A: 16 rows x 3 groups of 32 along in; B: grouped along out, 16 rows x 3 groups; 2 fp16 numbers per group
    assert q.nbytes == (16 * 96 * 2) // 8 + 16 * 3 * 4 + (80 * 16 * 2) // 8 + 16 * 3 * 4
    assert q.A.shape == A.shape and q.B.shape == B.shape


def test_rtn_is_exact_on_a_two_level_grid():
    A = torch.tensor([[0.5, -1.5, 0.5, -1.5]])
    B = torch.tensor([[2.0], [-2.0]])
    q = rtn(A, B, 1, 4)
    assert torch.equal(q.A, A)


def test_bitdelta_is_exact_for_sign_times_constant():
    A = torch.tensor([[0.3, -0.3], [-0.3, 0.3]])
    B = torch.tensor([[2.0, -2.0]])
    q = bitdelta(A, B)
    assert torch.allclose(q.A, A) and torch.allclose(q.B, B) and q.nbytes == 1 + 1 + 4


def test_loraquant_beats_plain_one_bit_and_keeps_the_product():
    A, B = factors(seed=3)
    # a decaying spectrum, as trained LoRAs have
    B = B * torch.logspace(0, -2, 16)[None, :]
    mixed = loraquant(A, B, high_bits=3, energy=0.8, group_size=32)
    assert rel(mixed, A, B) < rel(bitdelta(A, B), A, B)
    assert mixed.A.shape == A.shape and mixed.B.shape == B.shape
    assert loraquant(A, B, high_bits=8, energy=1.0, group_size=32).nbytes > mixed.nbytes


def test_svd_truncation_is_the_best_rank_k_and_exact_at_full_rank():
    A, B = factors(r=8)
    errs = [rel(svd_truncate(A, B, k), A, B) for k in (1, 2, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3  # fp16 rounding only
    S = torch.linalg.svdvals(B.double() @ A.double())
    eckart_young = (S[2:].pow(2).sum() / S.pow(2).sum()).sqrt().item()
    assert abs(errs[1] - eckart_young) < 1e-3
    q = svd_truncate(A, B, 2)
    assert q.nbytes == 2 * 2 * (96 + 80) and q.A.shape == A.shape and q.A[2:].abs().sum() == 0
