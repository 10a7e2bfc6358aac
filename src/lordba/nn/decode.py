"""Decode that is fast end to end: a static KV cache and ``torch.compile`` of the decode step, with
eager as the fallback.

On a CPU the q4 base computes a SmolLM2-135M token in ~10 ms; eager PyTorch adds more than that in
Python (30 transformers blocks, 210 linear calls). :class:`FastDecode` runs ``generate`` with
transformers' ``StaticCache`` (fixed shapes) and its automatic compilation of the decode step
(``compile_config``; inductor), on a plain transformers model or on a :class:`~lordba.nn.model.LoRDBAModel`
(whose ``generate`` publishes the routing and calls the wrapped model's, so the *wrapped* model's
forward is what compiles, through the ``lordba::q4_linear`` and ``lordba::branch`` ops' fake
implementations). Prefill stays eager (its length changes every call). A model on ``sdpa`` attention
is switched to :mod:`lordba.nn.attention`'s (grouped-query attention without copying the static
cache's key/value heads in the compiled step; same results).

The cache length is rounded up to a power of two (at least :data:`MIN_CACHE`), so a new prompt
length reuses the compiled step; a longer conversation compiles once per new length.
:meth:`FastDecode.prepare` compiles ahead (a two-token warm-up) and, if compiling fails, logs a
warning on the ``lordba.decode`` logger and falls back to eager decoding for good. Each routing /
enable state of a LoRDBA model gets its own graph (dynamo guards on it; see docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lordba._util.modules import context_positions
from lordba.errors import ConfigError
from lordba.nn.attention import use_packed_gqa
from lordba.nn.structure import uncompiled

log = logging.getLogger("lordba.decode")

MODES = ("default", "max-autotune-no-cudagraphs")
MIN_CACHE = 256


def cache_length(tokens: int, limit: int | None = None) -> int:
    """The static cache length for ``tokens`` positions: the next power of two, at least
    :data:`MIN_CACHE`, at most ``limit`` (the positions the model's config allows:
    :func:`lordba._util.modules.context_positions`) when that is
    enough.

    Raises:
        ConfigError: ``tokens`` is not positive.
    """
    if tokens <= 0:
        raise ConfigError(f"cache length: need a positive number of tokens, got {tokens}")
    length = max(MIN_CACHE, 1 << (int(tokens) - 1).bit_length())
    if limit is not None and tokens <= limit < length:
        return int(limit)
    return length


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model whose forward ``generate`` compiles (a LoRDBAModel's wrapped model; the model a base
    compiled in place compiled: ``generate`` keeps its compiled step there)."""
    inner = getattr(model, "get_base_model", None)
    return uncompiled(inner() if callable(inner) else model)


class FastDecode:
    """``generate`` with a static KV cache and a compiled decode step for one model (module docstring).

    Args:
        model: a transformers causal LM, or a LoRDBAModel wrapping one.
        compile: compile the decode step (False: the static cache alone would not pay, so plain eager
            ``generate`` with its dynamic cache).
        mode: ``torch.compile`` mode, one of :data:`MODES`.

    Raises:
        ConfigError: an unknown ``mode``.
    """

    def __init__(self, model: nn.Module, compile: bool = True, mode: str = "default") -> None:
        if mode not in MODES:
            raise ConfigError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.compiled = bool(compile)
        if self.compiled:
            use_packed_gqa(model)
        self.mode = mode
        self.compile_seconds = 0.0
        self.failure: str | None = None
        self._ready: set[int] = set()

    def _limit(self) -> int | None:
        return context_positions(_hf_model(self.model))

    def generate_kwargs(self, tokens: int) -> dict[str, Any]:
        """The extra ``generate`` arguments for a call that holds ``tokens`` positions (prompt + new
        tokens): a static cache of :func:`cache_length` and the compile config; none when eager."""
        if not self.compiled:
            return {}
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False, mode=self.mode)
        config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        return {
            "cache_implementation": "static",
            "max_cache_len": cache_length(tokens, self._limit()),
            "compile_config": config,
        }

    def prepare(self, tokens: int) -> bool:
        """Compile the decode step for a call holding ``tokens`` positions (a two-token warm-up; the
        time is added to :attr:`compile_seconds`), once per cache length. On failure logs a warning,
        records it in :attr:`failure` and falls back to eager decoding. Returns whether decoding is
        compiled."""
        if not self.compiled:
            return False
        length = cache_length(tokens, self._limit())
        if length in self._ready:
            return True
        sliding = _sliding_layers(_hf_model(self.model))
        if sliding:
            self.fallback(
                ConfigError(f"sliding-window attention ({sliding}): the static cache's step recompiles every token")
            )
            return False
        start = time.perf_counter()
        try:
            ids = torch.zeros((1, 2), dtype=torch.long, device=_device(self.model))
            with torch.no_grad():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=3,
                    min_new_tokens=3,
                    do_sample=False,
                    pad_token_id=0,
                    **self.generate_kwargs(tokens),
                )
        except Exception as err:  # any compiler failure: decode eagerly
            self.fallback(err)
            return False
        self.compile_seconds += time.perf_counter() - start
        self._ready.add(length)
        return True

    def fallback(self, err: BaseException) -> None:
        """Stop compiling (after ``err``) and decode eagerly from now on; logs a warning."""
        self.compiled = False
        self.failure = " ".join(f"{type(err).__name__}: {err}".split())[:300]  # dynamo's own first line names no cause
        hf = _hf_model(self.model)
        for name in ("_compiled_call", "_last_compile_config"):
            hf.__dict__.pop(name, None)
        log.warning("compiled decoding failed (%s); decoding eagerly instead", self.failure)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> Any:
        """``model.generate(input_ids=..., max_new_tokens=..., **kwargs)`` with the static cache and the
        compiled step when :meth:`prepare` succeeded for this length (it is called here), else eager. A compile
        that fails in the call itself (another graph: a new routing state, batch size or setting) falls back
        (:meth:`fallback`) and the call is run again eagerly from torch's generator state as it was, a
        ``streamer``'s pieces already given not given again. An error the eager run raises too is the call's own
        (a bad argument, an unknown adapter name), not the compiler's: it is raised and decoding stays compiled."""
        tokens = int(input_ids.shape[-1]) + int(max_new_tokens)
        self.prepare(tokens)
        if not self.compiled:
            return self.model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, **kwargs)
        rng = rng_state(input_ids.device)
        streamer = kwargs.get("streamer")
        if streamer is not None:
            kwargs["streamer"] = streamer = _Replay(streamer)
        try:
            return self.model.generate(
                input_ids=input_ids, max_new_tokens=max_new_tokens, **kwargs, **self.generate_kwargs(tokens)
            )
        except Exception as err:  # a compiler failure in this call: decode eagerly, as prepare would have
            failed = err
        set_rng_state(input_ids.device, rng)
        if streamer is not None:
            kwargs["streamer"] = streamer.again()
        out = self.model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, **kwargs)  # raises the call's own
        self.fallback(failed)  # eager decodes it: the compiled call's failure was the compiler's
        return out


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator states a sampled ``generate`` on ``device`` draws from: the CPU's, and the accelerator's
    (CUDA's sampling draws from the device's generator, not the CPU's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Put back what :func:`rng_state` returned for ``device``."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Replay:
    """A streamer that passes its pieces on, and for a call run again skips those already passed (:meth:`again`)."""

    def __init__(self, streamer: Any, skip: int = 0) -> None:
        self.streamer, self.skip, self.passed = streamer, skip, 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip:
            self.skip -= 1
            return
        self.passed += 1
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()

    def again(self) -> _Replay:
        return _Replay(self.streamer, self.skip + self.passed)


def _sliding_layers(model: nn.Module) -> str | None:
    """The layer types of ``model``'s static cache whose layers count tokens in a Python int (transformers'
    ``StaticSlidingWindowLayer``: sliding-window or chunked attention), which a compiled step is specialized on: it
    recompiles every token until dynamo's recompile limit, then runs eagerly; ``None`` for a model without them."""
    config = getattr(model, "config", None)
    try:
        from transformers.cache_utils import (
            STATIC_LAYER_TYPE_MAPPING,
            StaticSlidingWindowLayer,
            get_layer_types_and_kwargs,
        )

        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # another transformers version, or no transformers config: nothing known to recompile
        return None
    found = sorted({t for t in types if issubclass(STATIC_LAYER_TYPE_MAPPING.get(t, object), StaticSlidingWindowLayer)})
    return ", ".join(found) or None


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# generation config settings token_processors does not apply -> the values of each that change nothing (None too)
_UNAPPLIED = {
    "num_beams": (1,), "num_beam_groups": (1,), "penalty_alpha": (0,), "dola_layers": (), "guidance_scale": (1,),
    "no_repeat_ngram_size": (0,), "bad_words_ids": ([],), "suppress_tokens": ([],), "begin_suppress_tokens": ([],),
    "sequence_bias": ({},), "forced_bos_token_id": (), "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (), "watermarking_config": (),
}  # fmt: skip
_UNAPPLIED_SAMPLING = {"typical_p": (1,), "epsilon_cutoff": (0,), "eta_cutoff": (0,), "top_h": ()}


def unapplied_settings(config: Any, sample: bool) -> list[str]:
    """The settings of the generation ``config`` that change the tokens ``generate`` chooses (when sampling:
    ``sample``) but that :func:`token_processors` does not apply (beams, n-gram blocking, suppressed or forced
    tokens, ...); ``[]`` for a config that sets none of them."""
    names = {**_UNAPPLIED, **(_UNAPPLIED_SAMPLING if sample else {})}
    return [n for n, noop in names.items() if (v := getattr(config, n, None)) is not None and v not in noop]


def token_processors(
    model: nn.Module,
    do_sample: bool | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    *,
    repetition_penalty: float | None = None,
    min_new_tokens: int | None = None,
    prompt_length: int = 0,
    eos: Sequence[int] = (),
) -> tuple[bool, Any]:
    """Whether to sample, and the logits processors ``generate`` applies for these settings (each one given,
    else the model's generation config's, else transformers' default): the repetition penalty, the least length
    (the config's ``min_length``) and least number of new tokens after ``prompt_length`` (both keep the ``eos``
    ids from being chosen before), then when sampling temperature, top-k, top-p and min-p, in transformers'
    order (a decoder that chooses tokens itself, :class:`~lordba.nn.aot.AotDecode`, then gives ``generate``'s
    tokens for a seed). A temperature of 0 is greedy.

    Raises:
        ConfigError: the generation config sets something these processors do not apply
            (:func:`unapplied_settings`): the tokens would not be ``generate``'s.
    """
    import transformers as tf

    config = getattr(model, "generation_config", None)

    def pick(name: str, given: Any, default: Any) -> Any:
        value = given if given is not None else getattr(config, name, None)
        return default if value is None else value

    out = tf.LogitsProcessorList()
    penalty = pick("repetition_penalty", repetition_penalty, 1.0)
    if penalty != 1.0:
        out.append(tf.RepetitionPenaltyLogitsProcessor(penalty))
    least, least_new = pick("min_length", None, 0), pick("min_new_tokens", min_new_tokens, 0)
    if eos and least > 0:
        out.append(tf.MinLengthLogitsProcessor(least, sorted(eos)))
    if eos and least_new > 0:
        out.append(tf.MinNewTokensLengthLogitsProcessor(prompt_length, least_new, sorted(eos)))
    temperature = pick("temperature", temperature, 1.0)
    sample = bool(pick("do_sample", do_sample, False)) and temperature > 0
    unapplied = unapplied_settings(config, sample)
    if unapplied:
        raise ConfigError(
            f"the model's generation config sets {', '.join(unapplied)}, which this decoder does not apply: "
            "generate with the model's own generate, or clear them in model.generation_config"
        )
    if sample:
        top_k, top_p, min_p = pick("top_k", top_k, 50), pick("top_p", top_p, 1.0), pick("min_p", None, None)
        warpers = ((temperature != 1.0, tf.TemperatureLogitsWarper, temperature),
                   (top_k != 0, tf.TopKLogitsWarper, top_k), (top_p < 1.0, tf.TopPLogitsWarper, top_p),
                   (min_p is not None, tf.MinPLogitsWarper, min_p))  # fmt: skip
        out.extend(warper(value) for use, warper, value in warpers if use)
    return sample, out
