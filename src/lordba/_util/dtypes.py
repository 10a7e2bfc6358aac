"""The floating-point dtype names lordba accepts (scale storage, latents, export), mapped to torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
