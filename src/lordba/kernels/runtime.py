"""Which kernels run, process-wide (:mod:`lordba.kernels`): the kernel mode (:func:`set_mode`, ``$LORDBA_KERNEL``)
and the branch compute (:func:`set_branch_compute`, ``$LORDBA_BRANCH_COMPUTE``); the compiled CPU extension
and Triton, each found or loaded once and remembered (:func:`load_cpu`, :func:`cpu_available`,
:func:`triton_available`, :func:`preload`) with the ops bound from them; and the CPU's rule between the fused
sign path and unpack + BLAS (:func:`sign_max_tokens`, :func:`dispatch_limit`). The branch ops themselves
(:func:`~lordba.kernels.packed_branch`, ...) are in :mod:`lordba.kernels`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

from lordba.kernels.cpu import BuildResult

MODES = ("auto", "sign", "unpack", "dense", "torch", "triton")
CPU_MODES = ("auto", "sign", "unpack")  # the modes that run the compiled CPU kernels on CPU tensors
BRANCH_COMPUTE = ("fast", "exact")
BRANCH_COMPUTE_ENV = "LORDBA_BRANCH_COMPUTE"
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALL_TOKENS = 1 << 62


class KernelFallbackWarning(UserWarning):
    """The compiled kernels are unavailable and the (slower) pure-PyTorch branch runs instead."""


class _State:
    mode: str = os.environ.get("LORDBA_KERNEL", "auto")
    cpu: BuildResult | None = None  # None: not tried yet
    isa: str = "portable"  # instruction set the CPU kernels were built for
    op: object = None  # torch.ops.lordba.branch.default, bound once
    rows_op: object = None  # torch.ops.lordba.branch_rows.default (many adapters in one batch)
    attention_op: object = None  # torch.ops.lordba.decode_attention.default (one-token attention)
    triton: bool | None = None
    openmp: bool = False  # torch's parallel loops run on OpenMP (whose thread pool a fork leaves broken)
    branch_compute: str = os.environ.get(BRANCH_COMPUTE_ENV) or "exact"


_STATE = _State()
# the open blocks of mode / with_branch_compute (any thread), oldest first: [setting, value, thread ident]
_BLOCKS: list[list] = []
_OUTSIDE: dict[str, str] = {}  # the value once no block of a setting is open (taken as its first block began)
_BLOCKS_LOCK = threading.Lock()
_LOAD_LOCK = threading.RLock()  # one thread loads the CPU kernels (load_cpu)
if _STATE.mode not in MODES:
    warnings.warn(f"LORDBA_KERNEL={_STATE.mode!r} is not one of {MODES}; using 'auto'", stacklevel=1)
    _STATE.mode = "auto"
if _STATE.branch_compute not in BRANCH_COMPUTE:
    warnings.warn(
        f"{BRANCH_COMPUTE_ENV}={_STATE.branch_compute!r} is not one of {BRANCH_COMPUTE}; using 'exact'", stacklevel=1
    )
    _STATE.branch_compute = "exact"


def get_mode() -> str:
    """The current kernel mode (one of :data:`MODES`)."""
    return _STATE.mode


def set_mode(name: str) -> None:
    """Set the kernel mode for every adapter (see the module docstring)."""
    _set("mode", _checked(name, MODES, "kernel mode"))


def branch_compute() -> str:
    """How an adapter's branch computes a prompt on an unquantized (float32) or HQQ base in the fused
    layer call of inference, eager (:data:`BRANCH_COMPUTE`; ``$LORDBA_BRANCH_COMPUTE``, default ``exact``):

    * ``exact`` (the library's default): float32, bit for bit the base layer then the training form's
      branch (a saved and reloaded adapter gives the trained model's logits exactly).
    * ``fast``: on the CPU's tile unit (AMX-BF16, where the build has it and Linux grants it) in
      bfloat16 with float32 sums, as q4's ``fast`` prefill computes its branch: within bfloat16
      rounding of ``exact`` (~0.3% of the branch's own size; the base's product stays float32), at
      about half the float32 branch's cost (docs/kernels.md), for ``2·r·in + 64·⌈r/32⌉·out`` bytes a
      layer kept while the adapter is active; from 16 tokens on. Elsewhere, and under ``torch.compile``,
      as ``exact``.

    q4 layers follow their own ``compute``; one token (decode) is float32 either way. The setting is the
    process's (as :func:`get_mode`), not a thread's. ``lordba generate`` / ``lordba chat`` run ``fast``
    unless told otherwise (``--branch-compute``, ``$LORDBA_BRANCH_COMPUTE``)."""
    return _STATE.branch_compute


def set_branch_compute(name: str) -> None:
    """Set :func:`branch_compute` for every adapted layer (read on every call).

    Raises:
        ConfigError: ``name`` is not one of :data:`BRANCH_COMPUTE`.
    """
    _set("branch_compute", _checked(name, BRANCH_COMPUTE, "branch compute"))


def _checked(name: str, allowed: tuple[str, ...], what: str) -> str:
    """``name``, where it is one of ``allowed``; else a :class:`~lordba.errors.ConfigError` naming ``what``."""
    from lordba.errors import ConfigError

    if name not in allowed:
        raise ConfigError(f"{what} must be one of {allowed}, got {name!r}")
    return name


def _set(setting: str, value: str) -> None:
    """Set ``setting`` now, for the process: within the calling thread's innermost open block of it (restored
    when that block ends), else for good (the value restored once every open block of it has ended). Writing it
    into the newest block of any thread let another thread's block take the value, and that block's end undo a
    lasting setting or the calling thread's own block's."""
    with _BLOCKS_LOCK:
        own = [entry for entry in _BLOCKS if entry[0] == setting and entry[2] == threading.get_ident()]
        if own:
            own[-1][1] = value
        elif setting in _OUTSIDE:  # other threads' blocks are open
            _OUTSIDE[setting] = value
        setattr(_STATE, setting, value)


@contextlib.contextmanager
def _block(setting: str, value: str) -> Iterator[None]:
    """Hold ``setting`` at ``value`` for the block (``value`` checked by the caller: :func:`_checked`). Blocks of
    several threads need not nest: one that ends gives the setting to the newest block still open, and the last
    one to end restores the value from before the first (restoring the value each saw on entry left, when two
    threads' blocks ended in the order they began, the first block's value in force for good)."""
    entry = [setting, value, threading.get_ident()]
    with _BLOCKS_LOCK:
        if not any(held[0] == setting for held in _BLOCKS):
            _OUTSIDE[setting] = getattr(_STATE, setting)
        _BLOCKS.append(entry)
        setattr(_STATE, setting, value)
    try:
        yield
    finally:
        with _BLOCKS_LOCK:
            del _BLOCKS[next(k for k, held in enumerate(_BLOCKS) if held is entry)]
            still = [held[1] for held in _BLOCKS if held[0] == setting]
            setattr(_STATE, setting, still[-1] if still else _OUTSIDE.pop(setting))


@contextlib.contextmanager
def with_branch_compute(name: str) -> Iterator[None]:
    """Run the block with :func:`branch_compute` ``name``, then restore the previous one.

    Raises:
        ConfigError: ``name`` is not one of :data:`BRANCH_COMPUTE`.
    """
    with _block("branch_compute", _checked(name, BRANCH_COMPUTE, "branch compute")):
        yield


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Run the block in kernel mode ``name``, then restore the previous mode (the process's setting: blocks of
    several threads at once need not nest, :func:`_block`).

    Raises:
        ConfigError: ``name`` is not one of :data:`MODES`.
    """
    with _block("mode", _checked(name, MODES, "kernel mode")):
        yield


@torch.compiler.disable
def load_cpu(build: bool = True, warn: bool = True) -> BuildResult:
    """Load the CPU extension, compiling it first if needed and ``build``; remembered for the process
    once it has loaded or a build was attempted. Warns (:class:`KernelFallbackWarning`) on failure.

    One thread loads; the others wait for it. The result is remembered last, once the ops are bound: callers
    read it without the lock (a thread that called in between found it set and the op still ``None``)."""
    from lordba.kernels import cpu

    if _STATE.cpu is not None:
        return _STATE.cpu
    with _LOAD_LOCK:
        if _STATE.cpu is not None:
            return _STATE.cpu
        result = cpu.load(build=build)
        if result.ok:
            from lordba.kernels import _fake, q4

            _fake.register_cpu()  # shapes for torch.compile
            q4.register_fakes()

            _STATE.isa = torch.ops.lordba.isa()
            _STATE.openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
            _STATE.op = torch.ops.lordba.branch.default
            _STATE.rows_op = torch.ops.lordba.branch_rows.default
            _STATE.attention_op = torch.ops.lordba.decode_attention.default
        if result.ok or build:
            _STATE.cpu = result
        if not result.ok and build and warn:
            warnings.warn(
                f"lordba: compiled CPU kernels unavailable ({result.message.splitlines()[0]}); using the "
                "pure-PyTorch branch (slower at decode). `lordba build-kernels` shows the details.",
                KernelFallbackWarning,
                stacklevel=3,
            )
    return result


def _after_fork_in_child() -> None:
    """In a forked child of a process that loaded the compiled CPU kernels: one torch thread, where torch runs
    OpenMP with more. GNU OpenMP's thread pool does not survive ``fork`` (its threads are gone, its records of
    them are not): the child's first parallel loop, the kernels' or torch's own, waited for them for ever (a
    q4 model called in a plain ``os.fork()`` or a ``multiprocessing`` "fork" worker hung on its first layer).
    As PyTorch's DataLoader does for its workers; the child may set another count (at that risk).

    A fork while another thread loaded (or built) the kernels left the child's load lock held by a thread it does
    not have: its first kernel call waited for ever. The child gets a new lock (its own load then waits for the
    parent's build on the build directory's file lock, and loads that build)."""
    global _LOAD_LOCK
    if _STATE.cpu is not None and _STATE.cpu.ok and _STATE.openmp and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    if not _LOAD_LOCK._is_owned():  # held by a thread the child does not have: it would never be released
        _LOAD_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_branch_op(x: torch.Tensor, base: torch.Tensor) -> object | None:
    """The compiled CPU op ``lordba::branch`` if :func:`packed_branch` would run it for ``x`` and
    ``base`` in the current mode (callers that keep its arguments call it directly: one op call per
    layer and token, nothing else), else ``None``."""
    if _STATE.mode not in CPU_MODES or not x.is_cpu or base.requires_grad:
        return None
    if x.dtype not in _NATIVE_DTYPES or base.dtype not in _NATIVE_DTYPES or not cpu_available():
        return None
    return _STATE.op


def decode_attention_op() -> object | None:
    """``lordba::decode_attention`` (one query position over a float32 / float16 / bfloat16 KV cache)
    when the compiled CPU kernels are loaded already (this never builds them: it runs inside
    traced forwards), else ``None``."""
    return _STATE.attention_op


def bound_calls() -> object | None:
    """The bound kernel calls' module (:mod:`lordba.kernels.cpu.bound`: ``Q4Call``, ``LayerCall``) where the CPU
    kernels and that extension load (building them if needed), else ``None`` (callers use ``torch.ops``)."""
    if not cpu_available():
        return None
    from lordba.kernels.cpu import bound

    return bound.module()


def cpu_available() -> bool:
    """Whether the compiled CPU kernels are loaded (building them on first call)."""
    result = _STATE.cpu
    if result is None:
        result = load_cpu()
    return result.ok


def preload(device: torch.device) -> None:
    """Load (building if needed) the CPU kernels now if the current mode runs them on ``device``, or on a
    CUDA device find out whether Triton's can run: what builds or moves a layer calls it, since tracing
    (``torch.export``, ``torch.compile``) cannot (the loaders are compiler-disabled). Nothing happens in
    the ``torch`` mode on the CPU, nor on other devices."""
    if device.type == "cpu" and _STATE.mode in CPU_MODES:
        cpu_available()
    elif device.type == "cuda":
        triton_available()


def cpu_isa() -> str:
    """The instruction set the CPU kernels were built for (``avx512``, ``avx2`` or ``portable``), after
    loading them if needed; ``portable`` when they are unavailable."""
    cpu_available()
    return _STATE.isa


@torch.compiler.disable
def _load_triton() -> bool:
    from lordba.kernels import triton as tri

    _STATE.triton = tri.available()
    return _STATE.triton


def triton_available() -> bool:
    """Whether the Triton kernels can run (``triton`` importable and a CUDA device present)."""
    return _STATE.triton if _STATE.triton is not None else _load_triton()


def sign_max_tokens(in_features: int, out_features: int, r: int, dtype: torch.dtype, isa: str | None = None) -> int:
    """``auto`` rule on CPU: the fused sign path for at most this many tokens, unpack + BLAS above.

    Crossovers measured on a Xeon (Sapphire Rapids), one thread, float32 and bfloat16, shapes of
    SmolLM2 and Llama-7B, r ∈ {8, 16, 64} (see docs/kernels.md). With AVX-512 the masked-add sign
    path wins up to ~16-24 float32 tokens (~32 at ``in`` = 4096), and about twice that in
    bfloat16, whose small BLAS calls are slow. The AVX2 build wins at a single float32 token only.
    ``isa``: ``torch.ops.lordba.isa()``.
    """
    isa = isa or _STATE.isa
    low = dtype != torch.float32
    if isa == "avx512":
        limit = 32 if 2048 < in_features <= 4096 else 16
        return 2 * limit if low else limit
    if low:
        return 16 if in_features <= 2048 else 4
    return 1


def dispatch_limit(in_features: int, out_features: int, r: int, dtype: torch.dtype, name: str | None = None) -> int:
    """The ``sign_max_tokens`` argument of the CPU op for kernel mode ``name`` (default: the current
    mode): everything on the sign path in ``sign``, nothing in ``unpack``, else :func:`sign_max_tokens`.
    Callers that run often (the adapter modules) keep the result per ``(mode, dtype)``."""
    name = name or _STATE.mode
    if name == "sign":
        return _ALL_TOKENS
    if name == "unpack":
        return -1
    if _STATE.cpu is None:
        cpu_available()  # the rule depends on the instruction set the kernels were built for
    return sign_max_tokens(in_features, out_features, r, dtype)
