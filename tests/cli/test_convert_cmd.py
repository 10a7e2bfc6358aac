"""``lordba convert``: its ``--report`` path is checked before the conversion's work."""

import pytest
import torch

from lordba.cli import main

from conftest import tiny_llama


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A small PEFT LoRA on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("lora") / "lora"
    model.save_pretrained(out)
    return out


def test_the_report_is_written_as_json_and_markdown(lora_dir, tmp_path, capsys):
    argv = ["convert", str(lora_dir), str(tmp_path / "out"), "--quiet", "--iters", "2"]
    assert main([*argv, "--report", str(tmp_path / "report.json")]) == 0
    assert (tmp_path / "report.json").read_text().startswith("{") and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("where", ["missing/report.json", "folder", "report.md"])
def test_a_report_path_that_cannot_take_the_report_is_refused_before_converting(lora_dir, tmp_path, where, capsys):
    """A report in a folder that does not exist, a folder, or ``.md`` (the Markdown written beside it would
    replace the JSON): exit 3 naming --report, before the work and without writing the adapter; these
    were an internal error after the conversion, or a lost JSON report."""
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    argv = ["convert", str(lora_dir), str(out), "--quiet", "--iters", "2", "--report", str(tmp_path / where)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "--report" in err and "internal error" not in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["adapter_model.safetensors", "README.json", "sub/report.json"])
def test_a_report_inside_the_source_or_the_output_folder_is_refused_before_converting(
    lora_dir, tmp_path, where, capsys
):
    """``--report PEFT_DIR/adapter_model.safetensors`` wrote the JSON report over the LoRA's weights (exit 0; the
    LoRA could not be read again), ``README.json`` its Markdown over README.md; an OUT_DIR inside PEFT_DIR
    added a folder to it. Both are refused (exit 3 naming the path), before any work, as a report inside the
    OUT_DIR replaced (it would replace a file of the adapter), and PEFT_DIR is left as it was."""
    import shutil

    source = shutil.copytree(lora_dir, tmp_path / "lora")
    (source / "sub").mkdir()
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    argv = ["convert", str(source), str(tmp_path / "out"), "--quiet", "--iters", "1"]
    assert main([*argv, "--report", str(source / where)]) == 3
    assert f"--report {source / where}: inside {source} (PEFT_DIR" in capsys.readouterr().err
    assert main(["convert", str(source), str(source / "lordba"), "--quiet", "--iters", "1"]) == 3
    assert f"OUT_DIR {source / 'lordba'}: inside {source} (PEFT_DIR" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in source.iterdir()) == sorted(["sub", *(p.name for p in lora_dir.iterdir())])
    assert not (tmp_path / "out").exists()
    assert main(argv) == 0
    assert main([*argv, "--overwrite", "--report", str(tmp_path / "out" / "adapter_config.json")]) == 3
    assert main(["inspect", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("report, out", [("out", "out"), ("out.json", "out.md")])
def test_a_report_that_is_the_output_folder_to_be_written_is_refused_before_converting(
    lora_dir, tmp_path, report, out, capsys
):
    """``--report OUT_DIR`` (or a report whose Markdown is OUT_DIR) with an OUT_DIR not yet written passed the check
    (only an existing OUT_DIR was looked at): the conversion ran and wrote the adapter, then the report failed
    (exit 3, "cannot write it (Is a directory)"), the JSON written and the Markdown not. Refused before the work."""
    argv = ["convert", str(lora_dir), str(tmp_path / out), "--quiet", "--iters", "1"]
    assert main([*argv, "--report", str(tmp_path / report)]) == 3
    assert f"inside {tmp_path / out} (OUT_DIR" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value",
    [
        ("--r", "0"),
        ("--r", "x"),
        ("--alpha", "0"),
        ("--alpha", "nan"),
        ("--iters", "-1"),
        ("--admm-iters", "-3"),
        ("--tol", "nan"),
        ("--tol", "-1"),
        ("--target-bpw", "0"),
        ("--target-bpw", "inf"),
        ("--target-bpw", "100"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(lora_dir, tmp_path, option, value, capsys):
    """As for ``lordba train`` (the CLI's exit codes: 2 for bad arguments): these were exit code 3, the code
    of a bad or corrupt input file, from the library's checks after the output folder was checked."""
    with pytest.raises(SystemExit) as info:
        main(["convert", str(lora_dir), str(tmp_path / "out"), "--quiet", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_edges_of_the_numbers_ranges_are_accepted(lora_dir, tmp_path, capsys):
    argv = ["convert", str(lora_dir), str(tmp_path / "out"), "--quiet", "--iters", "0", "--admm-iters", "0"]
    assert main([*argv, "--tol", "0", "--target-bpw", "32"]) == 0


def test_a_rank_past_any_use_is_refused_naming_the_layer_and_the_limit(lora_dir, tmp_path, capsys):
    """``--r 1000000`` on the tiny model's 40×40 q_proj: the solve ran a minute and failed to allocate 16 TB (an
    internal error); a rank whose signs alone outweigh ΔW in float32 (here above 640) is a usage error, before
    the work. A rank above min(in, out) below that limit converts."""
    out = tmp_path / "out"
    assert main(["convert", str(lora_dir), str(out), "--quiet", "--r", "1000000"]) == 3
    err = capsys.readouterr().err
    assert "q_proj" in err and "640" in err and "internal error" not in err
    assert not out.exists()
    assert main(["convert", str(lora_dir), str(out), "--quiet", "--iters", "1", "--admm-iters", "0", "--r", "48"]) == 0


def test_an_adapter_name_the_peft_folder_lacks_is_refused_rather_than_converting_the_default(tmp_path, capsys):
    """``lordba convert PEFT OUT --adapter-name nope`` with no subfolder ``nope`` converted PEFT's default adapter
    (exit 0: the wrong adapter, silently); ``--adapter-name other`` reads the subfolder, and the subfolder itself
    read under its own name still converts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    argv = ["--quiet", "--iters", "1"]
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "a"), "--adapter-name", "nope", *argv]) == 3
    err = capsys.readouterr().err
    assert "no adapter 'nope'" in err and "['other']" in err and not (tmp_path / "a").exists()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "b"), "--adapter-name", "other", *argv]) == 0
    other = ["convert", str(tmp_path / "peft" / "other"), str(tmp_path / "c"), "--adapter-name", "other", *argv]
    assert main(other) == 0
    assert "2 layers" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["bcd", "init"])
def test_admm_iterations_with_a_method_that_runs_no_admm_are_refused_not_ignored(lora_dir, tmp_path, method, capsys):
    """``--method bcd --admm-iters 40`` converted with no ADMM at all (exit 0): the flag was dropped silently. It
    is refused naming both options, before the work (a usage error, as --iters and --tol with a method that runs no
    BCD); ``--admm-iters 0`` (no ADMM) still goes with any method."""
    out = tmp_path / "out"
    argv = ["convert", str(lora_dir), str(out), "--quiet", "--method", method, *(["--iters", "1"] * (method == "bcd"))]
    assert main([*argv, "--admm-iters", "40"]) == 2
    err = capsys.readouterr().err
    assert "--admm-iters 40" in err and f"--method {method}" in err and not out.exists()
    assert main([*argv, "--admm-iters", "0"]) == 0
    assert main(["convert", str(lora_dir), str(tmp_path / "b"), "--quiet", "--iters", "1", "--method", "admm+bcd",
                 "--admm-iters", "2"]) == 0  # fmt: skip


@pytest.mark.parametrize("method", ["admm", "init"])
@pytest.mark.parametrize("option, value", [("--iters", "5"), ("--tol", "0.5")])
def test_bcd_options_with_a_method_that_runs_no_bcd_are_refused_not_ignored(
    lora_dir, tmp_path, method, option, value, capsys
):
    """``--method admm --iters 5`` (or ``--tol``) converted with no BCD at all (exit 0): their defaults were not
    None, so the command could not tell them given. They are refused as a usage error (exit 2) naming the option
    and the method, before the work; ``--iters 0`` (no BCD) still goes with any method, and both with bcd."""
    out = tmp_path / "out"
    argv = ["convert", str(lora_dir), str(out), "--quiet", "--method", method]
    assert main([*argv, option, value]) == 2
    err = capsys.readouterr().err
    assert f"{option} {value}" in err and f"--method {method}" in err and "internal error" not in err
    assert not out.exists()
    assert main([*argv, "--iters", "0"]) == 0
    assert main(["convert", str(lora_dir), str(tmp_path / "b"), "--quiet", "--method", "bcd", option, value]) == 0
