"""Converting PEFT LoRAs with the features of issue 14: GPT-2 Conv1D (fan_in_fan_out) layers, and the
fields modules_to_save, task_type, bias, lora_dropout, layers_to_transform with their tensors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

from lordba import LoRDBAModel, convert_lora
from lordba.convert import save_converted

from conftest import TINY

peft = pytest.importorskip("peft")
IDS = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)).eval()


def test_gpt2_conv1d_lora_converts_loads_and_matches_peft(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    pm = peft.get_peft_model(gpt2(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "peft")
    state, report = convert_lora(tmp_path / "peft", progress=False)
    state.save_pretrained(tmp_path / "lordba")
    lm = LoRDBAModel.from_pretrained(gpt2(), tmp_path / "lordba")
    errors = {layer.path: layer.rel_error for layer in report.layers}
    ref = gpt2()
    with torch.no_grad():
        for path, adapter in lm.adapter_modules("default").items():
            # PEFT's delta of a fan_in_fan_out layer is in x out, as the Conv1D weight: the converted
            # delta matches it up to the conversion's own reported error
            peft_delta = pm.base_model.model.get_submodule(path).get_delta_weight("default")
            ours = adapter.delta_weight().T
            rel = float((ours - peft_delta).norm() / peft_delta.norm())
            assert abs(rel - errors[path]) < 1e-3, path
            ref.get_submodule(path).weight.add_(ours)  # reference: each Conv1D weight plus our delta
        torch.testing.assert_close(lm(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_peft_fields_and_tensors_are_carried_over(tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3, pad_token_id=0))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        task_type="SEQ_CLS",
        lora_dropout=0.1,
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "modules_to_save" in name and name.endswith("score.modules_to_save.default.weight"):
                p.mul_(2)
    pm.save_pretrained(tmp_path / "peft")
    state, report = convert_lora(tmp_path / "peft", progress=False)
    cfg = state.config
    assert cfg.task_type == "SEQ_CLS" and cfg.dropout == 0.1 and cfg.layers_to_transform == [1]
    held = sum(t.numel() * t.element_size() for t in state.extras.values())  # the score head, stored as it is
    assert report.extra_tensor_bytes == held > 0 and report.totals()["extra_tensor_bytes"] == held
    assert cfg.layers_pattern == "layers"
    assert set(state.modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert "score.weight" in state.extras
    torch.testing.assert_close(
        state.extras["score.weight"], pm.base_model.model.score.modules_to_save["default"].weight
    )
    in_memory, _ = convert_lora(pm, progress=False)  # a PeftModel carries the same over
    assert in_memory.config.task_type == "SEQ_CLS" and set(in_memory.extras) == set(state.extras)
    state.save_pretrained(tmp_path / "lordba")
    torch.manual_seed(0)
    fresh = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3, pad_token_id=0)).eval()
    lm = LoRDBAModel.from_pretrained(fresh, tmp_path / "lordba")
    torch.testing.assert_close(lm.base_model.score.lordba_saved["default"].weight, state.extras["score.weight"])


def test_peft_bias_lora_only_is_carried_over(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
    pm = peft.get_peft_model(gpt2(), config)
    with torch.no_grad():
        pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.bias.add_(1.0)
    pm.save_pretrained(tmp_path / "peft")
    state, _ = convert_lora(tmp_path / "peft", progress=False)
    assert state.config.bias == "lora_only"
    torch.testing.assert_close(
        state.extras["transformer.h.0.attn.c_attn.bias"], gpt2().transformer.h[0].attn.c_attn.bias + 1
    )


def trained(pm) -> None:
    """``pm``'s trainable tensors moved as training would: its heads and saved modules a lot, its LoRA factors
    (converted approximately) a little."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.01 if "lora_" in name else 0.3))


def test_modules_to_save_follow_peft_plain_suffix_rule(tmp_path):
    """PEFT matches ``modules_to_save`` (and a task's heads) as plain string suffixes (``key.endswith``):
    a DistilBERT ``SEQ_CLS`` LoRA trains and saves ``pre_classifier`` beside ``classifier``. Those tensors
    were taken for unsupported ones: the conversion failed, or with ``skip_unsupported`` left the trained
    ``pre_classifier`` out (outputs off by ~4, silently but for a warning); both the directory and the
    in-memory ``PeftModel`` convert with it now, and the converted adapter gives PEFT's outputs."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def distilbert():
        torch.manual_seed(0)
        config = DistilBertConfig(
            vocab_size=101, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=32, num_labels=3
        )
        return DistilBertForSequenceClassification(config).eval()

    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"])
    pm = peft.get_peft_model(distilbert(), config)
    trained(pm)
    pm.save_pretrained(tmp_path / "peft")
    state, _ = convert_lora(tmp_path / "peft", progress=False)
    assert {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight"} <= set(state.extras)
    in_memory, _ = convert_lora(pm, progress=False)
    assert set(in_memory.extras) == set(state.extras)
    state.save_pretrained(tmp_path / "lordba")
    lm = LoRDBAModel.from_pretrained(distilbert(), tmp_path / "lordba")
    with torch.no_grad():
        ours, theirs, base = (m(input_ids=IDS).logits for m in (lm, pm.eval(), distilbert()))
    assert (theirs - base).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02 * float((theirs - base).abs().max()))


def classifier(kind: str = "Roberta"):
    """A tiny ``<kind>ForSequenceClassification`` (Roberta: a head with submodules; Bert: one Linear), seed 0."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=40, num_labels=3,
    )  # fmt: skip
    return getattr(transformers, f"{kind}ForSequenceClassification")(config).eval()


def roberta():
    return classifier("Roberta")


def test_a_head_with_submodules_is_carried_over_from_a_directory_and_a_peft_model(tmp_path):
    """PEFT trains and saves the whole module a ``modules_to_save`` entry (or a task's head) ends with, its
    submodules included: RoBERTa's ``classifier`` is ``dense`` + ``out_proj``, saved as ``classifier.dense.weight``
    and so on. Only tensors whose own module ended with the entry counted: the directory was refused (the head's
    tensors "not linear LoRA factors"), and a ``PeftModel`` converted without the trained head, silently (outputs
    off by as much as the whole adapter changes them)."""
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    pm = peft.get_peft_model(roberta(), config)
    trained(pm)
    pm.save_pretrained(tmp_path / "peft")
    head = {f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    state, _ = convert_lora(tmp_path / "peft", progress=False)
    assert set(state.extras) == head
    in_memory, _ = convert_lora(pm.eval(), progress=False)
    assert set(in_memory.extras) == head
    for converted, name in ((state, "dir"), (in_memory, "mem")):
        converted.save_pretrained(tmp_path / name)
        lm = LoRDBAModel.from_pretrained(roberta(), tmp_path / name)
        with torch.no_grad():
            ours, theirs, base = (m(input_ids=IDS).logits for m in (lm, pm, roberta()))
        assert (theirs - base).abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02 * float((theirs - base).abs().max()))


def test_a_peft_model_names_tensors_it_leaves_out_and_keeps_a_plain_lm_head_lora(tmp_path):
    """A ``PeftModel``'s tensors that are neither LoRA factors nor carried over are refused or, with
    ``skip_unsupported``, left out with a warning, as a directory's are (trainable tokens were dropped
    without one); the base weights PEFT saves beside a LoRA on ``lm_head`` are no adapter tensors."""
    from conftest import tiny_llama

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1]))
    with pytest.warns(UserWarning, match=r"leaving out tensors .*trainable_tokens_delta"):
        state, _ = convert_lora(pm, skip_unsupported=True, progress=False)
    assert len(state.modules) == 2 and not state.extras
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    state, _ = convert_lora(pm, progress=False)
    assert "lm_head" in state.modules and not state.extras


def bias_all_conversions(make, tmp_path):
    """A trained SEQ_CLS LoRA with ``bias="all"`` on ``make()``, converted from its saved directory and from the
    PeftModel: yields ``(peft model, converted state, report, "dir" / "mem")``."""
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], bias="all")
    pm = peft.get_peft_model(make(), config)
    trained(pm)
    pm.save_pretrained(tmp_path / "peft")
    for source, name in ((tmp_path / "peft", "dir"), (pm.eval(), "mem")):
        yield (pm, *convert_lora(source, progress=False), name)


def test_bias_all_with_a_task_head_converts_without_the_heads_original_copy(tmp_path):
    """With ``bias="all"`` PEFT also saves the biases of a head's ``ModulesToSaveWrapper`` internals
    (``classifier.original_module.dense.bias``: the base's own copy, which the adapter's forward never uses).
    They were taken for trained biases of a module ``original_module`` the model does not have: every
    ``SEQ_CLS`` LoRA with ``bias="all"`` on a model whose head has biases (BERT, RoBERTa, DistilBERT) failed
    to save ("not a parameter path of the model"). They are left out; the result gives PEFT's outputs."""
    for pm, state, _, name in bias_all_conversions(roberta, tmp_path):
        assert not [k for k in state.extras if "original_module" in k or "modules_to_save" in k]
        torch.testing.assert_close(
            state.extras["classifier.dense.bias"], pm.base_model.model.classifier.modules_to_save["default"].dense.bias
        )
        state.save_pretrained(tmp_path / name)
        lm = LoRDBAModel.from_pretrained(roberta(), tmp_path / name)
        with torch.no_grad():
            ours, theirs, base = (m(input_ids=IDS).logits for m in (lm, pm, roberta()))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02 * float((theirs - base).abs().max()))


def test_bias_all_with_a_head_that_has_its_own_bias_loads_and_gives_peft_outputs(tmp_path):
    """With ``bias="all"`` PEFT also saves the bias of a saved module's copy, and takes the adapter name out of
    its key when the bias is the copy's own (``classifier.modules_to_save.bias``: BERT's head is one Linear).
    That key was kept as a tensor of a module ``classifier.modules_to_save``: the conversion and the save
    went through, and the load failed ("the base model has no module 'classifier.modules_to_save'")."""

    def bert():
        return classifier("Bert")

    for pm, state, report, name in bias_all_conversions(bert, tmp_path):
        assert {"classifier.weight", "classifier.bias"} <= set(state.extras)
        assert not [k for k in state.extras if "modules_to_save" in k]
        lm = LoRDBAModel.from_pretrained(bert(), save_converted(state, report, tmp_path / name))
        with torch.no_grad():
            ours, theirs, base = (m(input_ids=IDS).logits for m in (lm, pm, bert()))
        assert (theirs - base).abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.1 * float((theirs - base).abs().max()))


def test_the_lora_ranks_are_kept_where_one_module_path_ends_another(tmp_path):
    """``blocks.0.proj`` (rank 8) and ``inner.blocks.0.proj`` (rank 4): the converted config's
    rank_pattern names whole paths, so the inner module keeps its rank 4 (a key ``blocks\\.0\\.proj``
    matched it too, as PEFT matches keys: it was converted at rank 8, and s = alpha / 8)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.inner = Inner()

        def forward(self, x):
            return self.inner.blocks[0].proj(self.blocks[0].proj(x))

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], rank_pattern={"^blocks.0.proj": 8}, init_lora_weights="gaussian"
    )
    pm = get_peft_model(Net(), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "lora")
    state, report = convert_lora(tmp_path / "lora", progress=False)
    assert {p: m.r for p, m in state.modules.items()} == {"blocks.0.proj": 8, "inner.blocks.0.proj": 4}
    assert {p: state.config.rank_for(p) for p in state.modules} == {"blocks.0.proj": 8, "inner.blocks.0.proj": 4}
    assert [(lr.r_lora, lr.r) for lr in report.layers] == [(8, 8), (4, 4)]
    lm = LoRDBAModel.from_pretrained(Net(), save_converted(state, report, tmp_path / "out"))
    assert {p: a.r for p, a in lm.adapter_modules("default").items()} == {"blocks.0.proj": 8, "inner.blocks.0.proj": 4}


def test_a_module_targeted_by_its_full_path_outside_layers_to_transform_converts(tmp_path):
    """PEFT targets a ``target_modules`` entry that is a module's whole path whatever ``layers_to_transform``
    says (``model.layers.0.mlp.down_proj`` beside ``q_proj`` in layer 1): the converted config names it in full,
    so the adapter saves and loads with both modules (it was refused at the save, not matched by its targets)."""
    from conftest import tiny_llama

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["model.layers.0.mlp.down_proj", "q_proj"],
        layers_to_transform=[1],
        init_lora_weights="gaussian",
    )
    pm = peft.get_peft_model(tiny_llama(), config)
    pm.save_pretrained(tmp_path / "peft")
    state, report = convert_lora(tmp_path / "peft", progress=False)
    paths = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"}
    assert set(state.modules) == paths and state.config.layers_to_transform == [1]
    lm = LoRDBAModel.from_pretrained(tiny_llama(), save_converted(state, report, tmp_path / "out"))
    assert set(lm.adapter_modules("default")) == paths
