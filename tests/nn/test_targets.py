import pytest
from torch import nn

from lordba._util.patterns import matches
from lordba.errors import TargetModulesError
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


def test_a_target_whose_path_no_adapter_file_can_hold_is_refused_before_training(tmp_path):
    """A module path outside the file format's rule (here ':' and a space in a ModuleDict key) was
    adapted and trained, and only save_pretrained (or the Trainer callback's first checkpoint)
    refused it: the run could not be saved. It is refused when the adapter is added."""
    import pytest
    import torch
    from torch import nn

    from lordba import LoRDBAConfig, TargetModulesError, get_lordba_model

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleDict({"attn:0": nn.Linear(4, 4), "ffn 1": nn.Linear(4, 4), "out": nn.Linear(4, 4)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.blocks.values():
                x = layer(x)
            return x

    model = Blocks()
    with pytest.raises(TargetModulesError, match=r"'blocks\.attn:0'.*not a module path.*exclude_modules"):
        get_lordba_model(model, LoRDBAConfig(r=2))
    assert all(type(m) is nn.Linear for m in model.blocks.values())  # left as it was
    with pytest.raises(TargetModulesError, match=r"'blocks\.ffn 1'"):
        find_targets(model, ["ffn 1"])
    lm = get_lordba_model(model, LoRDBAConfig(r=2, exclude_modules=["attn:0", "ffn 1"]))
    lm.save_pretrained(tmp_path)
    assert list(lm.adapter_modules("default")) == ["blocks.out"]


def test_a_model_with_a_peft_lora_attached_never_has_that_loras_own_layers_adapted():
    """all-linear (and a regex) on a model with a PEFT LoRA still attached adapted the LoRA's own factor
    layers (``q_proj.lora_A.default``, ``q_proj.lora_B.default``) and PEFT's trained copy of the output head
    (``lm_head.modules_to_save.default``), silently: an adapter on another library's adapter. A layer that
    another library wraps is refused under all-linear as by name; nothing inside such a wrapper is a target."""
    import pytest
    from peft import LoraConfig, get_peft_model

    from lordba import TargetModulesError

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    for model in (peft_model, peft_model.base_model.model):
        for targets in (None, "all-linear"):
            with pytest.raises(TargetModulesError, match=r"q_proj' is already wrapped by peft\..*merge or unload"):
                find_targets(model, targets)
        found = find_targets(model, r".*layers\.0\.(self_attn\.[kvo]_proj|mlp\.\w+_proj|.*lora_.*)")
        assert [n.split("layers.0.")[1] for n in found] == [
            f"{m}.{n}" for m, n in [("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj")]
        ] + [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        assert find_targets(model, None, exclude_modules=["q_proj"]) == find_targets(model, r".*_proj", ["q_proj"])
        assert not any(".lora_" in n or "modules_to_save" in n for n in find_targets(model, ["k_proj", "default"]))


def test_the_out_proj_of_an_nn_multihead_attention_is_never_a_target():
    """``nn.MultiheadAttention`` computes with its ``out_proj``'s weight and never calls the layer: an adapter there
    (named, or under all-linear) changed no output and trained nothing, until a merge changed the outputs (by 1.8 on
    a small encoder). It is refused by name, with the reason, and left out under all-linear."""
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1))
    model.append(nn.Linear(16, 4))
    assert find_targets(model, "all-linear") == ["1"]
    with pytest.raises(TargetModulesError, match=r"'0\.layers\.0\.self_attn\.out_proj' .* never calling it"):
        find_targets(model, ["out_proj"])


def test_the_feed_forward_of_an_nn_transformer_encoder_layer_is_never_a_target():
    """In eval mode without gradients ``nn.TransformerEncoderLayer`` runs its fast path, which computes with
    ``linear1`` / ``linear2``'s weights and never calls them: an adapter there (named, or under all-linear) left every
    inference output as the base's, silently. They are refused by name, with the reason, and left out under
    all-linear."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(16, 4))
    assert find_targets(model, "all-linear") == ["1"]
    for name in ("linear1", "linear2"):
        with pytest.raises(TargetModulesError, match=rf"'0\.layers\.0\.{name}' .* fast path"):
            find_targets(model, [name])


def test_the_layers_inside_a_head_trained_in_full_are_left_out_as_peft_does():
    """RoBERTa's ``classifier`` is a module with its own ``dense`` / ``out_proj`` layers. A ``SEQ_CLS`` adapter
    trains it in full, so (PEFT's rule) no layer inside it is a target; under the default all-linear,
    ``get_lordba_model`` refused the model ("module 'classifier' carries LoRDBA adapters") where PEFT adapts the
    encoder and trains the head. (A layer inside it named in ``target_modules`` is still refused, with that error.)"""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lordba import LoRDBAConfig, get_lordba_model

    peft = pytest.importorskip("peft")
    config = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, num_labels=3,
    )  # fmt: skip
    for targets in (None, "all-linear"):
        torch.manual_seed(0)
        model = RobertaForSequenceClassification(config)
        lm = get_lordba_model(model, LoRDBAConfig(r=2, target_modules=targets, task_type="SEQ_CLS"))
        ours = set(lm.adapter_modules("default"))
        assert any(n.startswith("base_model.classifier.lordba_saved.default.") for n, _ in lm.named_parameters())
        lora = peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS")
        pm = peft.get_peft_model(RobertaForSequenceClassification(config), lora)
        theirs = {n.removesuffix(".lora_A") for n, _ in pm.base_model.model.named_modules() if n.endswith(".lora_A")}
        assert ours == theirs and len(ours) == 6
    with pytest.raises(TargetModulesError, match="'classifier' carries LoRDBA adapters"):
        get_lordba_model(
            RobertaForSequenceClassification(config), LoRDBAConfig(r=2, target_modules=["dense"], task_type="SEQ_CLS")
        )
