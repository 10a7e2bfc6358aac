"""What ``lordba generate`` and ``lordba chat`` share: the options (:mod:`lordba.cli._generation_options`), loading a
base (quantized) with an adapter, and streaming generation that reports time to first token and tokens per second."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lordba.cli._generation_options import (  # the options (re-exported)
    DEFAULT_NEW_TOKENS,
    SEED_MAX,  # noqa: F401
    _OneAdapter,  # noqa: F401
    add_model_arguments,  # noqa: F401
    seed,  # noqa: F401
)

RUNTIME_BRANCH_COMPUTE = "fast"
# the least temperature ``generate`` is given: its warper divides the float32 logits by it, and a smaller one (1e-40)
# made them inf and the sampling fail; at this one every logit gap but a tie is still greedy, as lordba serve samples
LEAST_TEMPERATURE = 1e-30


def branch_compute(args: argparse.Namespace) -> str:
    """The branch compute a ``generate`` / ``chat`` command runs under: ``--branch-compute``, else
    ``$LORDBA_BRANCH_COMPUTE``, else :data:`RUNTIME_BRANCH_COMPUTE` (``fast``: the runtime's default, as
    q4's ``fast`` compute is; the library's own default stays ``exact``, so that a reloaded adapter gives
    the trained model's logits bit for bit and eager prompts equal compiled ones).

    Raises:
        ConfigError: ``$LORDBA_BRANCH_COMPUTE`` names no branch compute.
    """
    import os

    from lordba import kernels
    from lordba.errors import ConfigError

    if getattr(args, "branch_compute", None):
        return args.branch_compute
    env = os.environ.get(kernels.BRANCH_COMPUTE_ENV)
    if env and env not in kernels.BRANCH_COMPUTE:
        raise ConfigError(f"${kernels.BRANCH_COMPUTE_ENV}={env!r} is not one of {kernels.BRANCH_COMPUTE}")
    return env or RUNTIME_BRANCH_COMPUTE


@contextlib.contextmanager
def runtime(args: argparse.Namespace) -> Iterator[None]:
    """Run a ``generate`` / ``chat`` command under :func:`branch_compute`, with FastDecode's warnings on stderr
    (:func:`~lordba.cli._stream.decode_warnings_on_stderr`); all restored afterwards, and torch's thread count
    (``--threads``) and global generator (``--seed``) too: a caller of ``lordba.cli.main`` (a test, a notebook, the
    lab) kept the command's thread count and a generator seeded at ``--seed`` and advanced by its sampling."""
    import torch

    from lordba import kernels
    from lordba.cli._stream import decode_warnings_on_stderr

    threads = torch.get_num_threads()
    try:
        with kernels.with_branch_compute(branch_compute(args)), decode_warnings_on_stderr():
            with torch.random.fork_rng(devices=[]):  # the CPU generator: the one stream() seeds
                yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass
class Loaded:
    """A ready model (the base with its adapter), its tokenizer and how it decodes
    (:class:`lordba.nn.decode.FastDecode`: compiled or eager; :class:`lordba.nn.aot.AotDecode` with
    ``--aot``)."""

    model: Any
    tokenizer: Any
    decode: Any = None


def load(args: argparse.Namespace, check_tokenizer: Callable[[Any], None] | None = None) -> Loaded:
    """The base model of ``--model`` quantized per ``--quant`` (:func:`~lordba.cli._base.generation_base`), with
    ``--adapter`` on it. ``check_tokenizer``: called with the tokenizer before the model loads (a command's refusal
    of it, without waiting for a large base).

    Raises:
        UsageError: options that do not fit the base, or --kv-dtype / --compile-mode without --aot / --compile
            (the commands exit 2).
        ConfigError: ``--model`` is no transformers model folder (no ``config.json``, or transformers
            cannot read it); ``--aot`` with ``--compile``.
        AdapterFormatError: a bad adapter (the CLI exits 3 for both).
    """
    import torch

    from lordba import kernels
    from lordba._util.modules import stopping_only
    from lordba.cli._base import generation_base
    from lordba.cli._generation_options import check_decode_options
    from lordba.cli.serve_cmd import resolve_model
    from lordba.errors import ConfigError
    from lordba.nn.decode import FastDecode
    from lordba.nn.model import LoRDBAModel
    from lordba.quant.pretrained import load_base

    check_decode_options(args)
    base = generation_base(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder, _ = resolve_model(args.model)
    model, tokenizer = load_base(
        folder, "float32", base.backend, base.bits, base.group_size, base.compute, check_tokenizer=check_tokenizer
    )
    model.generation_config = stopping_only(model.generation_config)
    kernels.cpu_available()  # build or load the CPU kernels before the first token
    if args.adapter:
        model = LoRDBAModel.from_pretrained(model, args.adapter).eval()

    compile_it = bool(getattr(args, "compile", False))
    if getattr(args, "aot", False):
        if compile_it:
            raise ConfigError("--aot and --compile are two ways to compile the decode step: choose one")
        from lordba.nn.aot import AotDecode

        kv = getattr(args, "kv_dtype", None) or "float16"
        return Loaded(
            model, tokenizer, AotDecode(model, log=lambda line: print(f"[{line}]", file=sys.stderr), kv_dtype=kv)
        )
    return Loaded(model, tokenizer, FastDecode(model, compile_it, getattr(args, "compile_mode", None) or "default"))


def check_text(text: str, what: str) -> str:
    """``text`` itself if it is Unicode text (bytes that are not UTF-8 reach Python as lone surrogates: from
    ``sys.argv``, or a stdin read with ``surrogateescape``).

    Raises:
        ConfigError: ``text`` holds such bytes (the tokenizer would raise a TypeError).
    """
    from lordba._util.jsonio import unencodable_at
    from lordba.errors import ConfigError

    at = unencodable_at(text)
    if at is not None:
        raise ConfigError(f"{what} is not UTF-8 text (undecodable bytes from character {at})")
    return text


def encode(loaded: Loaded, text: str, what: str, special: bool = True) -> Any:
    """The token ids ``[1, n]`` of ``text`` (with the tokenizer's special tokens where ``special``).

    Raises:
        ConfigError: ``text`` is not UTF-8 text, or it has no tokens (an empty prompt, and the tokenizer
            adds no BOS token: there is nothing to continue).
    """
    from lordba.errors import ConfigError

    ids = loaded.tokenizer(check_text(text, what), return_tensors="pt", add_special_tokens=special).input_ids
    if ids.shape[-1] == 0:
        raise ConfigError(f"{what} has no tokens (empty, and the tokenizer adds no BOS token): give some text")
    return ids


def chat_text(loaded: Loaded, messages: list[dict[str, str]], model: str) -> str:
    """``messages`` in the tokenizer's chat template, ending with the assistant's turn to answer.

    Raises:
        ConfigError: the tokenizer of ``--model`` has no chat template, or its template refuses these
            messages (e.g. a system message where the template has no system role).
    """
    from lordba.errors import ConfigError

    if not getattr(loaded.tokenizer, "chat_template", None):
        raise ConfigError(f"--model {model}: its tokenizer has no chat template (use lordba generate without it)")
    try:
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template raises on these messages (raise_exception, a role it does not know)
        raise ConfigError(f"--model {model}: its chat template refuses these messages ({err})") from None


def new_tokens(loaded: Loaded, prompt_tokens: int, asked: int | None) -> int:
    """How many tokens to generate after ``prompt_tokens``: ``asked`` (``--max-new-tokens``), else
    :data:`DEFAULT_NEW_TOKENS` or fewer, what the model's context leaves (said on stderr), as ``lordba
    serve`` does: a model past its positions gives garbage, or fails (learned positions: GPT-2).

    Raises:
        ConfigError: the prompt leaves no room in the context, or ``asked`` exceeds the room.
    """
    from lordba._util.modules import context_positions
    from lordba.errors import ConfigError

    context = context_positions(loaded.model)
    if context is None:
        return asked or DEFAULT_NEW_TOKENS
    room = context - prompt_tokens
    if room < 1:
        raise ConfigError(
            f"the prompt has {prompt_tokens} tokens: the model's context is {context} tokens, which leaves no room "
            "for an answer; shorten the prompt"
        )
    if asked is not None and asked > room:
        raise ConfigError(
            f"--max-new-tokens {asked} does not fit: the prompt has {prompt_tokens} tokens and the model's context "
            f"is {context}, which leaves {room}"
        )
    if asked is None and room < DEFAULT_NEW_TOKENS:
        print(f"[at most {room} new tokens: the model's context is {context} tokens]", file=sys.stderr)
    return asked or min(DEFAULT_NEW_TOKENS, room)


def _prepare(loaded: Loaded, tokens: int) -> None:
    """Compile the decode step for ``tokens`` positions before any text is streamed (a failure falls
    back to eager, and the decoder says why on stderr); says on stderr how long it took."""
    decode = loaded.decode
    if decode is None or not decode.compiled:
        return
    before, exported = decode.compile_seconds, getattr(decode, "export_seconds", 0.0)
    if decode.prepare(tokens):
        if getattr(decode, "export_seconds", 0.0) > exported:
            print(f"[decode step exported in {decode.export_seconds - exported:.1f} s]", file=sys.stderr)
        if decode.compile_seconds > before:
            print(f"[decode step compiled in {decode.compile_seconds - before:.1f} s]", file=sys.stderr)


def _aot_ready(decode: Any) -> bool:
    """Whether ``decode`` is an :class:`~lordba.nn.aot.AotDecode` still compiling (its ``generate``
    replaces the model's)."""
    return bool(getattr(decode, "aot", False) and decode.compiled)


def _generate_streaming(loaded: Loaded, kwargs: dict, out: Any) -> tuple[Any, float | None, list[str], float]:
    """Run ``generate`` in a thread, writing its text to ``out`` as it comes; returns ``(ids,
    seconds to the first piece, pieces, total seconds)``. An error of ``generate`` is raised here
    (after the stream is closed, so nothing waits for it); an error writing the text (a broken pipe) or
    Ctrl-C stops ``generate`` at its next token and waits for its thread before it is raised (a thread still
    decoding while the interpreter exits aborts the process)."""
    import torch

    from lordba.cli._stream import TextStream

    streamer = TextStream(loaded.tokenizer)
    result: dict[str, Any] = {}

    generate = loaded.decode.generate if _aot_ready(loaded.decode) else loaded.model.generate

    def work() -> None:
        try:
            with torch.no_grad():
                result["ids"] = generate(**kwargs, streamer=streamer)
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err
            streamer.end()

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    first, pieces = None, []
    try:
        for piece in streamer:
            if first is None:
                first = time.perf_counter() - start
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except BaseException:  # a broken pipe, Ctrl-C: stop generating before the interpreter exits under the thread
        streamer.cancel()
        thread.join()
        raise
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["ids"], first, pieces, time.perf_counter() - start


def stream(loaded: Loaded, input_ids: Any, args: argparse.Namespace, out: Any = None) -> str:
    """Generate from ``input_ids`` (at most :func:`new_tokens`), writing text to ``out`` as it comes;
    prints time to first token and tokens/s to stderr; returns the generated text. The tokens are chosen by
    ``--temperature`` and ``--top-p`` alone, as ``lordba serve`` chooses them: not by the model's generation config
    (`_util.modules.stopping_only`), nor transformers' default top-k (50). With ``--compile`` the decode step is
    compiled first (:func:`_prepare`); if compiled generation still fails before any text was
    written, it is run again eagerly."""
    import torch

    from lordba._util.modules import end_of_sequence_ids
    from lordba.cli._stream import Tee

    out = out or sys.stdout
    sample = args.temperature > 0
    temperature = max(args.temperature, LEAST_TEMPERATURE)
    count = new_tokens(loaded, int(input_ids.shape[-1]), args.max_new_tokens)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=count,
        do_sample=sample,
        pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id,
        eos_token_id=sorted(end_of_sequence_ids(loaded.model, loaded.tokenizer)) or None,  # as lordba serve stops
        **({"temperature": temperature, "top_p": args.top_p, "top_k": 0} if sample else {}),
        repetition_penalty=1.0,  # chosen as lordba serve chooses: not by the generation config's settings
    )
    tokens = int(input_ids.shape[-1]) + count
    _prepare(loaded, tokens)
    decode = loaded.decode
    extra = decode.generate_kwargs(tokens) if decode is not None else {}
    compiled = bool(extra) or _aot_ready(decode)
    torch.default_generator.manual_seed(args.seed)  # (CPU sampling; restored by runtime(), not CUDA's generators)
    written: list[str] = []
    sink = Tee(out, written)
    try:
        ids, first, pieces, total = _generate_streaming(loaded, {**kwargs, **extra}, sink)
    except Exception as err:
        if not compiled or written:
            raise
        loaded.decode.fallback(err)  # which says so on stderr
        torch.default_generator.manual_seed(args.seed)
        ids, first, pieces, total = _generate_streaming(loaded, kwargs, sink)
    generated = int(ids.shape[-1] - input_ids.shape[-1])
    decode = total - (first or 0.0)
    rate = f"{(generated - 1) / decode:.1f} tokens/s" if generated > 1 and decode > 0 else "no decode rate: one token"
    out.write("\n")
    print(f"[{generated} tokens; time to first token {1000 * (first or total):.0f} ms; {rate}]", file=sys.stderr)
    return "".join(pieces)
