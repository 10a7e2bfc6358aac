"""The :class:`BaseBackend` protocol and its registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lordba._util.arena import pinned_storages
from lordba.kernels import bound_calls, branch_compute, cpu_available
from lordba.kernels.q4 import amx_prefill_available


class BaseBackend:
    """How the adapter talks to one kind of frozen base linear layer.

    Merging: :meth:`merge` returns the base layer computing with ``W + delta``. In-place backends
    (``in_place_merge = True``) modify and return the same module, and :meth:`unmerge` subtracts the
    delta again. Quantized backends return a new, requantized module (merging into a low-bit weight
    is lossy); the adapter layer then keeps the original module and restores it on unmerge, which
    is exact.
    """

    name = "abstract"
    in_place_merge = True
    bits: float = 32.0

    def matches(self, module: nn.Module) -> bool:
        """True if this backend handles ``module``."""
        raise NotImplementedError

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base layer."""
        return int(module.in_features), int(module.out_features)

    def weight_device(self, module: nn.Module) -> torch.device:
        """Device of the base layer's weight (the adapter is created there)."""
        return next(iter(module.parameters()), torch.empty(0)).device

    def adopt(self, module: nn.Module) -> None:
        """Make ``module`` fit to carry adapters, in place, its outputs unchanged (called when a layer wraps it):
        nothing here; bitsandbytes' NF4 layers leave the CPU kernel that has no backward."""

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight as a dense float32 ``out × in`` tensor."""
        raise NotImplementedError

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        """The base layer with the dense ``out × in`` ``delta`` added to its weight."""
        raise NotImplementedError

    def unmerge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        """Undo an in-place :meth:`merge` of the same ``delta`` (in-place backends only)."""
        raise NotImplementedError

    def bits_per_weight(self, module: nn.Module) -> float:
        """Storage bits per weight of the base layer (reported in benchmarks)."""
        return self.bits

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        """The base quantization of ``module`` as an adapter's config records it
        (``{"backend", "bits", "group_size"}``), or ``None`` for an unquantized layer."""
        return None

    def fused_branch(
        self, module: nn.Module, x: torch.Tensor, tensors: tuple, scaling: float, limit: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A callable ``f(x)`` computing ``module(x)`` plus one packed adapter branch (``tensors``: its
        ``(sign_A, sign_B, b, m, a)`` as the CPU op takes them; ``scaling``; ``limit``: its dispatch
        limit, ``sign_max_tokens``) in one kernel call, the two calls' result up to float rounding (bit
        for bit where the op adds the branch after the base's own product); ``None`` (the default)
        where this backend has no such op for ``x``. Decode keeps it between tokens."""
        return None

    def bound_branch(
        self, module: nn.Module, tensors: tuple, scaling: float, limit: int, checks: tuple, call: Callable
    ) -> Any:
        """:meth:`fused_branch`'s ``call`` as a bound call (:mod:`lordba.kernels.cpu.bound`'s ``LayerCall``, made with
        ``checks``: the model call's token, the epoch list and value, the input's dtype and the hook dicts): the same
        op call with the same arguments, passing to ``call`` the prompts it computes otherwise (kept factors);
        ``None`` (the default) where this backend has none."""
        return None


class PlainLinear(BaseBackend):
    """An unquantized ``nn.Linear``: merge adds the delta to the weight in place. Not ``nn.MultiheadAttention``'s
    ``out_proj`` (a ``NonDynamicallyQuantizableLinear``): the attention computes with its weight and never calls it,
    so an adapter there would change nothing until merged (:data:`NEVER_CALLED`)."""

    name = "none"

    def matches(self, module: nn.Module) -> bool:
        if type(module) is NEVER_CALLED:
            return False
        return type(module) is nn.Linear or (isinstance(module, nn.Linear) and _plain_weight(module))

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(module.weight + delta)  # summed in float32 (or the weight's wider dtype), rounded once
        return module

    def unmerge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(module.weight - delta)
        return module

    def bits_per_weight(self, module: nn.Module) -> float:
        return 8.0 * module.weight.element_size()

    def fused_branch(
        self, module: nn.Module, x: torch.Tensor, tensors: tuple, scaling: float, limit: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``lordba::linear_branch`` (the layer's product and the branch in one op call per layer and
        token: one float32 token in the op's own GEMV with the branch added block by block, equal to the
        two calls up to float32 rounding; otherwise ``at::linear`` and the branch added into its output,
        bit for bit, or for a prompt under the ``fast`` branch compute in bfloat16 on the tile unit:
        :func:`prompt_tiles`) for an ``nn.Linear`` itself (a subclass may compute otherwise) on the CPU, with
        ``x`` of its weight's dtype; weight and bias read where they are held on every call (in-place
        merges, ``.to()``)."""
        params = module._parameters
        weight = params.get("weight")
        if type(module) is not nn.Linear or weight is None or not (x.is_cpu and weight.is_cpu):
            return None
        op = linear_branch_op()
        if x.dtype != weight.dtype or op is None:
            return None
        tiles = prompt_tiles(tensors, scaling, limit)

        def call(x: torch.Tensor) -> torch.Tensor:
            return op(x, params["weight"], params["bias"], *tensors, scaling, limit, *tiles(x))

        return call

    def bound_branch(
        self, module: nn.Module, tensors: tuple, scaling: float, limit: int, checks: tuple, call: Callable
    ) -> Any:
        """``lordba::linear_branch`` bound; a prompt that may take the tile unit's factors goes to ``call``."""
        weight, bound = module._parameters.get("weight"), bound_calls()
        dtype = checks[3]  # (token, epoch list, epoch, the input's dtype, hook dicts)
        if bound is None or type(module) is not nn.Linear or weight is None or weight.dtype != dtype:
            return None
        below = min(tile_elements(limit, int(tensors[2].numel())), 1 << 62)  # (an int64 for C++)
        return bound.LayerCall.linear(checks, module._parameters, tensors, scaling, limit, below, call)


def linear_branch_op() -> object | None:
    """``lordba::linear_branch`` (a dense weight's product and one adapter branch in one call: the
    fused call of :class:`PlainLinear` and of HQQ layers), or ``None`` where the CPU kernels are absent."""
    if not cpu_available() or not hasattr(torch.ops.lordba, "linear_branch"):
        return None
    return torch.ops.lordba.linear_branch.default


def kept_factors(kept: list, tensors: tuple, make: Callable[[], tuple]) -> tuple:
    """``make()`` (an adapter's folded factors), kept in ``kept`` (``[key, factors, storages]``) while every
    tensor of ``tensors`` (the adapter's) is the same storage at the same version (in-place changes refold).
    The entry keeps the storages it was made from alive, so that a tensor replaced (``.data =``, which keeps
    the version counter) cannot hand its freed address to the next one and be taken for it. Tensors made
    under ``torch.inference_mode`` have no version counter: for them ``make()`` runs on every call."""
    if any(t.is_inference() for t in tensors):
        return make()
    key = tuple((t._version, t.data_ptr()) for t in tensors)
    found = kept[:]
    if found and found[0] == key:
        return found[1]
    factors = make()
    kept[:] = [key, factors, pinned_storages(tensors)]
    return factors


def tile_factors(tensors: tuple, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's folded factors ``A' = S_A diag(b)`` and ``B' = scaling · diag(a) S_B diag(m)`` (``tensors``:
    its ``(sign_A, sign_B, b, m, a)``) in bfloat16, packed for the CPU's tile unit (``lordba::tile_pack``)."""
    folded_A, folded_B = torch.ops.lordba.q4_prefill_factors(*tensors, scaling)
    return torch.ops.lordba.tile_pack(folded_A), torch.ops.lordba.tile_pack(folded_B)


TILE_MIN_TOKENS = 16  # lordba::linear_branch's tile path starts here (it works on blocks of 32 tokens)


def tile_elements(limit: int, in_features: int) -> int:
    """The input size (elements) from which a float32 prompt may take the tile unit's kept factors
    (:func:`prompt_tiles`; ``limit``: the adapter's dispatch limit)."""
    return max(limit + 1, TILE_MIN_TOKENS) * in_features


def prompt_tiles(tensors: tuple, scaling: float, limit: int) -> Callable[[torch.Tensor], tuple]:
    """For ``lordba::linear_branch``'s fused call: ``f(x)`` giving the adapter's :func:`tile_factors` (made
    at the first prompt, then kept while its tensors are unchanged: ``2·r·in + 64·⌈r/32⌉·out`` bytes, the
    rank padded to whole tile steps for ``B'``) for a float32 prompt ``x`` of more than ``limit`` and at
    least :data:`TILE_MIN_TOKENS` tokens when :func:`lordba.kernels.branch_compute` is ``fast`` and the
    tile unit runs, else ``()`` (the op's float32 branch). Never under ``torch.compile``."""
    kept: list = []
    in_features = int(tensors[2].numel())  # b
    from_elements = tile_elements(limit, in_features)

    def tiles(x: torch.Tensor) -> tuple:
        if torch.compiler.is_compiling() or branch_compute() != "fast":
            return ()
        if x.dtype != torch.float32 or x.numel() < from_elements or not amx_prefill_available():
            return ()
        return kept_factors(kept, tensors, lambda: tile_factors(tensors, scaling))

    return tiles


NEVER_CALLED = nn.modules.linear.NonDynamicallyQuantizableLinear  # nn.MultiheadAttention's out_proj


def _plain_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point()


_BACKENDS: list[BaseBackend] = []
_PLAIN = PlainLinear()


def register_backend(backend: BaseBackend) -> None:
    """Add a backend; later registrations are tried first (before the plain ``nn.Linear``)."""
    _BACKENDS.insert(0, backend)


def resolve_backend(module: nn.Module) -> BaseBackend | None:
    """The backend that handles ``module``, or ``None`` if it is no supported linear layer."""
    for backend in _BACKENDS:
        if backend.matches(module):
            return backend
    return _PLAIN if _PLAIN.matches(module) else None
