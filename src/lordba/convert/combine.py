"""Dense ΔW → LoRDBA, for combinations of adapters that are not an exact concatenation
(``LoRDBAModel.add_weighted_adapter`` with ``"linear"``, ``"svd"``, or a ``"cat"`` whose outer scales
differ): each module's weighted ΔW is factorised by a truncated SVD into a LoRA pair of the target
rank (balanced, ``B = U √Σ``, ``A = √Σ Vᵀ``) and converted by the converter's solver, as a trained
LoRA would be. Registered into :mod:`lordba.nn.model_peft` at import (``nn`` does not import ``convert``).
"""

from __future__ import annotations

import torch

from lordba.convert.groups import SolverOptions
from lordba.convert.layers import convert_layers
from lordba.convert.peft_reader import LoraAdapter, LoraLayer
from lordba.core.packing import unpack_signs
from lordba.core.scales import get_codec
from lordba.errors import ConversionError
from lordba.format.header import ModuleRecord
from lordba.nn.model_combine import register_combiner


def lora_from_delta(path: str, delta: torch.Tensor, r: int, scaling: float) -> LoraLayer:
    """A rank-``r`` LoRA pair with ``scaling · B A`` the best rank-``r`` approximation of ``delta``
    (``out × in``; the rank is capped at ``min(in, out)``). Raises :class:`ConversionError` for a
    non-finite ``delta``."""
    if not bool(torch.isfinite(delta).all()):
        raise ConversionError(f"module {path!r}: the combined ΔW holds NaN or infinite values")
    U, S, Vh = torch.linalg.svd(delta.double() / scaling, full_matrices=False)
    k = min(r, S.numel())
    root = S[:k].sqrt()
    B, A = (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()
    if k < r:  # a rank above min(in, out): pad with zero directions (the solver keeps them harmless)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])])
    return LoraLayer(path, A, B, r, scaling * r, scaling)


def combine_dense(
    deltas: dict[str, torch.Tensor],
    ranks: dict[str, int],
    scalings: dict[str, float],
    scale_dtype: str,
    options: SolverOptions | None = None,
) -> tuple[dict[str, ModuleRecord], dict[str, float]]:
    """Stored records fitting each dense ``deltas[path]`` at ``ranks[path]`` with scaling
    ``scalings[path]``, and each module's relative Frobenius error ``‖ΔW − ΔŴ‖ / ‖ΔW‖``."""
    layers = {p: lora_from_delta(p, d.float(), ranks[p], scalings[p]) for p, d in sorted(deltas.items())}
    lora = LoraAdapter(layers, max(ranks.values()), 1.0, False, None, "add_weighted_adapter")
    opts = options or SolverOptions()
    records, _ = convert_layers(lora, ranks, scalings, scale_dtype, opts, None, 32, None)
    return records, {p: _relative_error(deltas[p], records[p], scalings[p], scale_dtype) for p in records}


def _relative_error(delta: torch.Tensor, rec: ModuleRecord, scaling: float, scale_dtype: str) -> float:
    b, m, a = get_codec(scale_dtype).decode(rec.tensors["scale_in"], rec.tensors["scale_mid"], rec.tensors["scale_out"])
    sign_A = unpack_signs(rec.tensors["sign_A"], (rec.r, rec.in_features))
    sign_B = unpack_signs(rec.tensors["sign_B"], (rec.out_features, rec.r))
    approx = scaling * (a[:, None] * sign_B * m[None, :]) @ (sign_A * b[None, :])
    norm = float(delta.norm())
    return float((delta.float() - approx).norm()) / norm if norm > 0 else float(approx.norm())


register_combiner("dense", combine_dense)
