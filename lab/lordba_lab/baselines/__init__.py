"""Low-bit LoRA baselines that LoRDBA is compared with at matched bytes (SPEC §5).

Each takes a trained LoRA's factors ``A`` (r×in) and ``B`` (out×r) and returns dequantized factors
plus the bytes their storage needs, group scales included (LoRAQuant's paper leaves those out of
its bit counts; we count them so that bytes compare honestly with LoRDBA's files).

* :func:`rtn`: round-to-nearest, asymmetric min-max per group, 1–8 bits.
* :func:`loraquant`: LoRAQuant-style (arXiv 2510.26690): SVD split into a higher-bit head and a
  1-bit (sign × mean|·| per group) tail.
* :func:`bitdelta`: BitDelta-style sign × one scale per matrix (L2-optimal mean |·|).
* :func:`svd_truncate`: the fp16 LoRA cut to a smaller rank by SVD (matched bytes, no training).
"""

from lordba_lab.baselines.quantizers import QuantizedLoRA, bitdelta, loraquant, rtn, svd_truncate

__all__ = ["QuantizedLoRA", "bitdelta", "loraquant", "rtn", "svd_truncate"]
