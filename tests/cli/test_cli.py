import json
import os
import subprocess
import sys

import pytest
import torch

from lordba import LoRDBAConfig, cli, get_lordba_model
from lordba.cli import LAB_COMMANDS, build_parser, main

from conftest import tiny_llama

LIBRARY_COMMANDS = ("build-kernels", "cache", "chat", "convert", "export-lora", "generate", "inspect", "serve")


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


def test_a_closed_output_pipe_exits_141_quietly(adapter_dir):
    """``lordba inspect ... | head -0``: the reader is gone before the first line; no traceback, no
    "internal error", exit 141 as a shell reports SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "lordba", "inspect", str(adapter_dir)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_reader_that_leaves_during_a_table_exits_141(adapter_dir, monkeypatch):
    """``lordba inspect DIR | head -1``: the reader leaves after the first lines, while rich prints a table. rich's
    console exits with status 1 on a broken pipe (``SystemExit(1)``, nothing on stderr), so about half of such runs
    ended 1 where the CLI promises 141."""

    class ReaderGone:  # writes are taken, the flush finds the pipe closed
        def __init__(self):
            self.fd = os.open(os.devnull, os.O_WRONLY)

        def write(self, text):
            return len(text)

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False

        def fileno(self):
            return self.fd

    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert main(["inspect", str(adapter_dir)]) == 141


def run_python(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


HELP_WITHOUT_TORCH = """
import sys
from lordba.cli import build_parser, main
build_parser()
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy", "safetensors"))
assert not heavy, heavy
print("ok")
"""


def test_the_top_level_parser_and_help_import_no_torch(tmp_path):
    code, out, err = run_python(HELP_WITHOUT_TORCH, tmp_path)
    assert code == 0 and out.strip().endswith("ok"), err


def test_a_command_is_loaded_only_when_chosen():
    parser = build_parser("inspect")
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {a.dest for a in sub.choices["inspect"]._actions} >= {"directory", "json"}
    assert {a.dest for a in sub.choices["train"]._actions} == {"help"}  # not loaded
    assert sub.choices["train"].description.startswith("train a LoRDBA adapter")


@pytest.mark.parametrize(
    "option, value",
    [
        ("--steps", "0"),
        ("--r", "0"),
        ("--batch-size", "-1"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--alpha", "inf"),
        ("--lora-warmup", "1.5"),
        ("--seed", "-3"),
        ("--max-length", "x"),
        ("--device", "tpu"),
        ("--train-on", "everything"),
    ],
)
def test_bad_train_numbers_are_usage_errors_naming_the_option(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "o"), option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [",", "", " , "])
def test_train_target_modules_that_name_no_module_are_a_usage_error(value, tmp_path, capsys):
    """``--target-modules ","`` became an empty list and ``--target-modules ""`` an empty regex, refused (or not)
    only after the model and data were loaded; both are a usage error naming the flag, before any work."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "o"), "--target-modules", value])
    assert info.value.code == 2
    assert "--target-modules" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    parse = build_parser("train").parse_args
    assert parse(["train", "--out", "o", "--target-modules", "q_proj, ,v_proj"]).target_modules == ["q_proj", "v_proj"]
    assert parse(["train", "--out", "o", "--target-modules", "all-linear"]).target_modules == "all-linear"


def test_every_train_option_has_help_text():
    parser = build_parser("train")
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    options = [a for a in train._actions if a.dest != "help"]
    assert {"device", "bf16", "eval_data", "train_on"} <= {a.dest for a in options}
    missing = [a.option_strings for a in options if not a.help or a.help == "==SUPPRESS=="]
    assert not missing


MISSING_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if it were not installed
from lordba.cli import main
sys.exit(main(["demo", "--quick", "--quiet", "--out", "demo-out"]))
"""


def test_a_missing_optional_dependency_says_what_to_install(tmp_path):
    code, _, err = run_python(MISSING_MATPLOTLIB, tmp_path)
    assert code == 2, err
    assert "'matplotlib'" in err and "pip install -e lab" in err and "internal error" not in err
    assert not (tmp_path / "demo-out" / "results.json").exists()  # refused before any training


def test_optional_modules_map_to_their_extras():
    assert cli.missing_dependency_hint(ModuleNotFoundError(name="peft.tuners")) == "pip install 'lordba[peft]'"
    assert "lordba[quant]" in cli.missing_dependency_hint(ModuleNotFoundError(name="hqq"))
    assert cli.missing_dependency_hint(ModuleNotFoundError(name="no_such_module")) is None


def test_export_lora_that_cannot_write_its_output_exits_3(adapter_dir, tmp_path, capsys, monkeypatch):
    """A write that fails (a full disk, a read-only file system) is an error naming the output, not an
    internal error; no partial output is left."""
    import errno
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(tmp_path / "out") in err and "internal error" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_path_the_system_refuses_is_an_error_naming_it_not_an_internal_error(tmp_path, capsys, monkeypatch):
    """``lordba convert NAME OUT`` with a NAME longer than the file system takes (or, for a user, one in a folder
    they may not read: PermissionError) ended as an internal error with a traceback (exit 1); an ``OSError`` that
    names a path is the user's input: exit 3 naming it. One that names no path is still an internal error."""
    long = tmp_path / ("a" * 300)
    assert main(["convert", str(long), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert f"lordba convert: error: {long}: File name too long" in err
    assert "internal error" not in err and "Traceback" not in err

    def broken(args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("lordba.cli.inspect_cmd.run", broken)
    assert main(["inspect", str(tmp_path)]) == 1
    assert "internal error" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(port, capsys):
    """Before the model is loaded (it was an internal OverflowError from the socket's bind after loading)."""
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "no-such-folder", "--port", port])
    assert info.value.code == 2 and "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["bench", "--suite", "quant"], ["demo", "--quick"], ["reproduce", "--quick"], ["train"]]
)
def test_an_out_that_is_a_file_or_under_one_is_a_usage_error_before_any_work(command, tmp_path, capsys):
    """``--out`` naming a file (or a path under one) was an internal error (FileExistsError) from the
    command's first mkdir; it is a usage error naming the file, and nothing is run."""
    blocker = tmp_path / "results"
    blocker.write_text("a file\n")
    for out in (blocker, blocker / "run"):
        with pytest.raises(SystemExit) as info:
            main([*command, "--out", str(out)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err and f"{str(blocker)!r} is a file" in err
    assert blocker.read_text() == "a file\n"


def test_serve_lists_no_peft_lora_that_export_lora_wrote_beside_the_adapters(tmp_path):
    """``lordba export-lora runs/a runs/a_peft`` then ``lordba serve --adapters runs``: GET /v1/models listed
    ``a_peft`` (any folder with an adapter_config.json) as an adapter that can be served, and a request for it got
    a 400 'peft_type is LORA, not LORDBA'; a folder whose config names another adapter type is not listed."""
    from lordba import LoRDBAModel
    from lordba.serve.registry import AdapterRegistry

    torch.manual_seed(0)
    runs = tmp_path / "runs"
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random")).save_pretrained(runs / "a")
    assert main(["export-lora", str(runs / "a"), str(runs / "a_peft")]) == 0
    assert AdapterRegistry(LoRDBAModel(tiny_llama(0)), runs).names() == ["a"]


def test_library_warnings_show_as_one_line_and_still_follow_the_warning_filters(tmp_path):
    """A library UserWarning (export-lora of an adapter trained on a q4 base) printed as Python shows it: the
    library's source file and line (export_cmd.py:30) and the code line ``out = export_lora(...)`` under it. The
    CLI shows ``warning: <message>`` on one line; ``-W error`` still makes it an error; main restores the
    formatter it found."""
    import warnings

    from conftest import tiny_q4

    tiny_q4(True).save_pretrained(tmp_path / "a")
    command = [sys.executable, "-m", "lordba", "export-lora", str(tmp_path / "a")]
    proc = subprocess.run([*command, str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "base quantized as" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: export_lora: this adapter was trained"), proc.stderr
    assert ".py:" not in proc.stderr and "export_lora(" not in proc.stderr, proc.stderr
    strict = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", *command[1:], str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert strict.returncode != 0 and "base quantized as" in strict.stderr and not (tmp_path / "c").exists()
    before = warnings.formatwarning
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert warnings.formatwarning is before


def test_a_dependencys_deprecation_of_anothers_use_is_not_shown_and_the_filters_are_given_back(monkeypatch):
    """``lordba demo`` (and train, bench) printed ``warning: `is_gradient_checkpointing` is deprecated ... Use
    `is_activation_checkpointing` instead`` twice: transformers 5 warning about PEFT's get_peft_model reading the old
    name, nothing its user can change. It is not shown while a command runs; the library's own warnings still are,
    and the caller's warning filters are as they were after."""
    import types
    import warnings

    import lordba.cli as cli

    def run(args):
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("a warning of the command's own", UserWarning, stacklevel=1)
        return 0

    module = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "commands", lambda: [cli.Command("warns", "warns", lambda: module)])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        assert cli.main(["warns"]) == 0
        assert warnings.filters == before
    assert [str(w.message) for w in shown] == ["a warning of the command's own"]


def test_main_in_a_second_thread_while_a_command_runs_is_refused_and_leaves_the_process_as_it_was(monkeypatch, capsys):
    """Two threads each calling ``lordba.cli.main`` (a test harness, a notebook), the first to begin ending first: the
    second had saved the first's changes as the process's state and put them back last, so the caller kept the first
    command's seeded generator, the CLI's warning format and bitsandbytes' CPU logger at ERROR for good. A call while
    another thread's runs is now refused (exit 2, said on stderr), and the first's changes are given back when it
    ends."""
    import logging
    import threading
    import types
    import warnings

    started, release, calls, codes = threading.Event(), [threading.Event(), threading.Event()], [], {}
    second_went_on = threading.Event()  # (its command began, or its call was refused)

    def run(args):
        k = len(calls)
        calls.append(k)
        torch.manual_seed(5)  # (as the lab's train and bench do)
        (started if k == 0 else second_went_on).set()
        assert release[k].wait(20)
        return 0

    def call(name):
        codes[name] = main(["holding"])
        second_went_on.set()

    module = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "commands", lambda: [cli.Command("holding", "holds", lambda: module)])
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    generator, formatwarning, level = torch.get_rng_state(), warnings.formatwarning, log.level
    first, second = (threading.Thread(target=call, args=(name,), daemon=True) for name in ("first", "second"))
    first.start()
    assert started.wait(20)
    second.start()
    assert second_went_on.wait(20)
    release[0].set()
    first.join(20)
    release[1].set()
    second.join(20)
    assert codes == {"first": 0, "second": cli.EXIT_USAGE} and calls == [0]
    assert "another lordba command is running in this process" in capsys.readouterr().err
    assert torch.equal(torch.get_rng_state(), generator) and warnings.formatwarning is formatwarning
    assert log.level == level
    assert main(["holding"]) == 0 and calls == [0, 1]  # (a command runs again once the other ended)
    assert torch.equal(torch.get_rng_state(), generator)
