"""Reading real PEFT LoRA adapters, and refusing every kind of bad input with a clear error."""

import json
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lordba import AdapterFormatError, ConversionError, LoRDBAError
from lordba.convert import convert_lora, read_lora, save_converted

from conftest import tiny_llama


def peft_adapter(tmp_path, name="lora", adapter_name="default", seed=0, **kw):
    """A real PEFT LoRA on the tiny Llama with non-zero B, saved with save_pretrained."""
    kw.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights="gaussian", **kw), adapter_name=adapter_name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


def test_plain_lora_dir_and_peft_model_agree(tmp_path):
    model, path = peft_adapter(tmp_path)
    lora = read_lora(path)
    assert len(lora.layers) == 6 and lora.r == 4 and lora.alpha == 8
    layer = lora.layers["model.layers.0.self_attn.q_proj"]
    assert layer.scaling == 2.0 and layer.A.shape == (4, 40) and layer.B.shape == (40, 4)
    peft_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.A, peft_layer.lora_A["default"].weight)
    mem = read_lora(model)
    assert sorted(mem.layers) == sorted(lora.layers)
    for p in lora.layers:
        assert torch.equal(mem.layers[p].B, lora.layers[p].B) and mem.layers[p].scaling == lora.layers[p].scaling


def test_rslora_and_rank_alpha_patterns(tmp_path):
    model, path = peft_adapter(
        tmp_path, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}
    )
    lora = read_lora(path)
    down = lora.layers["model.layers.0.mlp.down_proj"]
    assert down.r == 2 and down.scaling == pytest.approx(8 / math.sqrt(2))
    q1 = lora.layers["model.layers.1.self_attn.q_proj"]
    assert q1.alpha == 3 and q1.scaling == pytest.approx(3 / 2)
    assert lora.layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    # PEFT's own modules agree on every scaling
    for p, layer in read_lora(model).layers.items():
        assert layer.scaling == pytest.approx(lora.layers[p].scaling)
    state, _ = convert_lora(path, progress=False)
    assert state.modules["model.layers.0.mlp.down_proj"].r == 2
    assert state.config.rank_for("model.layers.1.mlp.down_proj") == 2 and state.config.r == 4


def test_non_default_adapter_name_subfolder_and_named_keys(tmp_path):
    _, path = peft_adapter(tmp_path, adapter_name="sentiment")
    assert (path / "sentiment" / "adapter_config.json").is_file()
    with pytest.raises(AdapterFormatError, match=r"subfolders: \['sentiment'\]"):
        read_lora(path)
    lora = read_lora(path, adapter_name="sentiment")
    assert len(lora.layers) == 6
    # keys carrying the adapter name (a state dict saved by hand)
    folder = path / "sentiment"
    tensors = load_file(folder / "adapter_model.safetensors")
    named = {
        k.replace(".lora_A.", ".lora_A.sentiment.").replace(".lora_B.", ".lora_B.sentiment."): v
        for k, v in tensors.items()
    }
    named["base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight"] = torch.zeros(4, 40)
    save_file(named, folder / "adapter_model.safetensors")
    assert sorted(read_lora(folder, adapter_name="sentiment").layers) == sorted(lora.layers)
    with pytest.raises(ConversionError, match=r"no tensors for adapter 'default'.*'other', 'sentiment'"):
        read_lora(folder)


def test_missing_config_and_not_a_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: missing"):
        read_lora(tmp_path)
    with pytest.raises(AdapterFormatError, match="not a directory"):
        read_lora(tmp_path / "nowhere")


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'; only LoRA"),
        ({"peft_type": "LORDBA"}, "already a LoRDBA adapter"),
        ({"use_dora": True}, "use_dora=True: DoRA"),
        ({"r": 8}, r"lora_A.weight has rank 4 but adapter_config.json gives module .* rank 8 \(r\)"),
        ({"rank_pattern": {"q_proj": 2}}, r"rank 4 .* rank 2 \(rank_pattern\['q_proj'\]\)"),
        ({"lora_alpha": "big"}, "lora_alpha must be a positive number"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),  # carried over since issue 14
    ],
)
def test_bad_configs_are_refused_naming_the_field(tmp_path, changes, pattern):
    _, path = peft_adapter(tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ConversionError, match=pattern) as info:
        read_lora(path)
    assert "adapter_config.json" in str(info.value) or "adapter_model.safetensors" in str(info.value)


def test_nan_factors_and_dora_vectors_name_the_tensor(tmp_path):
    _, path = peft_adapter(tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("inf")
    save_file(tensors, file)
    with pytest.raises(ConversionError, match=f"adapter_model.safetensors: tensor {key} holds NaN or infinite"):
        read_lora(path)
    _, dora = peft_adapter(tmp_path, name="dora", use_dora=True)
    edit_config(dora, use_dora=False)  # the tensors alone still give DoRA away
    with pytest.raises(ConversionError, match=r"lora_magnitude_vector: DoRA magnitude vectors found; DoRA is not"):
        read_lora(dora)
    model, _ = peft_adapter(tmp_path, name="dora2", use_dora=True)
    with pytest.raises(ConversionError, match="DoRA"):
        read_lora(model)


def test_unsupported_tensors_refused_or_skipped(tmp_path):
    _, path = peft_adapter(tmp_path, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConversionError, match=r"not linear LoRA factors: .*embed_tokens"):
        read_lora(path)
    with pytest.warns(UserWarning, match="leaving out"):
        lora = read_lora(path, skip_unsupported=True)
    assert sorted(lora.layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_pickle_weights_need_an_explicit_opt_in(tmp_path):
    model, _ = peft_adapter(tmp_path)
    path = tmp_path / "bin"
    model.save_pretrained(path, safe_serialization=False)
    assert (path / "adapter_model.bin").is_file()
    with pytest.raises(AdapterFormatError, match=r"adapter_model.bin: pickle weights are refused.*allow_pickle"):
        read_lora(path)
    lora = read_lora(path, allow_pickle=True)
    assert torch.equal(
        lora.layers["model.layers.0.self_attn.q_proj"].A, read_lora(model).layers["model.layers.0.self_attn.q_proj"].A
    )
    (path / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterFormatError, match=r"cannot load with torch.load"):
        read_lora(path, allow_pickle=True)
    torch.save({0: torch.zeros(4, 40)}, path / "adapter_model.bin")  # a key no state dict has: not a TypeError
    with pytest.raises(AdapterFormatError, match=r"adapter_model.bin: expected a dict of tensors by name"):
        read_lora(path, allow_pickle=True)


def test_output_directory_rules_and_no_partial_output(tmp_path, monkeypatch):
    _, path = peft_adapter(tmp_path)
    state, report = convert_lora(path, progress=False)
    out = tmp_path / "out"
    save_converted(state, report, out)
    with pytest.raises(ConversionError, match="already exists"):
        save_converted(state, report, out)
    save_converted(state, report, out, overwrite=True)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConversionError, match="not a writable directory"):
            save_converted(state, report, locked / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match=r"not a writable directory|cannot be created"):
        save_converted(state, report, tmp_path / "file" / "out")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(report), "write_json", boom)
    with pytest.raises(LoRDBAError, match="No space left"):
        save_converted(state, report, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    assert not [p for p in tmp_path.iterdir() if "lordba-tmp" in p.name]


def test_a_peft_model_converts_the_adapter_asked_for_and_never_guesses_among_active_ones(tmp_path):
    """``adapter_name="default"`` given for a ``PeftModel`` whose active adapter was another one converted
    the active one (the name was taken for "not given"): a silently wrong adapter. Left out, the name is
    the model's one active adapter; with several active (``base_model.set_adapter([...])``) it only
    converted ``active_adapter``'s first, though PEFT's forward adds them all: now refused, naming them."""
    model, _ = peft_adapter(tmp_path)  # "default": q_proj, v_proj, down_proj
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    model.set_adapter("other")
    default = read_lora(model, adapter_name="default")
    assert sorted(p.rsplit(".", 1)[-1] for p in default.layers) == ["down_proj"] * 2 + ["q_proj"] * 2 + ["v_proj"] * 2
    state, _ = convert_lora(model, adapter_name="default", progress=False)
    assert set(state.modules) == set(default.layers)
    assert sorted(read_lora(model).layers) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ConversionError, match=r"several active adapters \['default', 'other'\].*adapter_name"):
        convert_lora(model, progress=False)
    assert set(read_lora(model, adapter_name="other").layers) == {
        p.replace("q_proj", "k_proj") for p in default.layers if "q_proj" in p
    }


def test_a_named_adapter_beside_the_default_one_is_read_from_its_subfolder(tmp_path):
    """PEFT saves a model's "default" adapter at the top of the directory and each other one in a subfolder
    of its name. ``adapter_name="other"`` (``--adapter-name other``) read the top level whenever it held a
    config, so it converted the default adapter instead, silently."""
    model, path = peft_adapter(tmp_path)  # "default": q_proj, v_proj, down_proj
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    model.save_pretrained(path)
    assert (path / "adapter_config.json").is_file() and (path / "other" / "adapter_config.json").is_file()
    other = read_lora(path, adapter_name="other")
    assert sorted(other.layers) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert other.r == 2 and len(read_lora(path).layers) == 6


def test_a_lora_on_lm_head_converts_from_its_directory_as_from_its_peft_model(tmp_path):
    """PEFT saves the base weight of a targeted ``lm_head`` beside its LoRA (``save_embedding_layers``):
    the directory was refused (``lm_head.base_layer.weight`` "not linear LoRA factors") while the same
    ``PeftModel`` converted; the base weight is left out with a warning, and both give the same layers."""
    model, path = peft_adapter(tmp_path, target_modules=["q_proj", "lm_head"])
    assert "base_model.model.lm_head.base_layer.weight" in load_file(path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="leaving out the base weights PEFT saved"):
        lora = read_lora(path)
    assert "lm_head" in lora.layers and sorted(lora.layers) == sorted(read_lora(model).layers)
    _, emb = peft_adapter(tmp_path, name="emb", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConversionError, match=r"not linear LoRA factors: .*embed_tokens"):
        read_lora(emb)  # an embedding LoRA still is refused, its base weight with it


def test_a_lora_saved_with_ensure_weight_tying_is_refused_naming_that_field(tmp_path):
    """PEFT's ``ensure_weight_tying=True`` on a tied model adds a LoRA (or a saved copy) to the embedding tied to
    the targeted head: the conversion refused those tensors as "not linear LoRA factors" without naming the field
    that put them there, or what to do. It names it, in the directory's and the PeftModel's error alike."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True, init_lora_weights=False)
    model = get_peft_model(model, config)
    model.save_pretrained(tmp_path / "tied")
    for source in (tmp_path / "tied", model):
        with pytest.raises(ConversionError, match=r"ensure_weight_tying=True.*ensure_weight_tying=False"):
            read_lora(source)
    assert "embed_tokens" not in str(read_lora(tmp_path / "tied", skip_unsupported=True).layers)


@pytest.mark.parametrize("twin", ["model.layers.0.self_attn.q_proj.lora_A.weight", "{}.lora_A.default.weight"])
def test_a_factor_stored_under_two_keys_is_refused_naming_both(tmp_path, twin):
    """``base_model.model.P.lora_A.weight`` beside ``P.lora_A.weight`` (or ``P.lora_A.default.weight``): two
    tensors for one factor. PEFT loads the first (the other is an unexpected key it drops); the reader kept
    whichever sorted last, silently: here the converted module came from the other tensor, not the one PEFT runs."""
    _, path = peft_adapter(tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    twin = twin.format("base_model.model.model.layers.0.self_attn.q_proj")
    tensors[twin] = tensors[key] * 3
    save_file(tensors, file)
    first, second = sorted([key, twin])
    with pytest.raises(ConversionError, match=rf"tensors {first} and {second}: two tensors for one factor"):
        read_lora(path)


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_weights_linked_to_a_file_outside_the_folder_are_refused(tmp_path, weights):
    """The weights file of an untrusted PEFT folder is opened as its config is: a symbolic link to a file outside
    the folder is refused naming it. Was: the config's link was refused while the weights' was followed, so a
    folder could have lordba read any safetensors (or pickle) file of the machine; a link inside the folder is
    still followed."""
    _, path = peft_adapter(tmp_path)
    outside = tmp_path / "elsewhere" / weights
    outside.parent.mkdir()
    if weights.endswith(".bin"):
        torch.save(load_file(path / "adapter_model.safetensors"), outside)
        (path / "adapter_model.safetensors").unlink()
    else:
        (path / weights).rename(outside)
    (path / weights).symlink_to(outside)
    with pytest.raises(AdapterFormatError, match=f"{weights}: a symbolic link to a file outside the adapter"):
        read_lora(path, allow_pickle=True)
    (path / weights).unlink()
    (path / f"kept-{weights}").write_bytes(outside.read_bytes())
    (path / weights).symlink_to(path / f"kept-{weights}")
    assert len(read_lora(path, allow_pickle=True).layers) == 6


class _ConvAndLinear(torch.nn.Module):
    """A model with a convolution and a linear layer, both targeted by one PEFT LoRA."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_convolution_lora_refused_or_left_out(tmp_path):
    """A LoRA on a convolution and a linear layer: refused naming the convolution (as before), and with
    ``skip_unsupported`` the linear layer is converted and the convolution left out with a warning, from a folder
    and from a PeftModel alike (before: the convolution was refused even with ``skip_unsupported``)."""
    torch.manual_seed(0)
    model = get_peft_model(_ConvAndLinear(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "conv")
    for source in (tmp_path / "conv", model):
        with pytest.raises(ConversionError, match=r"convolution LoRA layers .*: conv \(pass skip_unsupported"):
            read_lora(source)
        with pytest.warns(UserWarning, match=r"leaving out convolution LoRA layers .*: conv$"):
            lora = read_lora(source, skip_unsupported=True)
        assert list(lora.layers) == ["fc"]
        torch.testing.assert_close(
            lora.layers["fc"].B @ lora.layers["fc"].A,
            model.base_model.model.fc.lora_B["default"].weight @ model.base_model.model.fc.lora_A["default"].weight,
            rtol=0,
            atol=0,
        )


def test_a_left_out_convolution_leaves_its_lora_only_bias_out_too(tmp_path):
    """``bias="lora_only"`` trains a LoRA layer's bias as part of it: a convolution left out under
    ``skip_unsupported`` kept its trained bias as an extra (loaded as the conv's bias trained in full: the layer
    changed by half of its update, where the warning said it was left out). Under ``bias="all"`` it stays."""
    for bias, kept in (("lora_only", ["fc.bias"]), ("all", ["conv.bias", "fc.bias"])):
        torch.manual_seed(0)
        model = get_peft_model(_ConvAndLinear(), LoraConfig(r=2, target_modules=["conv", "fc"], bias=bias))
        model.save_pretrained(tmp_path / bias)
        for source in (tmp_path / bias, model):
            with pytest.warns(UserWarning, match=r"leaving out convolution LoRA layers"):
                lora = read_lora(source, skip_unsupported=True)
            assert list(lora.layers) == ["fc"]
            assert sorted(lora.extras) == kept
