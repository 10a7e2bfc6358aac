"""The four training modes (SPEC §3) on a tiny model, and `lordba train` end to end on the real one."""

import json

import pytest
import torch
from test_loop import rows

from lordba import ConfigError, LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.cli import main
from lordba.convert import read_lora
from lordba.train import TrainSettings, build_adapter, init_from_lora
from lordba.train.lora import add_lora
from lordba.train.tokenize import Batcher

from conftest import tiny_llama


def loss_of(model, batcher):
    with torch.no_grad():
        return sum(model(**batcher.batch(k)).loss.item() for k in range(4)) / 4


@pytest.mark.parametrize("mode", ["ptq", "qat", "qat-from-lora", "scales-only"])
def test_every_mode_learns_and_trains_only_what_it_should(mode, tmp_path):
    base = tiny_llama(0)
    batcher = Batcher(rows(), 4)
    before = loss_of(base, batcher)
    cfg = LoRDBAConfig(r=4, mode=mode, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    settings = TrainSettings(steps=24, lr=3e-3)
    lm, result = build_adapter(base, cfg, batcher, settings, tmp_path, lora_lr=3e-3, progress=False)
    assert loss_of(lm, batcher) < before - 0.1
    trainable = {n.rsplit(".", 1)[-1] for n, p in lm.named_parameters() if p.requires_grad}
    expected = {
        "ptq": set(),
        "qat": {"latent_A", "latent_B", "scale_in", "scale_mid", "scale_out"},
        "qat-from-lora": {"latent_A", "latent_B", "scale_in", "scale_mid", "scale_out"},
        "scales-only": {"scale_in", "scale_mid", "scale_out"},
    }[mode]
    assert trainable == expected
    assert result.log[-1]["step"] == 24
    conversions = [e for e in result.log if "conversion_rel_error" in e]
    if mode == "qat":
        assert not conversions
    else:  # the LoRA seed's conversion error, per layer, at the step where it was converted
        (conv,) = conversions
        assert len(conv["conversion_rel_error"]) == 2 * 4  # 2 layers x 4 targets
        assert 0 < conv["conversion_mean_rel_error"] < 1 and conv["step"] == (24 if mode == "ptq" else 3)
    if mode != "qat":
        assert (tmp_path / "lora_seed" / "adapter_model.safetensors").is_file()
    lm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["mode"] == mode


def trained_lora_on_q_proj():
    """A tiny Llama with a rank-4 PEFT LoRA on q_proj whose B factor is not zero (as if trained)."""
    peft_model = add_lora(tiny_llama(0), 4, 8.0, ["q_proj"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def test_init_from_lora_reproduces_the_lora():
    peft_model = trained_lora_on_q_proj()
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    from lordba.convert import read_lora

    lora = read_lora(peft_model)
    base = peft_model.unload()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    lm = LoRDBAModel(base, LoRDBAConfig(r=8, target_modules=["q_proj"], scale_dtype="float32"))
    errors = init_from_lora(lm, lora)
    assert all(e < 0.6 for e in errors.values())
    with torch.no_grad():
        got = lm(input_ids=ids).logits
    # the LoRDBA adapter carries most of the LoRA's effect on the logits
    assert (got - want).norm() < 0.6 * (want - plain).norm()


def test_init_from_lora_accepts_an_adapter_in_inference_form():
    peft_model = trained_lora_on_q_proj()
    from lordba.convert import read_lora

    lora = read_lora(peft_model)
    lm = LoRDBAModel(peft_model.unload(), LoRDBAConfig(r=4, target_modules=["q_proj"], scale_dtype="int8"))
    first = init_from_lora(lm, lora)
    want = {p: a.stored_tensors() for p, a in lm.adapter_modules("default").items()}
    lm.pack()  # int8 code buffers: the float results must not be cast into them
    assert init_from_lora(lm, lora) == first
    for path, adapter in lm.adapter_modules("default").items():
        assert adapter.has_latent_signs
        for name, tensor in adapter.stored_tensors().items():
            assert torch.equal(tensor, want[path][name]), name


def test_init_from_lora_refuses_a_lora_of_another_model_before_changing_anything():
    """A LoRA seed (``--lora``) of a model with other layer sizes but the same module names is a
    ConfigError naming the module and both shapes, raised before the adapter changes (it was a
    RuntimeError from ``copy_`` with the adapter half-initialised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lordba import ConfigError
    from lordba.convert import read_lora

    from conftest import TINY

    lora = read_lora(trained_lora_on_q_proj())
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 48, "intermediate_size": 60}))
    lm = LoRDBAModel(wider, LoRDBAConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(ConfigError, match=r"q_proj.*\(40, 40\).*\(48, 48\)"):
        init_from_lora(lm, lora)
    after = lm.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_lordba_train_cli_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            "arithmetic",
            "--mode",
            "qat",
            "--out",
            str(out),
            "--quant",
            "none",
            "--target-modules",
            "q_proj,v_proj",
            "--r",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--train-size",
            "12",
            "--eval-size",
            "4",
            "--checkpoint-every",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / "adapter_config.json").is_file() and (out / "lordba_model.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
    assert "eval_loss" in log[-1] and "metric" in log[-1]
    assert main(["inspect", str(out)]) == 0
    assert "held-out" in capsys.readouterr().out


def test_the_lora_seed_trains_at_its_own_learning_rate(tmp_path):
    from safetensors.torch import load_file

    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings = TrainSettings(steps=10, lr=3e-3)
    build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, lora_lr=0.0, progress=False)
    factors = load_file(tmp_path / "lora_seed" / "adapter_model.safetensors")
    b = [t for k, t in factors.items() if "lora_B" in k]
    assert b and all(t.abs().max() == 0 for t in b)  # lr 0: B stays at its zero init


@pytest.mark.parametrize("mode", ["qat", "qat-from-lora"])
def test_build_adapter_is_reproducible_whatever_ran_before(mode, tmp_path):
    cfg = LoRDBAConfig(r=4, mode=mode, target_modules=["q_proj", "v_proj"])
    stored = []
    for run in ("a", "b"):
        base = tiny_llama(0)
        torch.rand(int(run == "b") + 3)  # a different global RNG state before each run
        lm, _ = build_adapter(
            base, cfg, Batcher(rows(), 4), TrainSettings(steps=3, lr=3e-3), tmp_path / run, progress=False
        )
        stored.append({p: a.stored_tensors() for p, a in lm.adapter_modules("default").items()})
    for path, tensors in stored[0].items():
        for name, t in tensors.items():
            assert torch.equal(t, stored[1][path][name]), (path, name)


def test_the_lora_seed_trains_exactly_the_modules_of_the_adapter(tmp_path):
    """The LoRA seed is trained on the LoRDBA adapter's own modules: ``exclude_modules`` and
    ``layers_to_transform`` apply to it too. It was trained on every module ``target_modules`` names, so
    the LoRDBA adapter kept only part of what the seed had learnt jointly (the rest was dropped silently)."""
    from safetensors.torch import load_file

    cfg = LoRDBAConfig(
        r=4, mode="ptq", target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["v_proj"],
        layers_to_transform=[1],
    )  # fmt: skip
    lm, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), TrainSettings(steps=2), tmp_path, progress=False)
    factors = load_file(tmp_path / "lora_seed" / "adapter_model.safetensors")
    seeded = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in factors}
    assert seeded == set(lm.adapter_modules("default"))
    assert seeded == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


def test_a_run_killed_while_saving_the_lora_seed_resumes(tmp_path, monkeypatch):
    """``out/lora_seed`` is written as one directory: a run killed after PEFT wrote the seed's weights but
    before its config left a seed that every resume then tried to read (AdapterFormatError, config missing);
    now the half-written seed never appears, and the resumed run ends with the uninterrupted run's adapter."""
    from peft.config import PeftConfigMixin

    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=1)
    want, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path / "whole", progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PeftConfigMixin, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "lora_seed").exists()
    got, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path / "run", progress=False)
    for path, adapter in want.adapter_modules("default").items():
        for name, t in adapter.stored_tensors().items():
            assert torch.equal(t, got.adapter_modules("default")[path].stored_tensors()[name]), (path, name)


def test_a_finished_lora_seed_of_other_settings_is_refused_not_reused(tmp_path):
    """A finished LoRA seed (out/lora_seed) was returned by every later run into the same out_dir: a ptq run rerun with
    lora_lr=3e-2 gave the adapter of the first run's lora_lr=1e-3, bit for bit. Now the seed records its settings and
    one of other settings is refused naming them; the same settings (checkpoint_every may differ) resume from it."""
    cfg = LoRDBAConfig(r=4, mode="ptq", target_modules=["q_proj"])
    settings = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2)
    first, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, lora_lr=1e-3, progress=False)
    with pytest.raises(ConfigError, match=r"lora_seed: the LoRA seed of a run with other settings .*lr: 0.001 -> 0.03"):
        build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, lora_lr=3e-2, progress=False)
    watched = TrainSettings(steps=4, lr=3e-3, checkpoint_every=1)
    again, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), watched, tmp_path, lora_lr=1e-3, progress=False)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_finished_lora_seed_trained_on_other_data_is_refused_not_reused(tmp_path):
    """A finished LoRA seed recorded its settings but not its data: a ptq run rerun on other rows with the same
    settings returned the first run's adapter, bit for bit. Now it is refused; the same data reuses it."""
    cfg = LoRDBAConfig(r=4, mode="ptq", target_modules=["q_proj"])
    settings = TrainSettings(steps=4, lr=3e-3)
    build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"lora_seed: the LoRA seed of a run on other training data"):
        build_adapter(tiny_llama(0), cfg, Batcher(rows(seed=1), 4), settings, tmp_path, progress=False)
    _, result = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, progress=False)
    assert result.resumed_from == 4


def test_a_lora_seed_with_modules_trained_in_full_carries_them_or_is_refused(tmp_path):
    """A LoRA seed (``--lora``) that trains ``lm_head`` in full: its trained head goes into the adapter's copy
    when the config holds one (it stayed the base's: the LoRA's head was dropped silently), and a config that
    holds none is a ConfigError naming the tensor (the adapter was built without it, silently)."""
    from lordba import ConfigError
    from lordba.train.lora import get_peft_lora_model, peft_lora_config

    torch.manual_seed(0)
    lora_config = peft_lora_config(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_lora_model(tiny_llama(0), lora_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "modules_to_save" in name:
                p.add_(0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    settings, data = TrainSettings(steps=1), Batcher(rows(), 4)
    for mode in ("ptq", "qat-from-lora"):
        cfg = LoRDBAConfig(r=4, mode=mode, target_modules=["q_proj"], modules_to_save=["lm_head"])
        lm, _ = build_adapter(tiny_llama(0), cfg, data, settings, lora_dir=str(tmp_path / "lora"), progress=False)
        got = lm.adapter_state("default").extras["lm_head.weight"]
        assert (got - head).abs().max() <= (0 if mode == "ptq" else 1e-3), mode  # qat: one step of lr 1e-4 from it
    cfg = LoRDBAConfig(r=4, mode="ptq", target_modules=["q_proj"])  # the seed's modules_to_save fills it
    lm, _ = build_adapter(tiny_llama(0), cfg, data, settings, lora_dir=str(tmp_path / "lora"), progress=False)
    assert lm.peft_config["default"].modules_to_save == ["lm_head"]
    assert torch.equal(lm.adapter_state("default").extras["lm_head.weight"], head)
    with pytest.raises(ConfigError, match=r"lm_head\.weight.*modules_to_save"):  # the library call: no guessing
        init_from_lora(get_lordba_model(tiny_llama(0), cfg), read_lora(tmp_path / "lora"))


def test_a_given_lora_on_some_modules_sets_the_targets_the_config_leaves_unset(tmp_path):
    """``lordba train --mode ptq --lora DIR`` (docs/training.md) with no ``--target-modules``: the adapter goes on
    the LoRA's modules, as ``lordba convert`` puts it (the default, every linear layer but the head, was a
    ConfigError "the LoRA seed has no factors for [...mlp.down_proj...]" for a LoRA on q_proj alone, PEFT's usual
    choice). Its ``layers_to_transform`` comes along; targets the config names stay the config's."""
    from lordba import ConfigError
    from lordba.train.lora import get_peft_lora_model, peft_lora_config

    data, settings = Batcher(rows(), 4), TrainSettings(steps=2)
    trained_lora_on_q_proj().save_pretrained(str(tmp_path / "lora"))
    layer1 = get_peft_lora_model(
        tiny_llama(0), peft_lora_config(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1])
    )
    layer1.save_pretrained(str(tmp_path / "lora1"))
    for mode in ("ptq", "qat-from-lora", "scales-only"):
        lm, _ = build_adapter(
            tiny_llama(0), LoRDBAConfig(r=4, mode=mode), data, settings, lora_dir=str(tmp_path / "lora"), progress=False
        )
        assert sorted(lm.adapter_modules("default")) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)], mode
        assert lm.peft_config["default"].target_modules == ["q_proj"]
    lm, _ = build_adapter(
        tiny_llama(0), LoRDBAConfig(r=4, mode="ptq"), data, settings, lora_dir=str(tmp_path / "lora1"), progress=False
    )
    assert list(lm.adapter_modules("default")) == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(ConfigError, match="no factors"):  # targets the config names are not replaced
        build_adapter(
            tiny_llama(0),
            LoRDBAConfig(r=4, mode="ptq", target_modules=["q_proj", "v_proj"]),
            data,
            settings,
            lora_dir=str(tmp_path / "lora"),
            progress=False,
        )


def test_a_run_from_another_given_lora_is_refused_not_resumed(tmp_path):
    """build_adapter(lora_dir=OTHER) with the same config and settings resumed the QAT checkpoints of a run started
    from another LoRA (resumed_from 4) and returned that run's adapter: the checkpoints recorded the settings, data
    and adapter config, not the LoRA. Now it is refused; the same LoRA (read again) still resumes."""
    trained_lora_on_q_proj().save_pretrained(str(tmp_path / "lora"))
    other = trained_lora_on_q_proj()
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.mul_(-3)
    other.save_pretrained(str(tmp_path / "other"))
    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings, out = TrainSettings(steps=4, lr=3e-3, checkpoint_every=2), tmp_path / "out"

    def run(lora):
        return build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, out, lora_dir=lora, progress=False)

    run(str(tmp_path / "lora"))
    with pytest.raises(ConfigError, match=r"step-00000004: .*started from another LoRA.*--no-resume"):
        run(str(tmp_path / "other"))
    assert run(read_lora(str(tmp_path / "lora")))[1].resumed_from == 4


def test_a_lora_seed_with_trained_biases_carries_them(tmp_path):
    """``bias="lora_only"``: the LoRA seed's trained biases of its layers become the adapter's (they stayed
    the base's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lordba.train.lora import get_peft_lora_model, peft_lora_config

    from conftest import TINY

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True))

    lora_config = peft_lora_config(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only")
    peft_model = get_peft_lora_model(base(), lora_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("q_proj.base_layer.bias"):
                p.add_(0.25)
    peft_model.save_pretrained(tmp_path / "lora")
    cfg = LoRDBAConfig(r=4, mode="ptq", target_modules=["q_proj"], bias="lora_only")
    data = Batcher(rows(), 4)
    lm, _ = build_adapter(base(), cfg, data, TrainSettings(steps=1), lora_dir=str(tmp_path / "lora"), progress=False)
    extras = lm.adapter_state("default").extras
    plain = base()
    assert len(extras) == 2
    for name, value in extras.items():
        assert torch.allclose(value, plain.get_parameter(name).detach() + 0.25, atol=1e-6), name


def test_build_adapter_refuses_a_lora_it_would_ignore_and_a_bad_warmup(tmp_path):
    # mode "qat" (the default) with a lora_dir trained from the cold start and never read the LoRA, silently;
    # lora_warmup=nan was a ValueError from math.ceil, 3 spent three times the steps on the seed.
    from lordba import ConfigError

    peft_model = trained_lora_on_q_proj()
    peft_model.save_pretrained(str(tmp_path / "lora"))
    batcher = Batcher(rows(), 4)
    settings = TrainSettings(steps=2)
    with pytest.raises(ConfigError, match=r"lora_dir.*mode 'qat'"):
        build_adapter(tiny_llama(0), LoRDBAConfig(r=4), batcher, settings, lora_dir=str(tmp_path / "lora"))
    for bad in (float("nan"), -0.5, 3.0, "0.1", None):
        with pytest.raises(ConfigError, match="lora_warmup"):
            build_adapter(tiny_llama(0), LoRDBAConfig(r=4, mode="qat-from-lora"), batcher, settings, lora_warmup=bad)
    with pytest.raises(ConfigError, match="LoRDBAConfig"):
        build_adapter(tiny_llama(0), {"r": 4}, batcher, settings)


def test_build_adapter_takes_a_string_out_dir_and_names_bad_settings(tmp_path):
    # out_dir as a str: TypeError 'str' / 'str' (the LoRA seed's folder); settings=None: AttributeError 'seed'.
    from lordba import ConfigError

    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), TrainSettings(steps=2), str(tmp_path), progress=False)
    assert (tmp_path / "lora_seed" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="TrainSettings"):
        build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), None)


class StopAtCall(Batcher):
    """Raises KeyboardInterrupt (Ctrl-C) at the ``stop``-th batch asked for (whatever its number)."""

    def __init__(self, *args, stop, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.stop = 0, stop

    def batch(self, k):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return super().batch(k)


def test_a_job_resumed_after_its_lora_warmup_logs_the_warmups_steps(tmp_path):
    """A qat-from-lora job interrupted after its warm-up LoRA was saved resumes from ``lora_seed`` without
    training it again; its log (``train_log.json`` of ``lordba train``) lost the warm-up's steps, and only an
    uninterrupted job's had them. Now the resumed job's log is the uninterrupted one's, entry for entry."""
    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings = TrainSettings(steps=8, lr=3e-3, checkpoint_every=1)
    kwargs = {"lora_warmup": 0.25, "progress": False}
    _, whole = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path / "whole", **kwargs)
    with pytest.raises(KeyboardInterrupt):  # the 6th batch: the 4th step of the QAT phase
        build_adapter(tiny_llama(0), cfg, StopAtCall(rows(), 4, stop=6), settings, tmp_path / "run", **kwargs)
    _, resumed = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path / "run", **kwargs)
    assert [e["step"] for e in whole.log if "loss" in e] == list(range(1, 9))
    assert resumed.log == whole.log


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_qat_phase_reads_the_batches_after_the_lora_warmups(tmp_path, grad_accum):
    """``qat-from-lora`` with a warm-up LoRA: the QAT phase read the data from batch 0 again (steps=10,
    lora_warmup=0.2: batches 0, 1, 0, 1, 2, ..., 7), so the warm-up's batches were trained twice and the last
    ones never (re-reading a seed's batches memorises them). It now continues after the warm-up's batches,
    as one run reads them."""

    read = []

    class Recording(Batcher):
        def batch(self, k: int) -> dict:
            read.append(k)
            return super().batch(k)

    batcher = Recording(rows(), 2)
    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings = TrainSettings(steps=10, lr=1e-3, grad_accum=grad_accum)
    build_adapter(tiny_llama(0), cfg, batcher, settings, tmp_path, lora_warmup=0.2, progress=False)
    assert read == list(range(10 * grad_accum))


def test_a_start_over_killed_in_its_warmup_resumes_its_own_run_not_the_earlier_one(tmp_path):
    """resume=False removed the earlier run's out/lora/ checkpoints only when its warm-up began, and its lora_seed/
    and out/checkpoints/ only when they were written again: a start over (other data) killed in its warm-up, then
    resumed, took the earlier run's seed and its QAT steps, and ended in another adapter than the run it resumed.
    Now a start over removes them first."""
    cfg = LoRDBAConfig(r=4, mode="qat-from-lora", target_modules=["q_proj"])
    settings = TrainSettings(steps=8, lr=3e-3, checkpoint_every=1)
    kwargs = {"lora_warmup": 0.25, "progress": False}
    out = tmp_path / "out"
    build_adapter(tiny_llama(0), cfg, Batcher(rows(seed=0), 4), settings, out, **kwargs)
    with pytest.raises(KeyboardInterrupt):  # the other data's first batch: in its warm-up
        build_adapter(tiny_llama(0), cfg, StopAtCall(rows(seed=1), 4, stop=1), settings, out, resume=False, **kwargs)
    got, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(seed=1), 4), settings, out, **kwargs)
    want, _ = build_adapter(tiny_llama(0), cfg, Batcher(rows(seed=1), 4), settings, tmp_path / "fresh", **kwargs)
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode, stop, want", [("qat-from-lora", 6, 5), ("ptq", 3, 2)])
def test_resumed_from_is_the_runs_step_as_the_log_counts_them(tmp_path, mode, stop, want):
    """build_adapter's resumed_from (what `lordba train` prints: "resumed at step N") was the QAT phase's own step
    (3 for the checkpoint after the run's step 5: 2 warm-up steps, then 3), and 0 for a run resumed in its LoRA seed
    (ptq killed at its 3rd batch, resumed from step 2). It is now the run's step, as the log numbers them."""
    cfg = LoRDBAConfig(r=4, mode=mode, target_modules=["q_proj"])
    settings = TrainSettings(steps=8, lr=3e-3, checkpoint_every=1)
    kwargs = {"lora_warmup": 0.25, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        build_adapter(tiny_llama(0), cfg, StopAtCall(rows(), 4, stop=stop), settings, tmp_path, **kwargs)
    _, res = build_adapter(tiny_llama(0), cfg, Batcher(rows(), 4), settings, tmp_path, **kwargs)
    assert res.resumed_from == want
