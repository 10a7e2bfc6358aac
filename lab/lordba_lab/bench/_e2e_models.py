"""The PyTorch variants of the ``e2e`` suite: one model on several bases, each plain, with a packed
LoRDBA adapter and with the same adapter as a PEFT LoRA; the prompt; the logits checks.

One random LoRDBA adapter (r, all seven projections, int8 scales) is saved once; every LoRDBA
variant loads it from that file as a server would (packed, compact scales); its ``lordba
export-lora`` copy (float16 factors) is the PEFT LoRA of every base and, converted by llama.cpp, the
llama.cpp LoRA, so all adapters compute the same ΔW.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lordba._util.modules import cache_keyword
from lordba.errors import ConfigError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASES = ("none", "q4", "hqq")  # "none": the float32 base
SCALE_DTYPE = "int8"
# A random adapter with alpha = 2r changes SmolLM2's logits by ~160% of their norm (a broken model,
# whose outputs amplify any base difference); alpha = 4 at r = 16 keeps the change of the order a
# fine-tune makes. Timings do not depend on it.
ALPHA = 4.0
TEXT = (
    "The river ran through the old town, past the mill and the market square, where the bakers opened their "
    "shops before dawn and the first carts rolled in from the farms. "
)


def base_label(base: str) -> str:
    """``fp32`` for the unquantized base, else the backend's name."""
    return "fp32" if base == "none" else base


def prompt_ids(tokenizer: object | None, length: int, vocab: int) -> list[int]:
    """``length`` token ids: :data:`TEXT` tokenized and repeated (or fixed random ids below
    ``min(vocab, 1000)`` when there is no tokenizer, e.g. a tiny test model)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, min(vocab, 1000), (length,), generator=g).tolist()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return (ids * (length // len(ids) + 1))[:length]


def quantized(model: nn.Module, base: str, source: Path | None) -> nn.Module:
    """A copy of ``model`` on ``base`` (4-bit, group 64; cached when ``source``, its folder, is known).

    Raises :class:`ConfigError` for a base not in :data:`BASES`."""
    if base not in BASES:
        raise ConfigError(f"e2e base must be one of {BASES}, got {base!r}")
    model = copy.deepcopy(model)
    if base == "none":
        return model
    from lordba.quant import quantize_model
    from lordba.quant.cache import quantize_model_cached

    if source is not None:
        return quantize_model_cached(model, source, backend=base, bits=4, group_size=64)
    return quantize_model(model, backend=base, bits=4, group_size=64)


def save_adapters(model: nn.Module, r: int, folder: Path, alpha: float = ALPHA) -> tuple[Path, Path]:
    """Save a random LoRDBA adapter of rank ``r`` (scaling ``alpha / r``) for ``model`` and its PEFT
    LoRA export under ``folder``; returns ``(lordba_dir, peft_dir)``."""
    from lordba.config import LoRDBAConfig
    from lordba.convert.export import export_lora
    from lordba.nn.model import get_lordba_model

    torch.manual_seed(0)
    cfg = LoRDBAConfig(r=r, alpha=alpha, target_modules=TARGETS, init="random", scale_dtype=SCALE_DTYPE)
    trained = get_lordba_model(copy.deepcopy(model), cfg)
    lordba_dir, peft_dir = folder / "lordba", folder / "peft"
    trained.save_pretrained(lordba_dir)
    export_lora(lordba_dir, peft_dir, dtype="float16")
    return lordba_dir, peft_dir


def _peft(model: nn.Module, peft_dir: Path) -> nn.Module:
    """``model`` with the PEFT LoRA of ``peft_dir`` (lordba's q4 layers registered as PEFT custom
    modules: PEFT wraps them with its ordinary LoRA ``Linear``, ``base_layer(x) + B(A(x))·s``)."""
    from peft import LoraConfig, PeftModel

    from lordba.train._peft_q4 import custom_modules

    cfg = LoraConfig.from_pretrained(str(peft_dir))
    cfg._register_custom_module(custom_modules())
    return PeftModel.from_pretrained(model, str(peft_dir), config=cfg)


FAST = " fast"  # suffix of the variants run with the `fast` branch compute (a prompt's branch on the tile unit)
FAST_BASES = ("none", "hqq")  # the bases whose fused call follows lordba.kernels.branch_compute


class FastBranch(nn.Module):
    """``model`` called with :func:`lordba.kernels.branch_compute` ``fast``: a float32 / HQQ base's prompt
    branch in bfloat16 on the CPU's tile unit (the same model object as its ``exact`` variant)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object, **kwargs: object) -> object:
        from lordba import kernels

        with kernels.with_branch_compute("fast"):
            return self.model(*args, **kwargs)


def variants(
    model: nn.Module, bases: tuple[str, ...], lordba_dir: Path, peft_dir: Path, source: Path | None
) -> dict[str, nn.Module]:
    """``{"<base>", "<base>+LoRDBA", "<base>+LoRA"}`` for every base, in eval mode, and ``"<base>+LoRDBA fast"``
    (:class:`FastBranch`) for the bases of :data:`FAST_BASES` where the tile unit runs."""
    from lordba.kernels.q4 import amx_prefill_available
    from lordba.nn.model import LoRDBAModel

    out: dict[str, nn.Module] = {}
    for base in bases:
        name = base_label(base)
        out[name] = quantized(model, base, source).eval()
        out[f"{name}+LoRDBA"] = LoRDBAModel.from_pretrained(quantized(model, base, source), lordba_dir).eval()
        out[f"{name}+LoRA"] = _peft(quantized(model, base, source), peft_dir).eval()
        if base in FAST_BASES and amx_prefill_available():
            out[f"{name}+LoRDBA{FAST}"] = FastBranch(out[f"{name}+LoRDBA"])
    return out


def last_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Float32 logits of the last position after ``ids`` (no cache)."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def closeness(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How close logits ``a`` are to the reference ``b``: relative L2 error, cosine, top-1 agreement."""
    a, b = a.double(), b.double()
    return {
        "rel_l2": float((a - b).norm() / b.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "top1_same": bool(a.argmax() == b.argmax()),
    }


COMPILED = " compiled"  # suffix of the variants whose decode step is compiled (static cache + inductor)


def compiled_variants(
    model: nn.Module, bases: tuple[str, ...], lordba_dir: Path, source: Path | None
) -> dict[str, nn.Module]:
    """``{"<base> compiled", "<base>+LoRDBA compiled"}`` for every base: models of their own (as
    :func:`variants` builds them) whose transformers model's forward is ``torch.compile``'d
    (inductor, default mode, static shapes) on :mod:`lordba.nn.attention`'s attention, as ``lordba
    generate --compile`` runs the decode step."""
    from lordba.nn.attention import use_packed_gqa
    from lordba.nn.model import LoRDBAModel

    out: dict[str, nn.Module] = {}
    for base in bases:
        name = base_label(base)
        plain = quantized(model, base, source).eval()
        wrapped = LoRDBAModel.from_pretrained(quantized(model, base, source), lordba_dir).eval()
        for key, m in ((name, plain), (f"{name}+LoRDBA", wrapped)):
            inner = m.get_base_model() if isinstance(m, LoRDBAModel) else m
            use_packed_gqa(inner)
            inner.forward = torch.compile(inner.forward, dynamic=False)
            out[f"{key}{COMPILED}"] = m
    return out


AOT = " aot"  # suffix of the variants whose decode step is compiled ahead of time (AOTInductor)


class AotStep:
    """One decode step of ``model`` compiled ahead of time (:class:`lordba.nn.aot.AotDecode`, cache of
    ``length`` positions, so as tight as llama.cpp's context), the cache holding ``prompt`` (prefilled
    eagerly); the same ``step`` / ``back`` as :class:`StaticDecode`. ``model`` itself is not changed
    beyond its attention implementation (:func:`lordba.nn.attention.use_packed_gqa`: the same results).

    Raises ``RuntimeError`` when exporting or compiling fails."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, length: int) -> None:
        from lordba.nn.aot import AotDecode

        self.decode = AotDecode(model, round_to=length)
        if not self.decode.prepare(length):
            raise RuntimeError(f"ahead-of-time compiling failed: {self.decode.failure}")
        self.decode.prefill(prompt)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, 1, vocab]`` of ``token`` after the cached context (the cache then holds it too)."""
        return self.decode.step(int(token.reshape(-1)[0])).reshape(1, 1, -1)

    def back(self) -> None:
        """Forget the last step's position."""
        self.decode.back()


class StaticDecode:
    """One decode step of ``model`` on a static KV cache (of ``length`` positions) holding ``prompt``;
    :meth:`back` undoes a step, so every timed step sees the same context."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, length: int, prefill: nn.Module | None = None) -> None:
        """``prefill``: the model that fills the cache with the prompt (default ``model``; the eager
        model of a compiled one, so that the prompt's shape is never compiled)."""
        from transformers import StaticCache

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.cache = StaticCache(config=inner.config, max_cache_len=length)
        self.kv = {cache_keyword(model): self.cache}  # (the model's name for it, looked up once: not in a timed step)
        (prefill or model)(input_ids=prompt, use_cache=True, logits_to_keep=1, **self.kv)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits of ``token`` after the cached context (the cache then holds it too)."""
        return self.model(input_ids=token, use_cache=True, **self.kv).logits

    def back(self) -> None:
        """Forget the last step's position."""
        for layer in self.cache.layers:
            layer.cumulative_length.sub_(1)
