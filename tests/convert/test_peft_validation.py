"""``lordba convert`` validates the PEFT side as strictly as lordba's own files: every bad field,
pattern, factor or module path is a ConversionError/ConfigError naming it (never a raw exception or
a hang), residual-base initialisations are refused, and nothing is written that lordba cannot read."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lordba import ConfigError, ConversionError, LoRDBAError
from lordba.convert import convert_lora, read_lora, save_converted
from lordba.errors import AdapterFormatError
from lordba.format.adapter import read_adapter

Q = "model.layers.0.self_attn.q_proj"


def peft_dir(tmp_path, config=None, factors=None, name="lora"):
    """A hand-written PEFT LoRA directory: ``factors`` = ``{module path: (A, B)}``."""
    torch.manual_seed(0)
    factors = factors if factors is not None else {Q: (torch.randn(2, 40), torch.randn(40, 2) * 0.1)}
    tensors = {}
    for path, (A, B) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
    out = tmp_path / name
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **(config or {})}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_a_valid_hand_written_lora_converts(tmp_path):
    state, _ = convert_lora(peft_dir(tmp_path), iters=1, progress=False)
    assert list(state.modules) == [Q]


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"rank_pattern": {r"(q)\1": 2}}, ConfigError, "rank_pattern key"),
        ({"alpha_pattern": {"(?=q)q_proj": 2}}, ConfigError, "alpha_pattern key"),
        ({"rank_pattern": {"(": 2}}, ConfigError, "rank_pattern key"),
        ({"rank_pattern": "q_proj"}, ConversionError, "field rank_pattern must be an object"),
        ({"rank_pattern": {"q_proj": "2"}}, ConversionError, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": {"q_proj": 0}}, ConversionError, r"rank_pattern\['q_proj'\]"),
        ({"alpha_pattern": {"q_proj": "x"}}, ConversionError, r"alpha_pattern\['q_proj'\] must be a positive"),
        ({"alpha_pattern": {"q_proj": -1}}, ConversionError, r"alpha_pattern\['q_proj'\]"),
        ({"lora_alpha": 10**400}, ConversionError, "lora_alpha must be a positive number"),
        ({"r": 1 << 40}, ConversionError, "field r must be a positive integer"),
        ({"use_rslora": "false"}, ConversionError, "use_rslora must be true or false"),
    ],
)
def test_bad_peft_fields_are_refused_naming_the_field(tmp_path, config, error, match):
    with pytest.raises(error, match=match):
        read_lora(peft_dir(tmp_path, config))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "lora_ga"])
def test_residual_base_initialisations_are_refused(tmp_path, init):
    with pytest.raises(ConversionError, match=r"init_lora_weights=.*residual base"):
        read_lora(peft_dir(tmp_path, {"init_lora_weights": init}))


def test_an_olora_init_named_in_another_case_is_refused(tmp_path):
    """PEFT runs OLoRA (which rewrites the base weight) for ``init_lora_weights`` equal to "olora" in any case:
    ``"OLoRA"`` converted without a word, its factors fitted to a base the user does not have (at step 0 the
    PeftModel gives the base's outputs, the converted adapter adds B0 A0 to them)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama

    base = tiny_llama()
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="OLoRA"))
    assert not torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    model.save_pretrained(tmp_path / "olora")
    for source in (tmp_path / "olora", model):
        with pytest.raises(ConversionError, match=r"init_lora_weights='OLoRA': a OLoRA-initialised LoRA"):
            read_lora(source)


def test_a_loftq_config_is_refused_and_ordinary_inits_are_not(tmp_path):
    with pytest.raises(ConversionError, match="LoftQ"):
        read_lora(peft_dir(tmp_path, {"loftq_config": {"loftq_bits": 4}}, name="a"))
    for i, init in enumerate([True, False, "gaussian", "eva", "orthogonal", "mica"]):
        assert Q in read_lora(peft_dir(tmp_path, {"init_lora_weights": init}, name=f"ok{i}")).layers


@pytest.mark.parametrize(
    "A, B, match",
    [
        (torch.randn(2, 0), torch.randn(40, 2), "cannot be empty"),
        (torch.randn(2, 40), torch.randn(0, 2), "cannot be empty"),
        (torch.full((2, 40), 3e38), torch.full((40, 2), 3e38), "float32 arithmetic"),
        (torch.full((2, 40), 1e20), torch.full((40, 2), 1e20), "float32 arithmetic"),
    ],
)
def test_empty_or_overflowing_factors_are_refused(tmp_path, A, B, match):
    with pytest.raises(ConversionError, match=match):
        convert_lora(peft_dir(tmp_path, factors={Q: (A, B)}), iters=1, progress=False)


def test_a_huge_lora_alpha_is_refused_naming_it(tmp_path):
    with pytest.raises(ConversionError, match="lora_alpha"):
        convert_lora(peft_dir(tmp_path, {"lora_alpha": 1e308}), iters=1, progress=False)


@pytest.mark.parametrize("path", ["model.layers.0.self attn.q_proj", "model.é.q_proj", "m." * 130 + "q_proj"])
def test_module_paths_lordba_cannot_load_are_refused_before_any_work(tmp_path, path):
    lora = peft_dir(tmp_path, factors={path: (torch.randn(2, 40), torch.randn(40, 2))})
    with pytest.raises(ConversionError, match="is not a module path"):
        read_lora(lora)


def test_nothing_is_written_that_the_loader_refuses(tmp_path, monkeypatch):
    from lordba.convert import pipeline

    state, report = convert_lora(peft_dir(tmp_path), iters=1, progress=False)

    def refuse(directory, **kwargs):
        raise AdapterFormatError(f"{directory}: refused for the test")

    monkeypatch.setattr(pipeline, "read_adapter", refuse)
    with pytest.raises(ConversionError, match="cannot read back"):
        save_converted(state, report, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_the_output_is_read_back_and_never_replaces_its_source(tmp_path):
    source = peft_dir(tmp_path)
    state, report = convert_lora(source, iters=1, progress=False)
    save_converted(state, report, tmp_path / "out")
    assert list(read_adapter(tmp_path / "out").modules) == [Q]
    for out in (source, tmp_path):
        with pytest.raises(LoRDBAError, match="would delete"):
            save_converted(state, report, out, overwrite=True)
    assert (source / "adapter_model.safetensors").is_file()


def test_hostile_rank_pattern_through_the_command_line_finishes(tmp_path):
    """A pattern key that backtracks exponentially in Python's engine on the module name the same
    file supplies: ``lordba convert`` finishes (a 30 s timeout, not a speed target)."""
    name = "a" * 30
    lora = peft_dir(
        tmp_path,
        {"rank_pattern": {"(a|a)?" * 30 + "b": 3, "a?" * 30 + "a" * 30: 2}},  # the first never matches
        factors={name: (torch.randn(2, 8), torch.randn(8, 2))},
    )
    cmd = [sys.executable, "-m", "lordba", "convert", str(lora), str(tmp_path / "out"), "--iters", "1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(read_adapter(tmp_path / "out").modules) == [name]


def test_a_peft_layers_pattern_alone_is_dropped_as_it_selected_nothing(tmp_path):
    """Older PEFT wrote ``layers_pattern`` without ``layers_to_transform`` (all layers adapted); the converted
    config leaves it out instead of refusing it (lordba refuses it alone, as today's PEFT does)."""
    from lordba.convert.peft_reader import peft_fields

    assert peft_fields({"layers_pattern": "layers", "lora_dropout": 0.1}, "x") == {"dropout": 0.1}
    kept = {"layers_pattern": "layers", "layers_to_transform": [0]}
    assert peft_fields(kept, "x") == kept
    assert Q in read_lora(peft_dir(tmp_path, {"layers_pattern": "layers"})).layers


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_read_as_their_float32_values(tmp_path, dtype):
    """safetensors stores F8_E4M3 / F8_E5M2 factors; torch has no isfinite / max for float8, which crashed the
    reader with a bare NotImplementedError. They now read as the float32 values they hold."""
    A, B = torch.randn(2, 40).to(dtype), (torch.randn(40, 2) * 0.1).to(dtype)
    got = read_lora(peft_dir(tmp_path, factors={Q: (A, B)}))
    assert torch.equal(got.layers[Q].A, A.float()) and torch.equal(got.layers[Q].B, B.float())


def test_float8_factors_holding_inf_are_refused_naming_the_tensor(tmp_path):
    A = torch.randn(2, 40).to(torch.float8_e5m2)
    A[0, 3] = float("inf")
    with pytest.raises(ConversionError, match=r"lora_A\.weight holds NaN or infinite"):
        read_lora(peft_dir(tmp_path, factors={Q: (A, torch.randn(40, 2).to(torch.float8_e5m2))}))


@pytest.mark.parametrize("field", ["peft_type", "use_dora"])
def test_a_huge_untrusted_field_is_shortened_in_the_error(tmp_path, field):
    """A downloaded adapter_config.json's field is quoted in the refusal, not pasted whole (1 MB here)."""
    with pytest.raises(ConversionError) as err:
        read_lora(peft_dir(tmp_path, {field: "x" * 1_000_000}))
    assert field in str(err.value) and len(str(err.value)) < 2000
