"""``lordba::branch_rows``: many adapters in one batch, each row equal to its adapter's own call."""

import pytest
import torch

from lordba import kernels
from lordba.core.packing import pack_signs
from lordba.errors import ShapeMismatchError

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="the CPU extension could not be built")


def adapter(in_f, out_f, r, int8, g):
    """Packed signs and scales (int8 codes for b and a, or float32) of a random adapter."""
    sign_A = pack_signs(torch.randn(r, in_f, generator=g))
    sign_B = pack_signs(torch.randn(out_f, r, generator=g))
    m = torch.rand(r, generator=g) + 0.1
    if int8:
        b = torch.randint(-127, 128, (in_f,), dtype=torch.int8, generator=g)
        a = torch.randint(-127, 128, (out_f,), dtype=torch.int8, generator=g)
        b[0], a[0] = 127, -127
    else:
        b, a = torch.rand(in_f, generator=g) + 0.5, torch.randn(out_f, generator=g)
    return sign_A, sign_B, b, m, a


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """The op runs its adapters' groups in parallel with several threads: same results."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # decode, short and long prefill (the unpack path)
# in, out, r: rows not on byte boundaries; large enough that 3 tokens per row run the adapters' groups
# in parallel (the op keeps small work, a decode step's, on one thread)
@pytest.mark.parametrize("dims", [(64, 48, 8), (72, 40, 5), (1024, 1024, 32)])
def test_each_row_equals_its_adapters_own_call(dtype, tokens, dims, threads):
    g = torch.Generator().manual_seed(0)
    adapters = [adapter(*dims, int8=k % 2 == 0, g=g) for k in range(5)]
    scalings = [0.5, 1.0, 2.0, 0.25, 1.5]
    index = torch.tensor([0, 2, -1, 2, 4, 1, 0, 3, -1])
    x = torch.randn(9, tokens, dims[0], generator=g).to(dtype)
    base = torch.randn(9, tokens, dims[1], generator=g).to(dtype)
    y = kernels.packed_branch_rows(x, index, adapters, scalings, base)
    assert y.shape == base.shape and y.dtype == base.dtype
    for k, tensors in enumerate(adapters):
        rows = (index == k).nonzero().flatten()
        want = kernels.packed_branch(x[rows], *tensors, scalings[k], base[rows])
        assert torch.equal(y[rows], want)  # bit for bit: same path, same fused add
    assert torch.equal(y[index == -1], base[index == -1])


def test_prefill_rows_of_several_adapters_under_inference_mode(threads):
    """The server runs under ``torch.inference_mode``: the op's worker threads (the unpack path of
    several adapters in parallel) must run in it too, or writing the output fails."""
    g = torch.Generator().manual_seed(2)
    adapters = [adapter(64, 48, 8, int8=k % 2 == 0, g=g) for k in range(4)]
    index = torch.tensor([0, 1, 2, 3, 1, -1])
    x, base = torch.randn(6, 40, 64, generator=g), torch.randn(6, 40, 48, generator=g)
    with torch.inference_mode():
        y = kernels.packed_branch_rows(x, index, adapters, [1.0, 0.5, 2.0, 1.5], base)
        for k, tensors in enumerate(adapters):
            rows = (index == k).nonzero().flatten()
            assert torch.equal(y[rows], kernels.packed_branch(x[rows], *tensors, [1.0, 0.5, 2.0, 1.5][k], base[rows]))


def test_the_pure_pytorch_fallback_agrees():
    g = torch.Generator().manual_seed(1)
    adapters = [adapter(64, 48, 8, int8=k == 1, g=g) for k in range(3)]
    index = torch.tensor([2, 0, -1, 1, 2])
    x, base = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 48, generator=g)
    fast = kernels.packed_branch_rows(x, index, adapters, [1.0, 2.0, 0.5], base)
    with kernels.mode("torch"):
        slow = kernels.packed_branch_rows(x, index, adapters, [1.0, 2.0, 0.5], base)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_an_index_outside_the_adapters_is_refused(mode):
    g = torch.Generator().manual_seed(2)
    adapters = [adapter(64, 48, 8, int8=True, g=g)]
    x, base = torch.randn(2, 64), torch.randn(2, 48)
    with kernels.mode(mode), pytest.raises(ShapeMismatchError, match="index"):
        kernels.packed_branch_rows(x, torch.tensor([0, 1]), adapters, [1.0], base)
    with pytest.raises(ShapeMismatchError, match="index"):
        kernels.packed_branch_rows(x, torch.tensor([0]), adapters, [1.0], base)


@pytest.mark.parametrize("mode", ["auto", "sign", "unpack", "torch"])
def test_an_empty_batch_gives_its_empty_base(mode):
    """No rows: the base as it is (a copy), in every mode; the compiled op refused it with a
    ShapeMismatchError saying x and base had not the same tokens (they had: none)."""
    g = torch.Generator().manual_seed(4)
    adapters = [adapter(64, 48, 8, int8=True, g=g), adapter(64, 48, 4, int8=False, g=g)]
    x, base = torch.randn(0, 5, 64), torch.randn(0, 5, 48)
    with kernels.mode(mode):
        y = kernels.packed_branch_rows(x, torch.zeros(0, dtype=torch.long), adapters, [1.0, 0.5], base)
    assert y.shape == (0, 5, 48) and y.dtype == base.dtype


def test_the_op_has_a_fake_for_torch_compile():
    g = torch.Generator().manual_seed(3)
    tensors = adapter(64, 48, 8, int8=True, g=g)
    args = (
        torch.randn(3, 64),
        torch.tensor([0, -1, 0]),
        *([t] for t in tensors),
        [1.0],
        [16],
        torch.randn(3, 48),
    )
    torch.library.opcheck(torch.ops.lordba.branch_rows.default, args, test_utils=("test_faketensor",))


def test_rows_of_no_tokens_give_their_base():
    """Rows that hold no tokens (``x`` of shape ``[B, 0, in]``, B > 0: a batch of empty prompts) give the base
    as it is, in every mode: the compiled op divided by zero on its sign path (SIGFPE killed the process).
    Run in a child process, so that a crash fails this test instead of ending the test run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch
from lordba import kernels
from lordba.core.packing import pack_signs
g = torch.Generator().manual_seed(5)
adapters = [(pack_signs(torch.randn(r, 37, generator=g)), pack_signs(torch.randn(21, r, generator=g)),
             torch.rand(37, generator=g), torch.rand(r, generator=g), torch.randn(21, generator=g)) for r in (3, 17)]
for mode in ("auto", "sign", "unpack", "torch", "dense"):
    for index in ([0, 0, 0], [1, -1, 0], [-1, -1, -1]):
        for dtype in (torch.float32, torch.bfloat16):
            x, base = torch.randn(3, 0, 37).to(dtype), torch.randn(3, 0, 21).to(dtype)
            with kernels.mode(mode):
                y = kernels.packed_branch_rows(x, torch.tensor(index), adapters, [1.5, -1.0], base)
            assert y.shape == (3, 0, 21) and y.dtype == dtype, (mode, index, y.shape, y.dtype)
print("ok")
"""
    src = str(Path(kernels.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_the_op_called_directly_with_rows_of_no_tokens_gives_the_base():
    """``torch.ops.lordba.branch_rows`` is public: called directly (not through ``packed_branch_rows``, which
    returns first) with rows of no tokens, an empty batch, ``in = 0`` or ``out = 0``, it gives the base as it is
    (a contiguous copy), on the sign and the unpack path; its sign path divided by the zero tokens (SIGFPE
    killed the process). Run in a child process, so that a crash fails this test instead of ending the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch
from lordba import kernels
from lordba.core.packing import pack_signs
assert kernels.cpu_available()
op = torch.ops.lordba.branch_rows.default
g = torch.Generator().manual_seed(6)
def adapter(in_f, out_f, r):
    return (pack_signs(torch.randn(r, in_f, generator=g)) if in_f else torch.zeros(0, dtype=torch.uint8),
            pack_signs(torch.randn(out_f, r, generator=g)) if out_f else torch.zeros(0, dtype=torch.uint8),
            torch.rand(in_f, generator=g), torch.rand(r, generator=g), torch.randn(out_f, generator=g))
for shape_x, shape_base, in_f, out_f in (((3, 0, 37), (3, 0, 21), 37, 21), ((0, 4, 37), (0, 4, 21), 37, 21),
                                         ((3, 37), (3, 0), 37, 0), ((3, 2, 0), (3, 2, 21), 0, 21)):
    tensors = [adapter(in_f, out_f, r) for r in (3, 17)]
    for limit in (1 << 62, -1, 16):
        for index in ([0, 0, 0], [1, -1, 0], [-1, -1, -1])[: 3 if shape_x[0] else 1]:
            for dtype in (torch.float32, torch.bfloat16):
                x, base = torch.randn(shape_x).to(dtype), torch.randn(shape_base).to(dtype)
                idx = torch.tensor(index[: shape_x[0]], dtype=torch.long)
                y = op(x, idx, *([t[k] for t in tensors] for k in range(5)), [1.5, -1.0], [limit] * 2, base)
                assert torch.equal(y, base) and y.dtype == dtype, (shape_x, limit, index, y.shape)
print("ok")
"""
    src = str(Path(kernels.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
