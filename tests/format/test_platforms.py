"""Saving and loading where the POSIX calls the crash-safe writes use are missing (Windows: no ``fcntl``, no
``os.fchmod`` before Python 3.13, no ``os.fork`` or ``os.register_at_fork``) or refused (NFS: ``flock`` on a
directory opened read-only)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# torch's and transformers' Linux builds import fcntl themselves: they are loaded before it is hidden from lordba
_WINDOWS_LIKE = """
import os, signal, sys, warnings
import torch, torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM
sys.modules["fcntl"] = None
for name in ("fchmod", "fork", "register_at_fork", "getuid", "geteuid", "getgid"):
    if hasattr(os, name):
        delattr(os, name)
delattr(signal, "SIGKILL")
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
from conftest import tiny_llama
from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.format.adapter import read_adapter

out = sys.argv[1]
lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
lm.save_pretrained(out)
os.chmod(os.path.join(out, "adapter_config.json"), 0o600)
lm.save_pretrained(out)  # over the first: the replacement keeps the file's permissions
loaded = LoRDBAModel.from_pretrained(tiny_llama(0), out)
print(oct(os.stat(os.path.join(out, "adapter_config.json")).st_mode & 0o777), sorted(read_adapter(out).modules)[0])
"""


def test_save_over_an_adapter_and_load_it_without_fcntl_or_fchmod(tmp_path):
    """Windows (Python 3.10 to 3.12 have no ``os.fchmod``): the second save_pretrained into a folder, which keeps the
    replaced file's permissions, failed with ``AttributeError: module 'os' has no attribute 'fchmod'``; it sets them by
    name there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LORDBA_KERNEL": "torch"}  # no compile
    run = subprocess.run(
        [sys.executable, "-c", _WINDOWS_LIKE, str(tmp_path / "a"), str(TESTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "0o600" and "layers" in run.stdout
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "lordba_model.safetensors",
    ]
