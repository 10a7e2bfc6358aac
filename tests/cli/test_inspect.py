"""``lordba inspect``: modules in natural order, and the hint for tools that cannot read LoRDBA."""

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba import LoRDBAConfig, get_lordba_model
from lordba.cli import main
from lordba.cli.inspect_cmd import natural_key
from lordba.format.sizes import size_report

from conftest import TINY


@pytest.fixture(scope="module")
def deep_adapter(tmp_path_factory):
    """An adapter on a 12-layer model: lexicographic order would put layers.10 before layers.2."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 12}))
    lm = get_lordba_model(model, LoRDBAConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path_factory.mktemp("deep")
    lm.save_pretrained(out)
    return out


def layer_numbers(text):
    return [int(n) for n in re.findall(r"model\.layers\.(\d+)\.self_attn\.q_proj", text)]


def test_natural_key_orders_numbers_as_numbers():
    names = ["m.layers.10.q", "m.layers.2.q", "m.layers.1.q", "m.layers.2.k", "m.head"]
    assert sorted(names, key=natural_key) == ["m.head", "m.layers.1.q", "m.layers.2.k", "m.layers.2.q", "m.layers.10.q"]


def test_inspect_table_lists_layers_in_numeric_order(deep_adapter, capsys):
    assert main(["inspect", str(deep_adapter)]) == 0
    assert layer_numbers(capsys.readouterr().out) == list(range(12))


def test_inspect_json_lists_layers_in_numeric_order(deep_adapter, capsys):
    assert main(["inspect", str(deep_adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert layer_numbers(" ".join(m["path"] for m in report["size"]["modules"])) == list(range(12))


def test_inspect_conversion_table_in_numeric_order(deep_adapter, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(deep_adapter, adapter)
    paths = sorted(f"model.layers.{i}.self_attn.q_proj" for i in range(12))  # lexicographic, as a tool might write
    layers = [{"path": p, "r_lora": 4, "r": 2, "rel_error": 0.1, "rmr_A": 0.0, "rmr_B": 0.0} for p in paths]
    (adapter / "conversion_report.json").write_text(json.dumps({"layers": layers, "totals": {}}))
    assert main(["inspect", str(adapter)]) == 0
    conversion = capsys.readouterr().out.split("conversion (stored errors")[1]
    assert layer_numbers(conversion) == list(range(12))


def test_inspect_says_how_to_use_it_with_peft_and_transformers(deep_adapter, capsys):
    assert main(["inspect", str(deep_adapter)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table printer may wrap lines
    assert "KeyError: 'LORDBA'" in out and "lordba export-lora" in out and "AutoLoRDBAModelForCausalLM" in out
    assert main(["inspect", str(deep_adapter), "--json"]) == 0
    assert "lordba export-lora" in json.loads(capsys.readouterr().out)["hint"]


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_a_bad_reference_rank_is_a_usage_error(deep_adapter, value, capsys):
    """--r-ref 0 was the default silently, a negative one printed negative sizes and ratios."""
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(deep_adapter), "--r-ref", value])
    assert info.value.code == 2 and "--r-ref" in capsys.readouterr().err


def test_a_conversion_report_with_odd_layer_paths_is_shown_not_fatal(deep_adapter, tmp_path, capsys):
    """The sidecar is informational: a layer path with a digit run past Python's 4300-digit int limit, or one
    with a non-ASCII digit (``str.isdigit("²")``), was sorted with ``int()`` and ended in an internal error."""
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(deep_adapter, adapter)
    paths = ["x." + "9" * 5000, "y.1²", "m.layers.10.q", "m.layers.2.q", "m.layers.02.k", "²"]
    (adapter / "conversion_report.json").write_text(json.dumps({"layers": [{"path": p} for p in paths]}))
    assert main(["inspect", str(adapter)]) == 0
    assert "conversion (stored errors" in capsys.readouterr().out
    assert sorted(["m.layers.10.q", "m.layers.2.q", "m.layers.02.k", "m.layers.9"], key=natural_key) == [
        "m.layers.02.k",
        "m.layers.2.q",
        "m.layers.9",
        "m.layers.10.q",
    ]


@pytest.mark.parametrize("totals", [[1], 5, "x"])
def test_a_conversion_report_with_odd_totals_is_shown_not_fatal(deep_adapter, tmp_path, totals, capsys):
    """The sidecar is informational: totals that are not an object are not an internal error."""
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(deep_adapter, adapter)
    (adapter / "conversion_report.json").write_text(json.dumps({"layers": [], "totals": totals}))
    assert main(["inspect", str(adapter)]) == 0
    assert "relative error of ΔW None" in capsys.readouterr().out


def test_inspect_prints_the_whole_sha256_of_the_weights(deep_adapter, capsys):
    """docs/security.md: to pin an adapter, compare the sha256 that ``lordba inspect`` prints with one from a
    trusted channel; a 16-digit prefix is no sha256 to compare (and 64 bits are within a collision search)."""
    digest = json.loads((deep_adapter / "adapter_config.json").read_text())["weights_sha256"]
    assert main(["inspect", str(deep_adapter)]) == 0
    assert digest in capsys.readouterr().out
    assert main(["inspect", str(deep_adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sha256"] == digest and digest in report["checksum"]


@pytest.mark.parametrize("version", [1, 3])
def test_inspect_json_reports_the_files_format_version(deep_adapter, tmp_path, capsys, version):
    """The JSON report's config is the file's: a version-3 file (what saves write) is not reported as version 1."""
    lm = get_lordba_model(LlamaForCausalLM(LlamaConfig(**TINY)), LoRDBAConfig(r=2, target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path, format_version=version)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == version
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["format_version"] == version


@pytest.mark.parametrize("version", [1, 3])
def test_tensors_trained_in_full_are_reported_apart_from_the_adapters_size(tmp_path, capsys, version):
    """A modules_to_save head is stored whole beside the branches: its bytes were counted as the LoRDBA file's,
    so the tiny adapter below read as 215 bits per LoRA parameter and 0.10x "smaller" than an fp16 LoRA (whose
    reference leaves the head out), where its size_report and ``lordba convert`` say 1.85x smaller. The size is
    the branches' (as those report it), the trained-in-full bytes a line of their own."""
    torch.manual_seed(0)
    config = LoRDBAConfig(r=4, init="random", target_modules=["q_proj"], modules_to_save=["lm_head"])
    lm = get_lordba_model(LlamaForCausalLM(LlamaConfig(**TINY)), config)
    lm.save_pretrained(tmp_path, format_version=version)  # version 1 with extras: a version-2 file
    expected = size_report(lm.adapter_state().dims(), "float16", format_version=version)
    head_bytes = TINY["vocab_size"] * TINY["hidden_size"] * 4
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"]["file_bytes"] == expected.file_bytes and report["size"]["bpw_lora"] == expected.bpw_lora
    assert report["size"]["ratio_file"] == pytest.approx(expected.ratio_file) and expected.ratio_file > 1
    assert report["extra_tensor_bytes"] == head_bytes
    assert report["weights_file_bytes"] == (tmp_path / "lordba_model.safetensors").stat().st_size
    assert main(["inspect", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"plus {head_bytes:,} bytes of tensors trained in full" in out


@pytest.mark.parametrize("rank_pattern", [{}, {"layers.1.self_attn.q_proj": 4}])
def test_inspect_compares_a_converted_adapter_with_the_source_loras_ranks(tmp_path, capsys, rank_pattern):
    """``lordba convert --r 2`` of an r=8 LoRA printed 4.800 BPW (LoRA basis) and 4.02x smaller than the LoRA, then
    ``lordba inspect`` of its output showed 19.2 BPW and 1.52x against an fp16 LoRA of the adapter's own rank 2
    unless given ``--r-ref 8``. The sidecar records the LoRA's ranks (one per layer: a rank_pattern LoRA too):
    they are the default reference, and the output says so; ``--r-ref`` still wins."""
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama

    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=["q_proj"], rank_pattern=rank_pattern, init_lora_weights=False)
    get_peft_model(tiny_llama(), lora).save_pretrained(tmp_path / "lora")
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "lora"), str(out), "--quiet", "--iters", "1", "--r", "2"]) == 0
    totals = json.loads((out / "conversion_report.json").read_text())["totals"]
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"]["bpw_lora"] == pytest.approx(totals["bpw_lora"])
    assert report["size"]["fp16_lora_file_bytes"] == totals["lora_fp16_file_bytes"]
    assert report["size"]["ratio_file"] == pytest.approx(totals["ratio_vs_lora_fp16_file"])
    assert sorted(m["r_ref"] for m in report["size"]["modules"]) == sorted([8, 4 if rank_pattern else 8])
    assert "conversion_report.json" in report["r_ref"]
    assert main(["inspect", str(out)]) == 0
    assert "source LoRA's ranks (conversion_report.json)" in " ".join(capsys.readouterr().out.split())
    assert main(["inspect", str(out), "--json", "--r-ref", "2"]) == 0
    own = json.loads(capsys.readouterr().out)["size"]
    assert own["bpw_lora"] > 2 * totals["bpw_lora"] and {m["r_ref"] for m in own["modules"]} == {2}
