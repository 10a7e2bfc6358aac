"""What ``lordba generate`` and ``lordba chat`` share: the options, loading a base (quantized) with
an adapter, and streaming generation that reports time to first token and tokens per second."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from lordba.cli import non_negative_int, positive_int


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter``, ``--quant`` and the sampling options."""
    p.add_argument("--model", required=True, help="transformers model folder, or 'default' (the lab's default model)")
    p.add_argument(
        "--adapter", default=None, help="LoRDBA adapter folder (or Hub id) to apply; default: the base alone"
    )
    p.add_argument(
        "--quant",
        default="q4",
        choices=("q4", "hqq", "bnb", "none"),
        help="quantization of the base's linear layers (default q4: lordba's fast 4-bit CPU base)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


@dataclass
class Loaded:
    """A ready model (the base with its adapter) and its tokenizer."""

    model: Any
    tokenizer: Any


def load(args: argparse.Namespace) -> Loaded:
    """The base model of ``--model`` quantized per ``--quant``, with ``--adapter`` on it.

    Raises:
        ConfigError, AdapterFormatError: a bad model folder or adapter (the CLI exits 3).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lordba import kernels
    from lordba.cli.serve_cmd import resolve_model
    from lordba.nn.model import LoRDBAModel
    from lordba.quant.cache import quantize_model_cached

    if args.threads:
        torch.set_num_threads(args.threads)
    folder, _ = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = quantize_model_cached(model, folder, backend=args.quant, bits=4, group_size=64)
    kernels.cpu_available()  # build or load the CPU kernels before the first token
    if args.adapter:
        model = LoRDBAModel.from_pretrained(model, args.adapter).eval()
    return Loaded(model, tokenizer)


def stream(loaded: Loaded, input_ids: Any, args: argparse.Namespace, out: Any = None) -> str:
    """Generate from ``input_ids``, writing text to ``out`` as it comes; prints time to first token
    and tokens/s to stderr; returns the generated text."""
    import torch
    from transformers import TextIteratorStreamer

    out = out or sys.stdout
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = args.temperature > 0
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        streamer=streamer,
        pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id,
        **({"temperature": args.temperature, "top_p": args.top_p} if sample else {}),
    )
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {}

    def work() -> None:
        with torch.no_grad():
            result["ids"] = loaded.model.generate(**kwargs)

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    first, pieces = None, []
    for piece in streamer:
        if first is None:
            first = time.perf_counter() - start
        pieces.append(piece)
        out.write(piece)
        out.flush()
    thread.join()
    total = time.perf_counter() - start
    generated = int(result["ids"].shape[-1] - input_ids.shape[-1]) if "ids" in result else 0
    decode = total - (first or 0.0)
    rate = (generated - 1) / decode if generated > 1 and decode > 0 else float("nan")
    out.write("\n")
    print(
        f"[{generated} tokens; time to first token {1000 * (first or total):.0f} ms; {rate:.1f} tokens/s]",
        file=sys.stderr,
    )
    return "".join(pieces)
