"""The frozen base ``lordba generate``, ``chat`` and ``serve`` run adapters on, loaded from a transformers folder:
its tokenizer, and the model quantized per the options that chose it (a cache hit built without the float model,
:mod:`lordba.quant.skeleton`; else ``from_pretrained``, then :func:`~lordba.quant.cache.quantize_model_cached`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lordba._util.dtypes import DTYPES
from lordba.errors import ConfigError
from lordba.quant.quantize import QUANT_BACKENDS


def load_base(
    model_dir: str | Path,
    dtype: str = "float32",
    quant: str = "none",
    bits: int = 4,
    group_size: int = 64,
    q4_compute: str | None = None,
    check_tokenizer: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the local transformers folder ``model_dir``: the model loaded in ``dtype`` (a name of
    :data:`~lordba._util.dtypes.DTYPES`), in eval mode, its parameters frozen and its linear layers quantized per
    ``quant`` (``q4``, ``hqq``, ``bnb`` or ``none``: left unquantized) with ``bits`` and ``group_size``
    (:func:`~lordba.quant.quantize_model`; a q4 or HQQ base cached on disk, and on a cache hit built without the float
    model), the q4 base computing per ``q4_compute`` (None: its default). Errors name the folder as ``--model
    model_dir``. ``check_tokenizer``: called with the tokenizer before the model is read (what it raises, a command's
    refusal of a tokenizer, comes without waiting for a large base to load).

    Raises:
        ConfigError: an unknown ``dtype``; a folder without ``config.json``, or one transformers cannot load (a config
            that is not JSON, no tokenizer); a quantization ``quantize_model`` refuses (an unknown ``quant``, ``bits``
            or ``group_size`` the backend does not take, a weight it cannot quantize).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lordba.quant.cache import quantize_model_cached
    from lordba.quant.skeleton import load_cached_base

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quant not in QUANT_BACKENDS:  # before the float model is read, not after
        raise ConfigError(f"quantization backend must be one of {QUANT_BACKENDS}, got {quant!r}")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a transformers model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # transformers' errors for a folder it cannot read
        raise _unreadable(model_dir, err) from None
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    try:
        # a cache hit: the quantized base without the float model (its peak memory), else the float model quantized
        model = load_cached_base(path, DTYPES[dtype], quant, bits, group_size, q4_compute)
        cached = model is not None
        if not cached:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    except (OSError, ValueError) as err:  # transformers' errors for a folder it cannot read
        raise _unreadable(model_dir, err) from None
    if not cached:  # (quant "none": its parameters frozen, as the quantized bases' are)
        model = quantize_model_cached(model, path, quant, bits, group_size, compute=q4_compute)
    return model, tokenizer


def _unreadable(model_dir: str | Path, err: Exception) -> ConfigError:
    """The error for a model folder transformers cannot read (``err``: its OSError or ValueError)."""
    return ConfigError(f"--model {model_dir}: transformers cannot load it ({type(err).__name__}: {err})")
