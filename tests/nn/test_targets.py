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
