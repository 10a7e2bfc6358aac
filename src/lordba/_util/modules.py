"""Rules about a model's modules, kept in one place: replacing the submodule at a dotted path, a model in eval
mode for a block (blocks that overlap, in one thread or several, share the change: the last to end puts the model
back), a model frozen by a call that gives its parameters back if the call fails, recognising the output
head by name, a model's own copy of its config, the device an accelerate hook computes a module on and the tensors
it loads, the ids that end a generated text."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lordba._util.interrupts import PutBack, generator_block

OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier")


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` below ``root`` (``"model.layers.0.mlp.up_proj"``), in place.

    Takes the root module, the path of an existing submodule's slot and the new module; returns
    nothing. Raises ``AttributeError`` if the parent path does not exist.
    """
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _set_training(module_and_mode: tuple[nn.Module, bool]) -> None:
    module, training = module_and_mode
    module.training = training


class _Shared:
    """One change to a model that the blocks open on it share (:func:`eval_mode`'s, :func:`generation_stopping_only`'s):
    the first to begin saves what the model had and makes the change, the last to end puts it back. Each block saving
    and putting back on its own, two that overlapped (an evaluation in each of two threads) put the model back in the
    wrong order: the second saved the first's change and, ending last, made it the model's for good (a training model
    left in eval mode, the model's generation config lost), and the first to end undid the change under the other
    while it still ran (its evaluation went on with dropout on)."""

    __slots__ = ("holders", "kept", "lock", "put_back")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders: list[object] = []  # a token per open block
        self.put_back: PutBack | None = None
        self.kept = False  # (frozen_unless_failed's: a block ended well, the change stays)


_SHARED: dict[str, weakref.WeakKeyDictionary[nn.Module, _Shared]] = {
    "eval": weakref.WeakKeyDictionary(),
    "generation": weakref.WeakKeyDictionary(),
    "frozen": weakref.WeakKeyDictionary(),
}
_SHARED_LOCK = threading.Lock()


def _shared(kind: str, model: nn.Module) -> _Shared:
    """The change of ``kind`` shared by the blocks open on ``model`` (kept while the model lives)."""
    with _SHARED_LOCK:
        one = _SHARED[kind].get(model)
        if one is None:
            one = _SHARED[kind][model] = _Shared()
        return one


def _begin(shared: _Shared, token: object, save: Callable[[], PutBack], change: Callable[[PutBack], object]) -> None:
    """Open the block ``token`` on ``shared``: the first one open saves the model's state (``save``, what puts it
    back) and changes it (``change``); the others find it changed."""
    with shared.lock:
        if shared.holders:
            shared.holders.append(token)
            return
        shared.put_back = save()
        shared.holders.append(token)  # (before the change: a Ctrl-C in it is put back when the block ends)
        change(shared.put_back)


def _end(shared_and_token: tuple[_Shared, object]) -> None:
    """Close the block ``token``: the last one open puts the model back (unless one :func:`_keep` kept the change).
    Can be called again after a Ctrl-C (goes on from where it stopped) and for a block that never began (does
    nothing)."""
    shared, token = shared_and_token
    with shared.lock:
        if not any(one is token for one in shared.holders):
            return
        if len(shared.holders) == 1 and shared.put_back is not None and not shared.kept:
            shared.put_back()
            shared.put_back.done()  # (SIGINT's handler back to the caller's PutBack, given what came meanwhile)
        shared.holders.remove(token)
        if not shared.holders:
            shared.kept = False


def _keep(shared: _Shared, token: tuple[int, object]) -> None:
    """The block ``token`` (its thread's id, first) ended well: the change stays after the last block ends, unless
    ``token`` is inside another block of its thread (part of that one's call, which may still fail)."""
    with shared.lock:
        if not any(one is not token and one[0] == token[0] for one in shared.holders):
            shared.kept = True


def _modes(model: nn.Module) -> PutBack:
    """What puts every module of ``model`` back in its present mode."""
    return PutBack(_set_training, [(m, m.training) for m in model.modules()])


@generator_block
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block (dropout off), then every module back in its own mode, also when the
    block raises (an evaluation that failed part way left a training model in eval mode: dropout off for the rest
    of the run) or a Ctrl-C comes as the block begins or ends (a generator of ``contextlib`` left the model in eval
    mode while the traceback lived, and a Ctrl-C in its loop putting the modes back left the rest in eval mode).
    Blocks that overlap on one model (in one thread or several) share it: the modes are put back as the last ends.
    Another thread's calls meanwhile run in eval mode too (the mode is the model's)."""
    shared, token = _shared("eval", model), object()
    put_back = PutBack(_end, [(shared, token)])
    try:  # (the eval inside: one stopped part way is put back too)
        _begin(shared, token, functools.partial(_modes, model), lambda _: model.eval())
        yield
    finally:
        try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
            put_back()
        except KeyboardInterrupt as err:
            put_back.interrupted = err
            while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                try:
                    put_back()
                    break
                except KeyboardInterrupt as err:
                    put_back.interrupted = err
        put_back.done()


@generator_block
def frozen_unless_failed(model: nn.Module) -> Iterator[None]:
    """Freeze ``model``'s parameters (``requires_grad`` off) for what the block builds on it; if the block raises
    (a Ctrl-C included, also one as the block begins or ends or part way through the freezing), those that were
    trainable are again: a refused call leaves the caller's model as it was. Blocks that overlap on one model (two
    threads wrapping one base) share it: the first to begin freezes, and the parameters are given back as the last
    ends only if none ended well (one refused while another thread's wrapper was built on the frozen base gave its
    parameters back under that wrapper: training it trained the base); a block inside another of its thread is part
    of that one's call."""
    shared, token = _shared("frozen", model), (threading.get_ident(), object())
    put_back = PutBack(_end, [(shared, token)])
    try:  # (the freezing inside: one stopped part way is undone too)
        _begin(shared, token, functools.partial(_trainable, model), _freeze)
        yield
        _keep(shared, token)
    finally:
        try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
            put_back()
        except KeyboardInterrupt as err:
            put_back.interrupted = err
            while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                try:
                    put_back()
                    break
                except KeyboardInterrupt as err:
                    put_back.interrupted = err
        put_back.done()


def _trainable(model: nn.Module) -> PutBack:
    """What makes ``model``'s trainable parameters trainable again."""
    return PutBack(
        functools.partial(torch.Tensor.requires_grad_, requires_grad=True),
        [p for p in model.parameters() if p.requires_grad],
    )


def _freeze(trainable: PutBack) -> None:
    """Freeze the parameters ``trainable`` gives back."""
    for p in trainable.items:
        p.requires_grad_(False)


def is_output_head(name: str) -> bool:
    """Whether the module path ``name`` names an output head: its last component is ``lm_head``
    (causal LMs), ``score`` or ``classifier`` (classification heads). Never raises."""
    return name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES


def own_config(model: nn.Module) -> Any:
    """Give ``model`` its own copy of its config, before a write meant for it alone: transformers keeps the config
    object a model is built from, so two models built from one config (or the user's config object) share it, and a
    write for one changed the other. Every module below ``model`` that held the config or one of its sub-configs (a
    multimodal model's ``text_config``) gets the copy's. Returns the copy."""
    memo: dict[int, Any] = {}
    own = copy.deepcopy(model.config, memo)
    for module in model.modules():
        held = module.__dict__.get("config")
        copied = memo.get(id(held)) if held is not None else None  # (memo keeps every original alive: ids are unique)
        if copied is not None and type(copied) is type(held):
            module.config = copied
    return own


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")  # config names of a context


def context_positions(model: nn.Module) -> int | None:
    """The most positions (prompt + generated) ``model``'s config allows, ``None`` where it names none: its own, else
    its text model's (a multimodal config, such as Gemma 3's that ``AutoModelForCausalLM`` loads for gemma-3-4b-it,
    keeps them in ``text_config``)."""
    config = getattr(model, "config", None)
    configs = [config]
    with contextlib.suppress(Exception):  # a config without get_text_config, or one that has no text config
        configs.append(config.get_text_config())
    for one in configs:
        for key in CONTEXT_KEYS:
            value = getattr(one, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The device on which an accelerate hook of ``module`` runs it (``from_pretrained(device_map=...)``:
    an offloaded layer's weights sit on ``meta`` and its hook brings them there for each call), or ``None``
    where ``module`` has no such hook. Never raises."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        device = getattr(one, "execution_device", None)
        if isinstance(device, (torch.device, str, int)):
            try:
                return torch.device(device)
            except (RuntimeError, TypeError):
                return None
    return None


def offloaded_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """The value an accelerate hook of ``module`` loads for its tensor ``name`` (``"bias"``) where the module holds
    it on ``meta`` (``device_map`` offloading: the hook reads it from its weights map for each call), else ``None``.
    Never raises for a module without such a hook."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        weights = getattr(one, "weights_map", None)
        if getattr(one, "offload", False) and weights is not None and name in weights:
            return weights[name]
    return None


def preloading_ancestor(root: nn.Module, path: str) -> str | None:
    """The path (``""``: ``root``) of a module above ``path`` whose accelerate hook loads every tensor below it from
    its weights map for a call, by their paths as dispatched (``dispatch_model(..., preload_module_classes=[...])``
    with that module offloaded: the modules below have no hook of their own), or ``None``. Never raises."""
    module, parts = root, path.split(".") if path else []
    for i, part in enumerate(parts):
        hook = module.__dict__.get("_hf_hook")
        for one in getattr(hook, "hooks", None) or (hook,):
            preloads = getattr(one, "place_submodules", False) and getattr(one, "offload", False)
            if preloads and getattr(one, "weights_map", None) is not None:
                return ".".join(parts[:i])
        module = module._modules.get(part)
        if module is None:
            return None
    return None


def end_of_sequence_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The ids that end a generated text: ``model.generation_config.eos_token_id`` (one or a list) and the
    tokenizer's ``eos_token_id`` (a chat model's end of turn that its generation config leaves out)."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


_KEPT = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache", "cache_implementation")


def stopping_only(config: Any) -> Any:
    """``config`` (a model's ``GenerationConfig``) with only its special token ids and cache settings: ``generate``
    (and ``--aot``'s decoder) apply every setting of the model's generation config they are not given (a repetition
    penalty, min-p, typical-p, n-gram blocking, ...), which ``lordba serve`` never applies."""
    from transformers import GenerationConfig

    return GenerationConfig(**{n: v for n in _KEPT if (v := getattr(config, n, None)) is not None})


def _saved_generation_config(target: nn.Module) -> PutBack:
    """What puts ``target``'s present generation config back."""
    return PutBack(functools.partial(setattr, target, "generation_config"), [target.generation_config])


def _stopping_only_of(target: nn.Module, saved: PutBack) -> None:
    target.generation_config = stopping_only(saved.items[0])


@generator_block
def generation_stopping_only(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s generation config (the transformers model's, below a wrapper with
    ``get_base_model``) is :func:`stopping_only`'s, put back after: ``generate`` also applies the model's own
    settings for what a config passed to it leaves unset, so only the model's attribute keeps them out. A Ctrl-C as
    the block begins or ends puts it back too. Blocks that overlap on one model (in one thread or several) share it:
    the model's own config is put back as the last ends. Another thread's ``generate`` meanwhile also gets the
    stopping-only config (the attribute is the model's)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(target, "generation_config", None) is None:
        yield
        return
    shared, token = _shared("generation", target), object()
    put_back = PutBack(_end, [(shared, token)])
    try:  # (the new one set inside: a Ctrl-C just after it puts the old one back)
        _begin(
            shared,
            token,
            functools.partial(_saved_generation_config, target),
            functools.partial(_stopping_only_of, target),
        )
        yield
    finally:
        try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
            put_back()
        except KeyboardInterrupt as err:
            put_back.interrupted = err
            while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                try:
                    put_back()
                    break
                except KeyboardInterrupt as err:
                    put_back.interrupted = err
        put_back.done()


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` where its signature has it (transformers 5.25
    renamed ``past_key_values``, which it accepts with a warning until 5.40), else ``past_key_values``. Read once per
    model class (the serving batch asks on every decode step)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model's forward shows (*args, **kwargs) only
    if hasattr(model, "get_base_model"):  # a PEFT model passes the keyword on to its base's forward
        model = model.get_base_model()
    return _forward_cache_keyword(type(model))


@functools.cache
def _forward_cache_keyword(cls: type) -> str:
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # (a forward without a signature: the name every version takes)
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a transformers model's output returns: ``output.cache`` (transformers 5.25 on) or
    ``output.past_key_values``."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
