"""Decoding ahead-of-time compiled (AOTInductor): one C++ call per token, no Python module tree, no guards.

On a CPU the eager decode step of a small model spends as much time in Python (transformers'
blocks, every adapted layer's wrapper) as in its kernels, and a ``torch.compile``'d step adds
dynamo's guard evaluation over every weight and adapter tensor (~2-4 ms per token on SmolLM2).
:class:`AotDecode` exports the decode step of one model on a static KV cache
(``torch.export``, strict, through the ``lordba::q4_linear`` and ``lordba::branch`` ops' fake
implementations and :mod:`lordba.nn.attention`'s attention; the q4 layers that read one input grouped
into one call by :mod:`lordba.nn.aot_group`) and compiles it with AOTInductor into a
package **without its weights**: the compiled step reads the live model's tensors (``user_managed``
constants), so no weight is copied and the KV cache is shared with the eager model that fills it
with the prompt (prefill stays eager: its length changes and PyTorch's GEMM serves it well).

What is compiled is fixed: the model's structure, its active adapter(s) and their settings, the q4
layers' ``compute`` and the cache length (a power of two, :func:`~lordba.nn.decode.cache_length`).
A decoder exports its step again when any of these has changed since (:meth:`AotDecode._state`:
``set_adapter``, a ``disable_adapter`` block, a new scaling, a hot-swap, ``set_compute``), so a step
never decodes for another adapter state than the prompt's. The package's name is the sha256 of the
exported graph's code and of the names, shapes and dtypes of the tensors it reads
(:mod:`lordba.nn.aot_package`), so any change that the graph sees compiles a new package and nothing stale
is reused (the export runs every time: ~10-30 s
for SmolLM2; the compile, 40-60 s on 2 cores, only for a package not in ``<lordba cache>/aot``). Weight
*values* are read live: after replacing a tensor object (not its values), call :meth:`AotDecode.refresh`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lordba import kernels
from lordba._util.modules import cache_keyword, context_positions
from lordba.errors import ConfigError
from lordba.nn.adapter import PackedAdapter
from lordba.nn.aot_package import package_dir
from lordba.nn.aot_step import CompiledStep, kv_cache_dtype
from lordba.nn.attention import use_packed_gqa
from lordba.nn.decode import _hf_model, cache_length, token_processors
from lordba.nn.epoch import _EPOCH
from lordba.nn.layer import LoRDBALinear
from lordba.nn.model_forms import hold_together
from lordba.nn.routing import current_routing
from lordba.nn.saved import embedding_rows


class AotDecode:
    """Greedy or sampled generation of a batch of one with an ahead-of-time compiled decode step.

    Args:
        model: a transformers causal LM on the CPU, or a LoRDBAModel wrapping one (its active
            adapters as they are now are compiled in). A model on ``sdpa`` attention is switched to
            :mod:`lordba.nn.attention`'s (the same results, eager and compiled), one with sliding-window layers
            (Gemma-style) is exported through transformers' hybrid-cache wrapper, and its packed adapters'
            tensors are moved into one buffer in a 2 MB page (the same values; a whole page even for a
            smaller adapter: :func:`lordba.nn.model_forms.hold_together`).
        folder: where packages are kept (default ``<lordba cache>/aot``).
        log: called with a line before a compile (default: nothing).
        round_to: cache lengths are the positions needed rounded up to a multiple of this (default:
            :func:`~lordba.nn.decode.cache_length`'s power of two, so few lengths are compiled;
            attention reads the whole cache every token, so a tighter length decodes faster).
        kv_dtype: the KV cache's dtype, ``float16`` (default, as llama.cpp's: half the bytes attention
            reads per token), ``bfloat16`` or ``float32`` (the model's own results); a dtype or its name.

    Raises:
        ConfigError: the model is not on the CPU, ``round_to`` is not positive, or ``kv_dtype`` is
            not one of those.
    """

    def __init__(
        self,
        model: nn.Module,
        folder: Path | None = None,
        log: Callable[[str], None] | None = None,
        round_to: int | None = None,
        kv_dtype: torch.dtype | str = torch.float16,
    ) -> None:
        if round_to is not None and round_to <= 0:
            raise ConfigError(f"round_to must be positive, got {round_to}")
        self.round_to = round_to
        self.kv_dtype = kv_cache_dtype(kv_dtype)
        kernels.cpu_available()  # the decode attention op is traced into the step only once loaded
        self.model = model
        self.inner = _hf_model(model)
        self._cache_kw = cache_keyword(self.inner)  # (transformers 5.25 renamed past_key_values)
        self.vocab: int | None = embedding_rows(self.inner)  # the token ids the step can embed (None: not checked)
        if any(t.device.type != "cpu" for t in self.inner.parameters()):
            raise ConfigError("AotDecode compiles for the CPU: the model must be on the CPU")
        use_packed_gqa(self.inner)
        # the adapters are read every token: one buffer in a 2 MB page (docs/kernels.md)
        hold_together([m for m in self.inner.modules() if isinstance(m, PackedAdapter)], huge_page=True)
        self.folder = Path(folder) if folder is not None else package_dir()
        self.log = log or (lambda line: None)
        self._steps: dict[tuple[int, tuple], CompiledStep] = {}  # by cache length and adapter state (:meth:`_state`)
        self.step_for: CompiledStep | None = None
        self._made_for: tuple = ()  # the :meth:`_state` step_for was prepared in
        self._watch: tuple = (None, [])  # (:meth:`_watched`) the modules step reads its settings from (:meth:`_held`)
        self._made_settings: tuple = ()  # their :meth:`_settings` at prepare
        self._signature, self._seen = (), 0  # (:meth:`_adapters`) at the epoch seen
        self.position = 0
        self.compile_seconds = 0.0
        self.export_seconds = 0.0
        self.compiled = True  # False after a failure (:meth:`fallback`): callers then decode eagerly
        self.failure: str | None = None
        self._lock = threading.RLock()  # one sequence at a time: the cache, the step and the position are shared

    aot = True

    def _limit(self) -> int | None:
        return context_positions(self.inner)

    def prepare(self, tokens: int) -> bool:
        """Get the compiled step for a call holding ``tokens`` positions ready (exported, and compiled
        unless its package exists; its cache emptied). On failure logs it, records it in
        :attr:`failure` and stops compiling (:meth:`fallback`). Returns whether the step is ready."""
        if not self.compiled:
            return False
        try:
            with self._lock:
                self._prepare_step(tokens)
        except Exception as err:  # any exporter / compiler failure: the caller decodes eagerly
            self.fallback(err)
            return False
        return True

    def fallback(self, err: BaseException) -> None:
        """Stop compiling (after ``err``); :meth:`generate` then refuses and callers decode eagerly."""
        self.compiled = False
        self.failure = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        self.log(f"ahead-of-time compiled decoding failed ({self.failure}); decoding eagerly instead")

    def generate_kwargs(self, tokens: int) -> dict[str, Any]:
        """No extra arguments: :meth:`generate` replaces the model's (the interface of FastDecode)."""
        return {}

    def _prepare_step(self, tokens: int) -> CompiledStep:
        if self.round_to is None:
            length = cache_length(tokens, self._limit())
        else:
            length = -(-int(tokens) // self.round_to) * self.round_to
        watch = self._watched()
        state = self._state(watch)
        for key in [k for k in self._steps if k[1][1:] != state[1:]]:  # made before a change: never used again
            del self._steps[key]
        step = self._steps.get((length, state))
        if step is None:
            step = self._steps[length, state] = CompiledStep(self.inner, length, self.folder, self.log, self.kv_dtype)
            self.compile_seconds += step.compile_seconds
            self.export_seconds += step.export_seconds
        step.cache.reset()
        self.step_for, self.position, self._made_for = step, 0, state
        self._watch, self._made_settings = watch, self._settings(*watch)
        self._signature, self._seen = self._adapters(), state[1]
        return step

    def _unchanged(self) -> None:
        """Refuse to prefill the prepared step if what it bakes in (:meth:`_state`) changed since :meth:`prepare`:
        its compiled tokens would follow the old adapter state, the eager prefill the new. (The adapters' epoch is
        the process's: a change to another model's adapters is refused too; per token :meth:`_held` checks less.)"""
        if self._state() != self._made_for:
            raise ConfigError(
                "AotDecode: the adapter state changed since prepare() (an adapter, its scaling, set_adapter, a "
                "disable_adapter block, the kernel mode or the q4 compute): call prepare(tokens) again"
            )

    def _held(self) -> None:
        """Refuse a step when what the prepared step bakes in changed since :meth:`prepare` (after the prefill: its
        compiled tokens would follow the old state where eager ones follow the new). Per token, so cheap: the
        routing, the kernel mode and the q4 ``compute`` of the modules seen at :meth:`prepare`; the adapters
        (:meth:`_adapters`) only when the process's adapter epoch moved (another model's change moves it too)."""
        if self._settings(*self._watch) != self._made_settings:
            self._unchanged()  # raises: the full check names the change
        if _EPOCH[0] != self._seen:
            if self._adapters() != self._signature:
                raise ConfigError(
                    "AotDecode: the adapters changed since prepare() (an adapter, its scaling, set_adapter, a "
                    "hot-swap): call prepare(tokens) again"
                )
            self._seen = _EPOCH[0]

    def _adapters(self) -> tuple:
        """What this model's LoRDBA layers apply: base layer, active / merged / disabled adapters, and each adapter's
        scaling, dropout and tensors (object, dtype, shape)."""
        out = []
        for layer in self.inner.modules():
            if isinstance(layer, LoRDBALinear):
                adapters = tuple(
                    (name, id(a), a.scaling, a.dropout, a.training,
                     tuple((id(t), t.dtype, tuple(t.shape)) for t in a.state_dict(keep_vars=True).values()))
                    for name, a in layer.lordba_adapters.items()
                )  # fmt: skip
                out.append((id(layer.base_layer), tuple(layer.active_adapters), tuple(layer.merged_adapters),
                            layer.disable_adapters, adapters))  # fmt: skip
        return tuple(out)

    def _state(self, watch: tuple | None = None) -> tuple:
        """What an exported step bakes in besides the tensors it reads: the routing this thread's calls
        apply now (a ``disable_adapter`` block), the adapters' epoch (:func:`lordba.nn.epoch.touch`:
        any change to an adapter or to a layer's attributes, e.g. ``set_adapter``, a scaling, a hot-swap),
        the kernel mode and the q4 layers' ``compute`` (``watch``: :meth:`_watched`'s modules, found again if not
        given). Eager prefill follows them too."""
        routing, mode, computes = self._settings(*(watch if watch is not None else self._watched()))
        return routing, _EPOCH[0], mode, computes

    def _watched(self) -> tuple[LoRDBALinear | None, list[nn.Module]]:
        """The model's first LoRDBA layer (its gate holds the routing in force) and its modules with a q4
        ``compute``."""
        first, computes = None, []
        for module in self.inner.modules():
            if first is None and isinstance(module, LoRDBALinear):
                first = module
            if isinstance(getattr(module, "_compute", None), str):
                computes.append(module)
        return first, computes

    @staticmethod
    def _settings(first: LoRDBALinear | None, computes: list[nn.Module]) -> tuple:
        """The routing in force (read from ``first``'s gate), the kernel mode and the q4 ``compute`` of ``computes``."""
        routing = (current_routing(first.gate),) if first is not None else None
        return routing, kernels.get_mode(), tuple(m._compute for m in computes)

    def refresh(self) -> None:
        """Point every compiled step at the model's current tensors (after a tensor was replaced)."""
        for step in self._steps.values():
            step.refresh()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``[1, n]`` eagerly into the prepared step's cache; the last position's logits ``[vocab]``.

        Raises:
            ConfigError: the prompt does not fit the cache after the positions already in it, or the adapter state
                changed since :meth:`prepare` (call it again).
        """
        step = self._ready()
        self._unchanged()
        n = int(input_ids.shape[-1])
        self._fits(step, n)
        positions = torch.arange(self.position, self.position + n)
        out = self.inner(
            input_ids=input_ids,
            cache_position=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: step.cache},
        )
        self.position += n
        return out.logits[0, -1]

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """One token through the compiled step; its logits ``[vocab]``.

        Raises:
            ConfigError: the cache is full (the positions :meth:`prepare` was given are all used), ``token`` is
                not a token id of the model, or the adapter state changed since :meth:`prepare` (call it again).
        """
        self._ready()
        self._held()
        return self._step(token)

    def _step(self, token: int) -> torch.Tensor:
        """:meth:`step` without the state check (:meth:`generate` holds the lock from prepare to its last token)."""
        step = self._ready()
        token = int(token)
        if self.vocab is not None and not 0 <= token < self.vocab:  # (the compiled bounds check: a C++ trace)
            raise ConfigError(f"AotDecode: token {token} is not a token id of the model (0 to {self.vocab - 1})")
        self._fits(step, 1)
        logits = step.runner(input_ids=torch.tensor([[token]]), cache_position=torch.tensor([self.position]))
        self.position += 1
        return logits.reshape(-1)

    def back(self) -> None:
        """Forget the last position (benchmarks time one step again and again)."""
        step = self._ready()
        for layer in step.cache.layers:
            layer.cumulative_length.sub_(1)
        self.position -= 1

    def _fits(self, step: CompiledStep, n: int) -> None:
        if self.position + n > step.length:
            raise ConfigError(
                f"AotDecode: {n} more position(s) after {self.position} do not fit the {step.length}-position cache "
                "prepared: call prepare(tokens) with every position the sequence needs"
            )

    def _ready(self) -> CompiledStep:
        if self.step_for is None:
            raise ConfigError("AotDecode: call prepare(tokens) first (it failed, or was not called)")
        return self.step_for

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        streamer: Any = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        top_k: int | None = None,
        attention_mask: torch.Tensor | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        **others: Any,
    ) -> torch.Tensor:
        """``transformers``' ``generate`` for a batch of one (greedy, or sampling from torch's global
        generator), choosing tokens as it does (:func:`~lordba.nn.decode.token_processors`: a setting not given
        is the model's generation config's, else transformers' default, e.g. top-k 50), so a seed gives its
        tokens; returns prompt + new tokens ``[1, n]``; calls from several threads decode one after the other
        (:meth:`prepare`, :meth:`prefill`, :meth:`step` work on the one sequence of the decoder's cache: a caller
        using them from several threads serializes them). ``streamer`` gets the prompt then each token
        (``put``/``end``), as transformers' streamers expect. ``min_new_tokens`` (or the generation config's
        ``min_length`` / ``min_new_tokens``) keeps the eos ids from being chosen before, as ``generate`` does;
        ``pad_token_id`` and ``use_cache`` change nothing for one sequence.

        Raises:
            ConfigError: a batch of more than one, an ``attention_mask`` that masks a position (padding), or
                another ``generate`` argument (one this decoder does not apply: it is never dropped silently).
        """
        unknown = sorted(set(others) - _NO_EFFECT)
        if unknown:
            raise ConfigError(
                f"AotDecode.generate does not apply {', '.join(unknown)}: call the model's own generate for them"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ConfigError(f"AotDecode generates for one sequence, got input_ids of shape {tuple(input_ids.shape)}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigError("AotDecode decodes every position: an attention_mask with zeros (padding) is refused")
        eos = _eos_ids(self.inner, eos_token_id)
        sample, processors = token_processors(
            self.inner, do_sample, temperature, top_p, top_k, repetition_penalty=repetition_penalty,
            min_new_tokens=min_new_tokens, prompt_length=int(input_ids.shape[-1]), eos=sorted(eos),
        )  # fmt: skip
        with self._lock:  # another thread's sequence would share the cache and the position (:attr:`_lock`)
            self._prepare_step(int(input_ids.shape[-1]) + int(max_new_tokens))
            if streamer is not None:
                streamer.put(input_ids)
            tokens: list[int] = []
            logits = self.prefill(input_ids)
            for i in range(int(max_new_tokens)):
                scores = logits.float()[None]
                if processors:  # (the repetition penalty reads the tokens so far)
                    so_far = torch.cat([input_ids, torch.tensor([tokens], dtype=input_ids.dtype)], 1)
                    scores = processors(so_far, scores)
                token = int(torch.multinomial(torch.softmax(scores, -1), 1)) if sample else int(scores.argmax())
                tokens.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if token in eos or i + 1 == max_new_tokens:
                    break
                logits = self._step(token)
            if streamer is not None:
                streamer.end()
            return torch.cat([input_ids, torch.tensor([tokens], dtype=input_ids.dtype)], dim=1)


_NO_EFFECT = frozenset({"pad_token_id", "use_cache"})  # generate arguments that change nothing for one sequence


def _eos_ids(model: nn.Module, given: int | list[int] | None) -> set[int]:
    ids = given if given is not None else getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}
