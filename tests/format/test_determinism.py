"""Determinism: the same adapter saves to the same bytes in any process, and the checksum that
ties the config to the weights is verified on load and shown by ``lordba inspect``."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.cli import main
from lordba.format.adapter import read_adapter

from conftest import tiny_llama

CHILD = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import tiny_llama
    from lordba import LoRDBAConfig, export_lora, get_lordba_model
    out = Path(sys.argv[1])
    for name, extra in (
        ("fp16", dict(rank_pattern={{"q_proj": 2, "down_proj": 5}}, alpha_pattern={{"v_proj": 3.0, "up_proj": 7.0}})),
        ("int8", dict(scale_dtype="int8", target_modules=r".*\\.(q_proj|v_proj|gate_proj)")),
    ):
        base = tiny_llama(0)
        torch.manual_seed(3)
        lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random", **extra))
        lm.add_adapter("second", LoRDBAConfig(r=3, init="random", scale_dtype="float32"))
        lm.save_pretrained(out / name)
        export_lora(out / name, out / (name + "-lora"))
    """
)


def test_saves_are_byte_identical_across_processes_with_different_hash_seeds(tmp_path):
    code = CHILD.format(tests=str(Path(__file__).parent))
    procs = []
    for seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        procs.append(
            subprocess.Popen([sys.executable, "-c", code, str(tmp_path / seed)], env=env, stderr=subprocess.PIPE)
        )
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    files = {
        seed: {
            p.relative_to(tmp_path / seed): p.read_bytes()
            for p in (tmp_path / seed).rglob("*")
            if p.is_file() and p.name != "README.md"  # model cards: not part of the format
        }
        for seed in ("1", "987654")
    }
    assert len(files["1"]) == 12  # 2 directories × 2 adapters × 2 files + 2 LoRA exports × 2 files
    assert files["1"].keys() == files["987654"].keys()
    for name, data in files["1"].items():
        assert files["987654"][name] == data, f"{name} differs between the two processes"
    for adapter in ("fp16", "int8", "fp16/second", "int8/second"):
        config = json.loads(files["1"][Path(adapter) / "adapter_config.json"])
        weights = files["1"][Path(adapter) / "lordba_model.safetensors"]
        assert config["weights_sha256"] == hashlib.sha256(weights).hexdigest()


def test_inspect_shows_the_verified_checksum(tmp_path, capsys):
    torch.manual_seed(0)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random")).save_pretrained(tmp_path)
    sha = hashlib.sha256((tmp_path / "lordba_model.safetensors").read_bytes()).hexdigest()
    assert read_adapter(tmp_path).sha256 == sha
    assert main(["inspect", str(tmp_path)]) == 0
    assert f"checksum: ok (sha256 {sha[:16]}" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checksum"].startswith(f"ok (sha256 {sha[:16]}") and report["config"]["r"] == 2


def test_inspect_of_an_interrupted_save_reports_the_recovered_adapter(tmp_path, capsys):
    for name, seed in (("old", 0), ("new", 1)):
        base = tiny_llama(0)  # seeds torch itself
        torch.manual_seed(seed)
        get_lordba_model(base, LoRDBAConfig(r=2, init="random")).save_pretrained(tmp_path / name)
    d = tmp_path / "old"
    old_sha = hashlib.sha256((d / "lordba_model.safetensors").read_bytes()).hexdigest()
    os.link(d / "lordba_model.safetensors", d / ".lordba_model.safetensors.lordba-prev")
    os.link(d / "adapter_config.json", d / ".adapter_config.json.lordba-prev")
    os.replace(tmp_path / "new" / "lordba_model.safetensors", d / "lordba_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {old_sha[:16]}" in out and "recovered from an interrupted save" in out
