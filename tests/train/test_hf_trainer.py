"""transformers.Trainer works unchanged on a LoRDBA model: training, checkpoints, resume,
gradient checkpointing."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from lordba import LoRDBAConfig, get_lordba_model

from conftest import tiny_llama


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, length=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, 101, (4, length), generator=g)  # few patterns: learnable quickly
        self.ids = base[torch.randint(0, 4, (n,), generator=g)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def make(tmp_path, **kw):
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
    return lm, Trainer(model=lm, args=args, train_dataset=Rows())


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
