"""Public calls given arguments a user mistypes: a ConfigError naming the argument, nothing half done; and a call
PEFT makes without preparation."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lordba import (
    ConfigError,
    LoRDBAConfig,
    get_lordba_model,
    get_lordba_model_state_dict,
    set_lordba_model_state_dict,
)

from conftest import tiny_llama


def test_get_lordba_model_without_a_config_is_refused():
    """``get_lordba_model(model, None)`` made a wrapper without adapter: training it updated nothing."""
    with pytest.raises(ConfigError, match="config must be a LoRDBAConfig, got NoneType"):
        get_lordba_model(tiny_llama(), None)


@pytest.mark.parametrize("selected", [5, [1], [None]])
def test_save_pretrained_of_selected_adapters_that_are_no_names_is_refused(tmp_path, selected):
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4))
    with pytest.raises(ConfigError, match="selected_adapters must be an adapter name or a list of names"):
        lm.save_pretrained(tmp_path / "out", selected_adapters=selected)
    assert not (tmp_path / "out").exists()


def test_the_state_dict_functions_refuse_a_plain_model_and_a_state_dict_that_is_no_mapping():
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4))
    with pytest.raises(ConfigError, match="must be a LoRDBAModel"):
        get_lordba_model_state_dict(tiny_llama())
    with pytest.raises(ConfigError, match="must be a LoRDBAModel"):
        set_lordba_model_state_dict(tiny_llama(), get_lordba_model_state_dict(lm))
    before = {k: v.clone() for k, v in get_lordba_model_state_dict(lm).items()}
    with pytest.raises(ConfigError, match="state_dict must be a dict of tensors, got None"):
        set_lordba_model_state_dict(lm, None)
    assert all(torch.equal(v, before[k]) for k, v in get_lordba_model_state_dict(lm).items())
    set_lordba_model_state_dict(lm, before)  # the right arguments still load


def test_add_weighted_adapter_finds_the_converters_solver_without_importing_lordba_convert():
    """A combination that needs the dense solver refused with "import lordba.convert first" unless the user had
    imported it (PEFT just runs it); the solver is now found through its ``lordba.combiners`` entry point."""
    script = textwrap.dedent(
        """
        import sys, warnings
        from lordba import LoRDBAConfig, get_lordba_model
        from conftest import tiny_llama

        lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4), "a")
        lm.add_adapter("b", LoRDBAConfig(r=4))
        assert "lordba.convert" not in sys.modules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c", combination_type="svd", svd_rank=4)
        print("ranks", sorted({lm.peft_config["c"].r}))
        """
    )
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tests).parent / "src"), tests])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ranks [4]" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-3000:]


def test_save_pretrained_of_an_adapter_named_twice_or_by_a_generator_saves_it(tmp_path):
    """Since the adapters are committed together, a folder named twice was backed up twice ("cannot save (File
    exists)"), and the names' check consumed a generator, which then saved nothing, silently."""
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4))
    lm.add_adapter("other", LoRDBAConfig(r=2))
    lm.save_pretrained(tmp_path / "twice")
    lm.save_pretrained(tmp_path / "twice", selected_adapters=["other", "other"])
    left = sorted(os.listdir(tmp_path / "twice" / "other"))
    assert left == ["README.md", "adapter_config.json", "lordba_model.safetensors"]
    lm.save_pretrained(tmp_path / "gen", selected_adapters=(n for n in ["default", "other"]))
    assert (tmp_path / "gen" / "lordba_model.safetensors").is_file()
    assert (tmp_path / "gen" / "other" / "lordba_model.safetensors").is_file()


def test_a_combiner_entry_point_that_cannot_load_is_an_adapter_state_error_naming_it(monkeypatch):
    """Stale install metadata (an entry point naming a module that is gone) raised a bare ImportError, which the CLI
    reports as an internal error."""
    import importlib.metadata

    from lordba import AdapterStateError
    from lordba.nn import model_combine

    group = model_combine.COMBINER_ENTRY_POINTS
    broken = importlib.metadata.EntryPoint("dense", "lordba.no_such_module:combine", group)
    monkeypatch.setattr(model_combine, "_COMBINERS", {})
    monkeypatch.setattr(model_combine.importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(AdapterStateError, match=r"entry point 'dense' \(lordba.no_such_module:combine\) cannot be"):
        model_combine._registered_combiner("dense")


def test_an_adapter_training_the_head_in_full_on_a_base_that_quantized_it_is_refused_saying_what_to_do(tmp_path):
    """The q4 base quantizes the output head (8-bit); an adapter that trained it in full (converted from a PEFT LoRA
    with modules_to_save=["lm_head"]) was refused with "module 'lm_head' has no parameter 'weight'"."""
    from lordba import AdapterFormatError, LoRDBAModel
    from lordba.quant import quantize_model

    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, modules_to_save=["lm_head"]))
    lm.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterFormatError, match=r"'lm_head' is quantized in this base .*head_bits=0"):
        LoRDBAModel.from_pretrained(quantize_model(tiny_llama(), backend="q4"), tmp_path / "a")
    loaded = LoRDBAModel.from_pretrained(quantize_model(tiny_llama(), backend="q4", head_bits=0), tmp_path / "a")
    assert "lm_head" in str(loaded.peft_config["default"].modules_to_save)
