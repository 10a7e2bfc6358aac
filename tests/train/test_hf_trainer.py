"""transformers.Trainer works unchanged on a LoRDBA model: training, checkpoints, resume,
gradient checkpointing; with LoRDBACallback, checkpoints and output_dir hold the packed adapter."""

import pytest
import torch
from transformers import Trainer, TrainerState, TrainingArguments

from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.train.hf_trainer import LoRDBACallback

from conftest import TINY, tiny_llama


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, length=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, 101, (4, length), generator=g)  # few patterns: learnable quickly
        self.ids = base[torch.randint(0, 4, (n,), generator=g)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def make(tmp_path, callbacks=None, eval_dataset=None, **kw):
    torch.manual_seed(0)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=12,
        logging_steps=1,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        **kw,
    )
    return lm, Trainer(model=lm, args=args, train_dataset=Rows(), eval_dataset=eval_dataset, callbacks=callbacks)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_the_adapter_only(tmp_path, checkpointing):
    lm, trainer = make(tmp_path, gradient_checkpointing=checkpointing)
    base = {k: v.clone() for k, v in tiny_llama(0).state_dict().items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15
    for k, v in lm.base_model.state_dict().items():
        if ".lordba_adapters." not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in lm.parameters() if p.requires_grad}
    ckpt = tmp_path / "out" / "checkpoint-6" / "model.safetensors"
    assert ckpt.is_file() and ckpt.stat().st_size < 200_000  # adapter-only checkpoint


def test_trainer_resumes_from_its_checkpoint(tmp_path):
    lm, trainer = make(tmp_path)
    trainer.train()
    want = {k: v.clone() for k, v in lm.state_dict().items()}
    lm2, trainer2 = make(tmp_path / "again")
    trainer2.args.output_dir = str(tmp_path / "out")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    got = lm2.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_state_dict_is_the_adapters_only_and_load_is_strict(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    sd = lm.state_dict()
    assert sd and all(".lordba_adapters.default." in k for k in sd)
    lm.load_state_dict(sd)
    from lordba import AdapterStateError

    with pytest.raises(AdapterStateError, match="missing"):
        lm.load_state_dict({})


PACKED = ("adapter_config.json", "lordba_model.safetensors")
IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_checkpoints_hold_the_packed_adapter_of_their_training_state(tmp_path):
    lm, trainer = make(tmp_path, callbacks=[LoRDBACallback()])
    trainer.train()
    for step in (6, 12):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        assert all((ckpt / name).is_file() for name in PACKED), sorted(p.name for p in ckpt.iterdir())
        assert (ckpt / "model.safetensors").is_file()  # the training state resume reads (latent signs)
        # the packed file is exactly the pack of that checkpoint's training state
        again = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4))
        from safetensors.torch import load_file

        again.load_state_dict(load_file(ckpt / "model.safetensors"))
        again.save_pretrained(tmp_path / f"repack-{step}")
        for name in PACKED:
            assert (ckpt / name).read_bytes() == (tmp_path / f"repack-{step}" / name).read_bytes(), (step, name)
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), str(tmp_path / "out" / "checkpoint-12"))
    lm.eval()
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(loaded), logits(tiny_llama(0)), atol=1e-3)  # the adapter is really there


def test_save_model_dir_holds_the_final_packed_adapter(tmp_path):
    lm, trainer = make(tmp_path, callbacks=[LoRDBACallback()])
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert all((out / name).is_file() for name in PACKED)
    lm.save_pretrained(tmp_path / "direct")
    for name in PACKED:
        assert (out / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), out)
    torch.testing.assert_close(logits(loaded), logits(lm.eval()), rtol=1e-5, atol=1e-5)


def test_resume_from_a_packed_checkpoint_is_exact(tmp_path):
    lm, trainer = make(tmp_path, callbacks=[LoRDBACallback()])
    trainer.train()
    lm2, trainer2 = make(tmp_path / "again", callbacks=[LoRDBACallback()])
    trainer2.args.output_dir = str(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    want, got = lm.state_dict(), lm2.state_dict()
    assert set(got) == set(want)
    for k in want:  # latent signs and float32 scales: the whole trainable state
        assert torch.equal(got[k], want[k]), k
    for name in PACKED:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_callback_refuses_a_model_that_is_not_lordba(tmp_path):
    from lordba import ConfigError

    model = tiny_llama(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(n=4), callbacks=[LoRDBACallback()])
    with pytest.raises(ConfigError, match="LlamaForCausalLM, not a LoRDBAModel"):
        trainer.train()


def test_evaluation_reports_the_loss_and_load_best_model_at_end_works(tmp_path):
    # the Trainer finds the label names in the model's class's forward (transformers' find_labels): without
    # "labels" there, evaluation computed no eval_loss and load_best_model_at_end (metric: loss) raised KeyError
    evaluate = dict(eval_dataset=Rows(n=8), eval_strategy="steps", eval_steps=6, load_best_model_at_end=True)
    lm, trainer = make(tmp_path, callbacks=[LoRDBACallback()], **evaluate)
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    batch = Rows(n=8)[:]
    with torch.no_grad():
        want = lm.eval()(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    best = tmp_path / "out" / "checkpoint-12"
    assert trainer.state.best_model_checkpoint == str(best)
    for name in PACKED:  # output_dir holds the best checkpoint's adapter
        assert (tmp_path / "out" / name).read_bytes() == (best / name).read_bytes(), name


class FakeHub:
    """``hf_api()`` of transformers.trainer: records the files of each folder when it is uploaded."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, name, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=f"me/{name}")

    def upload_folder(self, folder_path, path_in_repo=None, **kw):
        from concurrent.futures import Future
        from pathlib import Path

        self.uploads.append(
            (path_in_repo, {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()})
        )
        done = Future()
        done.set_result(None)
        return done


def test_pushes_during_training_upload_the_packed_adapter(tmp_path, monkeypatch):
    # the Trainer uploads output_dir (and the checkpoint) inside its save, before on_save: the pushes held
    # model.safetensors only, no adapter LoRDBAModel.from_pretrained could load
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    lm, trainer = make(tmp_path, callbacks=[LoRDBACallback()], push_to_hub=True, hub_strategy="checkpoint")
    trainer.train()
    trainer.push_to_hub()  # after training: output_dir, the final adapter
    lm.save_pretrained(tmp_path / "direct")
    assert all(hub.uploads[-1][1][name] == (tmp_path / "direct" / name).read_bytes() for name in PACKED)
    del hub.uploads[-1]
    assert [where for where, _ in hub.uploads] == [None, "last-checkpoint"] * 2
    for (_, files), step in zip(hub.uploads[::2], (6, 12)):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        for name in PACKED:
            assert files.get(name) == (ckpt / name).read_bytes(), (step, name)
    for (_, files), step in zip(hub.uploads[1::2], (6, 12)):
        assert all(name in files for name in PACKED), step


@pytest.mark.parametrize("should_save", [True, False])
def test_callback_writes_where_the_trainer_saves(tmp_path, should_save):
    # save_on_each_node=True: each node's local process zero saves the checkpoints (args.should_save); the callback
    # wrote only on the world's process zero, so the checkpoints of the other nodes had no packed adapter
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=should_save)
    state = TrainerState(is_world_process_zero=False, is_local_process_zero=True, global_step=3)
    (tmp_path / "checkpoint-3").mkdir()
    LoRDBACallback().on_save(args, state, TrainerControl(), model=lm)
    LoRDBACallback().on_train_end(args, state, TrainerControl(), model=lm)
    for directory in (tmp_path / "checkpoint-3", tmp_path):
        assert all((directory / name).is_file() == should_save for name in PACKED), directory


def test_callback_takes_one_adapter_name_given_as_a_string(tmp_path):
    """``LoRDBACallback(selected_adapters="default")`` kept the name as its characters and every write failed with
    "unknown adapter 'd'" (save_pretrained takes one name as a string)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    LoRDBACallback("default").on_train_end(args, TrainerState(global_step=3), TrainerControl(), model=lm)
    assert all((tmp_path / name).is_file() for name in PACKED)


def test_trainer_trains_an_adapter_on_a_base_quantized_by_transformers(tmp_path):
    # a base loaded with a quantization_config (is_quantized, read through the wrapper) was refused by the
    # Trainer as "purely quantized" (transformers' validate_quantization_for_training): the QLoRA workflow
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(0).save_pretrained(tmp_path / "base")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4, device_map="cpu")
    assert base.is_quantized
    lm = get_lordba_model(base, LoRDBAConfig(r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True
    )
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    Trainer(model=lm, args=args, train_dataset=Rows(n=8), callbacks=[LoRDBACallback()]).train()
    assert any(not torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4, device_map="cpu")
    LoRDBAModel.from_pretrained(again, str(tmp_path / "out"))  # (bitsandbytes' CPU inference kernel refuses hidden 40)
    lm.save_pretrained(tmp_path / "direct")
    for name in PACKED:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name


def test_label_smoothing_shifts_the_labels_of_a_causal_lm(tmp_path):
    # the Trainer's label smoother shifts the labels of a model whose _get_name() is a causal LM class; a LoRDBAModel
    # answered "LoRDBAModel", so with label_smoothing_factor the loss compared each position with its own token, not
    # the next one: an adapter with no update yet evaluated at 5.14 where its base and a PEFT LoRA give 4.65
    def eval_loss(model):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            label_smoothing_factor=0.1,
            per_device_eval_batch_size=4,
            report_to=[],
            use_cpu=True,
        )
        return Trainer(model=model, args=args, eval_dataset=Rows(n=8)).evaluate()["eval_loss"]

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4))  # no update yet: the base's outputs
    assert eval_loss(lm) == pytest.approx(eval_loss(tiny_llama(0)), rel=1e-6)
    assert repr(lm).startswith("LoRDBAModel(\n  (base_model): LlamaForCausalLM(")


def test_accelerate_unwrap_without_the_fp32_wrapper_gives_back_a_working_model():
    # accelerate's prepare under mixed precision wraps model.forward; unwrap_model(keep_fp32_wrapper=False) binds the
    # forward it kept to the model with MethodType, and every call then failed ("got multiple values for argument
    # 'input_ids'"): the LoRDBAModel's forward received the model itself as its first argument
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    want = logits(lm)
    AcceleratorState._reset_state(True)  # the state the other tests' Trainers left (without mixed precision)
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        unwrapped = accelerator.unwrap_model(accelerator.prepare(lm), keep_fp32_wrapper=False)
        torch.testing.assert_close(logits(unwrapped), want)
        with torch.no_grad():
            torch.testing.assert_close(unwrapped(IDS).logits, want)  # positional too
    finally:
        AcceleratorState._reset_state(True)


def test_a_question_answering_adapter_reports_its_eval_loss(tmp_path):
    # the Trainer takes a QA model's labels (start_positions / end_positions) from its class's forward when the class
    # is named ...QuestionAnswering (find_labels); a LoRDBAModel's class named "labels" only, so evaluation of a
    # QUESTION_ANS adapter computed no eval_loss (PEFT has PeftModelForQuestionAnswering for this)
    from transformers import LlamaConfig, LlamaForQuestionAnswering

    from lordba.nn.model import LoRDBAModelForQuestionAnswering

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, pad_token_id=0)
    qa = get_lordba_model(LlamaForQuestionAnswering(cfg), LoRDBAConfig(r=4, task_type="QUESTION_ANS"))
    assert isinstance(qa, LoRDBAModelForQuestionAnswering) and isinstance(qa, LoRDBAModel)
    ids = torch.randint(1, 101, (8, 10), generator=torch.Generator().manual_seed(0))
    starts, ends = torch.arange(8) % 5, torch.arange(8) % 5 + 3
    rows = [{"input_ids": i, "start_positions": s, "end_positions": e} for i, s, e in zip(ids, starts, ends)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=qa, args=args, eval_dataset=rows)
    assert trainer.label_names == ["start_positions", "end_positions"]
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = qa.eval()(input_ids=ids, start_positions=starts, end_positions=ends).loss
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    saved = tmp_path / "saved"
    qa.save_pretrained(saved)
    assert type(LoRDBAModel.from_pretrained(LlamaForQuestionAnswering(cfg), saved)) is LoRDBAModelForQuestionAnswering


def test_ddp_with_reentrant_checkpointing_is_refused_naming_ddp_find_unused_parameters():
    """Under DDP (torchrun, 2 CPU ranks) with gradient_checkpointing_kwargs={"use_reentrant": True}, training a
    LoRDBAModel failed at the first backward with DDP's "Expected to mark a variable ready only once ... latent_A has
    been marked as ready twice": the Trainer passes find_unused_parameters=True for a model that is not a
    PreTrainedModel. The callback now refuses it at train begin naming the argument; ddp_find_unused_parameters=False
    or non-reentrant checkpointing (transformers' default) are let through, as is a single process."""
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    from lordba import ConfigError

    def args(world=2, find_unused=None):
        mode = ParallelMode.DISTRIBUTED if world > 1 else ParallelMode.NOT_PARALLEL
        return SimpleNamespace(world_size=world, parallel_mode=mode, fsdp=[], deepspeed=None,
                               ddp_find_unused_parameters=find_unused)  # fmt: skip

    def begin(lm, a):
        return LoRDBACallback().on_train_begin(a, TrainerState(), "control", model=lm)

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4))
    assert begin(lm, args()) == "control"  # no checkpointing
    lm.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ConfigError, match=r"re-entrant .*ddp_find_unused_parameters=False"):
        begin(lm, args())
    assert begin(lm, args(find_unused=False)) == begin(lm, args(world=1)) == "control"
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4))
    lm.gradient_checkpointing_enable({"use_reentrant": False})
    assert begin(lm, args()) == "control"


def test_a_resume_into_other_target_modules_is_refused_not_misapplied(tmp_path):
    """A checkpoint trained on q_proj resumed into a model adapting o_proj (the same shapes) went on silently: the
    Trainer loads model.safetensors leniently (a logged warning: missing / unexpected keys), so the o_proj adapters
    started over, with the q_proj adapters' Adam moments restored into them by position. The callback records the
    trainable parameters' names in each checkpoint's trainer_state.json and refuses a resume of other ones; the same
    model resumes (test_trainer_resumes_from_its_checkpoint)."""
    from lordba import ConfigError

    def trainer(targets, out):
        torch.manual_seed(0)
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, target_modules=targets))
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                                 report_to=[], use_cpu=True, seed=0, data_seed=0)  # fmt: skip
        return Trainer(model=lm, args=args, train_dataset=Rows(), callbacks=[LoRDBACallback(at_train_end=False)])

    trainer(["q_proj"], tmp_path).train()
    with pytest.raises(ConfigError, match=r"step 2\) trained other parameters .*o_proj.*q_proj"):
        trainer(["o_proj"], tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    trainer(["q_proj"], tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
