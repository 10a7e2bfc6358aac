"""Fleets of distinct adapters for the ``serve`` suite, and the PEFT baseline's server parts.

LoRDBA adapters: one random r=16 adapter on every linear layer of the model (int8 scales, the
≥10×-smaller configuration), then ``n`` variants of it, each with 5% of its signs flipped and its
middle scales jittered by ±20%, so that every adapter's outputs differ. PEFT: fp16-style LoRA
adapters of the same rank and targets with random factors, held as PEFT holds them (the base's
float32), served by the same engine through PEFT's own ``adapter_names`` mixed batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.core.packing import pack_signs, unpack_signs
from lordba.format.adapter import AdapterState, ModuleRecord
from lordba.serve.errors import UnknownAdapterError

RANK = 16
TARGETS = "all-linear"
SCALE_DTYPE = "int8"


def make_fleet(model_dir: Path, out: Path, n: int, seed: int = 0, progress: bool = True) -> list[str]:
    """Write ``n`` distinct adapters ``adapter-0000`` … into ``out``; returns their names. ``progress``: a bar of the
    adapters written (a thousand are 1 GB), shown where stderr is a terminal."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoRDBAConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS, init="random", scale_dtype=SCALE_DTYPE)
    state = get_lordba_model(base, config).adapter_state("default")
    names = []
    # (disable=None: tqdm's off where its output is no terminal, a bench's log)
    for i in tqdm(range(n), desc="writing the adapter fleet", unit="adapter", disable=None if progress else True):
        name = f"adapter-{i:04d}"
        if not (out / name / "adapter_config.json").is_file():
            _variant(state, torch.Generator().manual_seed(seed * 100_003 + i)).save_pretrained(out / name)
        names.append(name)
    return names


def _variant(state: AdapterState, g: torch.Generator) -> AdapterState:
    """``state`` with 5% of each module's signs flipped and its middle scales jittered."""
    modules = {}
    for path, rec in state.modules.items():
        t = dict(rec.tensors)
        t["sign_A"] = _flip(t["sign_A"], (rec.r, rec.in_features), g)
        t["sign_B"] = _flip(t["sign_B"], (rec.out_features, rec.r), g)
        jitter = 1.0 + 0.2 * (2 * torch.rand(t["scale_mid"].shape, generator=g) - 1)
        t["scale_mid"] = (t["scale_mid"].float() * jitter).to(t["scale_mid"].dtype)
        modules[path] = ModuleRecord(rec.path, rec.in_features, rec.out_features, rec.r, t)
    return AdapterState(state.config, modules)


def _flip(packed: torch.Tensor, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    signs = unpack_signs(packed, shape)
    flip = torch.rand(shape, generator=g) < 0.05
    return pack_signs(torch.where(flip, -signs, signs))


def peft_fleet(model_dir: Path, n: int, seed: int = 0) -> tuple[Any, list[str], int]:
    """``(PeftModel with n random LoRA adapters, their names, bytes per adapter)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    names = [f"adapter-{i:04d}" for i in range(n)]
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.eval()
    per_adapter = sum(p.numel() * p.element_size() for k, p in model.named_parameters() if f".{names[0]}." in k)
    return model, names, per_adapter


class PeftRegistry:
    """The registry interface of :class:`lordba.serve.registry.AdapterRegistry` over a PeftModel
    whose adapters are all resident (PEFT has no LRU): what the engine's server needs, no more."""

    def __init__(self, model: Any, names: list[str]) -> None:
        self.model, self._names = model, set(names)
        self.loads = self.evictions = 0

    def check_name(self, name: str, param: str = "model") -> str:
        """``name`` (any string; unknown ones fail in :meth:`acquire`)."""
        return name

    def acquire(self, name: str) -> None:
        """Nothing to load; unknown names are a 404 as in the real registry."""
        if name not in self._names:
            raise UnknownAdapterError(f"The model '{name}' does not exist")

    def acquire_resident(self, name: str) -> bool:
        """Every adapter of the fleet is resident: :meth:`acquire`, True."""
        self.acquire(name)
        return True

    def release(self, name: str) -> None:
        """Nothing to release."""

    def names(self) -> list[str]:
        """The adapters' names."""
        return sorted(self._names)

    def is_resident(self, name: str) -> bool:
        """Every adapter of the fleet is on the model (a request loads nothing)."""
        return name in self._names

    def resident(self) -> dict[str, int]:
        """Not tracked for PEFT (its bytes per adapter are reported by :func:`peft_fleet`)."""
        return {}

    def redact(self, text: object) -> str:
        """``text`` as it is (no adapter folder to hide)."""
        return str(text)
