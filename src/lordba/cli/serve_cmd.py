"""``lordba serve``: an OpenAI-compatible HTTP server batching many LoRDBA adapters on one base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lordba._util.models import registered_model, registered_names
from lordba.cli import EXIT_USAGE, _bounded, non_negative_int, positive_int
from lordba.cli._base import UsageError, add_quant_arguments, choose_base, usage_error
from lordba.errors import ConfigError

NAME = "serve"
HELP = "serve a base model and its LoRDBA adapters behind an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lordba._util.dtypes import DTYPES

    p.add_argument(
        "--model", required=True, help="transformers model folder, or 'default' (the lab's default model, if installed)"
    )
    p.add_argument("--adapters", default=None, help="folder of adapter directories, served by folder name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port, 0 to 65535 (default 8000; 0: any free one)")
    p.add_argument(
        "--max-adapter-memory",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="LRU budget of resident adapters (default: no limit)",
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=32, metavar="N", help="most requests in flight (default 32)"
    )
    p.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="most requests waiting for a batch slot, a 503 with Retry-After past them (default: no bound; 0: a 503 "
        "whenever the batch is full)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="largest request body, a 413 over it (default: room for the longest prompt of the context, at least "
        "16 MiB)",
    )
    p.add_argument("--served-model-name", default=None, help="name of the base model in the API")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the base model (default float32)"
    )
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="serve an adapter that records another quantized base than the served one (with a warning in the log; "
        "default: a request for it is a 400 naming both bases). An unquantized base serves every adapter",
    )
    add_quant_arguments(
        p,
        "the base the adapters of --adapters were trained on (the quantization their configs record: they must "
        "agree); unquantized where none records one",
    )


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535; ``argparse.ArgumentTypeError`` otherwise (uvicorn's bind would fail after
    the model is loaded)."""
    return int(_bounded(text, int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535"))


def resolve_model(name: str) -> tuple[Path, str]:
    """``(model folder, served name)`` for ``--model``: a folder, or a name registered in the
    ``lordba.models`` entry-point group (the lab registers ``default``).

    Raises:
        ConfigError: ``name`` is neither (the registered names said).
    """
    path = Path(name)
    if path.is_dir():
        return path, path.resolve().name
    found = registered_model(name)
    if found is not None:
        folder, canonical = found
        return folder, _config_name(folder) or canonical
    if name == "default":
        raise ConfigError(
            "--model default: no default model is registered (the lordba lab provides one: pip install -e lab); "
            "give a transformers model folder instead"
        )
    names = ", ".join(sorted(registered_names()))
    raise ConfigError(f"--model {name}: not a folder, nor a registered model name ({names or 'none is registered'})")


def _config_name(folder: Path) -> str | None:
    """The ``_name_or_path`` a model folder's config.json records, if it is a plain name."""
    from lordba._util.jsonio import read_json_file
    from lordba.errors import LoRDBAError

    try:
        value = read_json_file(folder / "config.json", max_bytes=1 << 20).get("_name_or_path")
    except (LoRDBAError, AttributeError):
        return None
    return value if isinstance(value, str) and value and "/" not in value else None


def folder_records(adapters: str | None) -> dict[str, dict | None]:
    """``{name: base_quantization}`` of the adapters the ``--adapters`` folder serves (as the registry lists them:
    :func:`~lordba.serve.adapter_files.folder_adapters`; only their configs are read). Empty without a folder, or for
    one the registry refuses (it says why)."""
    from lordba.config import CONFIG_NAME, recorded_base_quantization
    from lordba.serve.adapter_files import folder_adapters

    root = Path(adapters).resolve() if adapters is not None else None
    if root is None or not root.is_dir() or (root / CONFIG_NAME).is_file():
        return {}
    return {d.name: recorded_base_quantization(d) for d in folder_adapters(root)}


def run(args: argparse.Namespace) -> int:
    from lordba.serve import missing_extra

    missing = missing_extra()
    if missing:
        print(f"lordba serve: needs {', '.join(missing)}, not installed: pip install 'lordba[serve]'", file=sys.stderr)
        return EXIT_USAGE
    from lordba.serve.adapter_files import served_folder
    from lordba.serve.server import build_state, load_base, serve_forever

    folder, name = resolve_model(args.model)
    served_folder(args.adapters)  # a mistyped --adapters is said before the base loads, not after
    try:
        base = choose_base(args, folder_records(args.adapters), "none")
    except UsageError as err:
        return usage_error(NAME, err)
    print(f"lordba serve: serving the base {base.describe()}: {base.why}", file=sys.stderr)
    model, tokenizer = load_base(folder, args.dtype, base.backend, base.bits, base.group_size, base.compute)
    name = args.served_model_name or name
    state = build_state(
        model,
        tokenizer,
        name,
        args.adapters,
        args.max_adapter_memory,
        args.max_batch,
        None,
        args.allow_base_mismatch,
        args.max_body_bytes,
        args.max_waiting,
    )
    serve_forever(state, args.host, args.port)
    return 0
