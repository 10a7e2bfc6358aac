from lordba._util.patterns import matches
from lordba.nn.targets import find_targets

from conftest import tiny_llama


def test_list_regex_and_all_linear():
    model = tiny_llama()
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, r".*layers\.1\.mlp\.\w+_proj") == [
        f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    ]
    every = find_targets(model, None)
    assert len(every) == 14 and "lm_head" not in every and find_targets(model, "all-linear") == every
    assert len(find_targets(model, None, exclude_modules=["down_proj"])) == 12


def test_suffix_matching_is_on_whole_names():
    assert matches(["q_proj"], "a.q_proj") and not matches(["proj"], "a.q_proj") and matches(["a.q_proj"], "a.q_proj")
    assert not matches(None, "x")


def test_output_head_rule_and_submodule_replacement():
    from torch import nn

    from lordba._util.modules import is_output_head, replace_submodule

    assert is_output_head("lm_head") and is_output_head("model.score") and is_output_head("classifier")
    assert not is_output_head("model.layers.0.mlp.up_proj") and not is_output_head("lm_head.scale")
    model = tiny_llama()
    new = nn.Linear(1, 1)
    replace_submodule(model, "model.layers.1.mlp.up_proj", new)
    assert model.model.layers[1].mlp.up_proj is new
    head = nn.Linear(1, 1)
    replace_submodule(model, "lm_head", head)
    assert model.lm_head is head


def test_all_linear_and_quantization_skip_the_same_heads():
    from torch import nn

    from lordba.quant.quantize import quantizable

    model = tiny_llama()
    model.score = nn.Linear(8, 2)
    model.model.classifier = nn.Linear(8, 2)
    adapted = find_targets(model, None)
    quantized = [name for name, _ in quantizable(model)]
    assert adapted == quantized and len(adapted) == 14
