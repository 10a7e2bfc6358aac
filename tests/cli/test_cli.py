import json
import subprocess
import sys

import pytest
import torch

from lordba import LoRDBAConfig, cli, get_lordba_model
from lordba.cli import LAB_COMMANDS, build_parser, main

from conftest import tiny_llama

LIBRARY_COMMANDS = ("build-kernels", "convert", "export-lora", "inspect")


@pytest.fixture
def adapter_dir(tmp_path):
    torch.manual_seed(0)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8")).save_pretrained(
        tmp_path / "a"
    )
    return tmp_path / "a"


def test_inspect_prints_sizes_and_checksum(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "checksum: ok" in out and "fp16 LoRA" in out and "model.layers.1.mlp.down_proj" in out
    assert main(["inspect", str(adapter_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"]["file_bytes"] == (adapter_dir / "lordba_model.safetensors").stat().st_size


def test_inspect_of_a_corrupt_adapter_exits_3(adapter_dir, capsys):
    path = adapter_dir / "lordba_model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert main(["inspect", str(adapter_dir)]) == 3
    assert "checksum mismatch" in capsys.readouterr().err


def test_export_lora_command(adapter_dir, tmp_path):
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "out")]) == 3
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "out"), "--overwrite", "--dtype", "bfloat16"]) == 0


def test_usage_errors_exit_2_and_every_command_has_help():
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {*LIBRARY_COMMANDS, *LAB_COMMANDS}  # the lab is installed in the test environment
    for name in sub.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0


def test_lab_commands_without_the_lab_say_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: [])
    assert main(["demo", "--quick"]) == 2
    assert "pip install -e lab" in capsys.readouterr().err
    assert "demo" not in {a for a in build_parser()._actions if a.dest == "command"}.pop().choices


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "lordba", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lordba" in proc.stdout
