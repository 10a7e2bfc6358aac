"""`lordba train` / the training job end to end on a tiny model folder: reproducibility, bad
--model folders, --eval-data, --bf16, --device, --train-on."""

import json
import shutil

import pytest
import torch

from lordba import ConfigError
from lordba._util.cachedir import cache_dir
from lordba.cli import main
from lordba.train import TrainSettings
from lordba.train.evaluate import evaluate
from lordba_lab import train_job
from lordba_lab.train_job import TrainJob, load_data, run_job
from tiny_model import chat_jsonl, tiny_model_dir


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model folder and chat data; quantized bases cached under ``tmp_path`` (the CPU kernels'
    build stays shared, so that no test compiles them again)."""
    kernels = cache_dir() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    return tiny_model_dir(tmp_path / "model"), chat_jsonl(tmp_path / "data.jsonl")


def train_args(model, data, out, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--r",
        "4",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--eval-size",
        "2",
        "--group-size",
        "8",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "2",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize(
    "mode, quant",
    [
        ("qat", "q4"),
        ("ptq", "q4"),
        ("qat", "hqq"),
        ("ptq", "hqq"),
        ("qat-from-lora", "hqq"),
        ("scales-only", "hqq"),
        ("qat", "none"),
    ],
)
def test_the_same_command_twice_gives_the_same_adapter_bytes(setup, tmp_path, mode, quant):
    model, data = setup
    files = []
    for run in ("a", "b"):
        torch.rand(7)  # whatever ran before in the process must not matter
        out = tmp_path / run
        group = ("--group-size", "32") if quant == "q4" else ()  # q4 groups are multiples of 32
        assert main(train_args(model, data, out, "--mode", mode, "--quant", quant, "--steps", "2", *group)) == 0
        files.append({name: (out / name).read_bytes() for name in ("lordba_model.safetensors", "adapter_config.json")})
    assert files[0] == files[1]


def test_a_model_path_that_is_no_model_folder_is_invalid_input_naming_it(setup, tmp_path, capsys):
    model, data = setup
    missing = tmp_path / "nonexistent"
    assert main(train_args(missing, data, tmp_path / "o1")) == 3
    err = capsys.readouterr().err
    assert str(missing) in err and "no such folder" in err and "internal error" not in err
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    assert main(train_args(model, data, tmp_path / "o2")) == 3
    err = capsys.readouterr().err
    assert str(model) in err and "no tokenizer" in err
    (tmp_path / "empty").mkdir()
    assert main(train_args(tmp_path / "empty", data, tmp_path / "o3")) == 3
    assert "no config.json" in capsys.readouterr().err


def test_eval_data_is_held_out_instead_of_a_split(setup, tmp_path):
    model, data = setup
    held = chat_jsonl(tmp_path / "held.jsonl", n=3, offset=100)
    train, evals, _ = load_data(str(data), None, 0, 2, 0, str(held))
    assert len(train) == 16 and [e.messages for e in evals] == [
        (("user", f"{i % 7}+{3 * i % 5}?"),) for i in (100, 101, 102)
    ]
    train, evals, _ = load_data(str(data), None, 0, 2, 0)
    assert len(train) == 15 and len(evals) == 1  # without it: the file's last records (at most 10%)
    out = tmp_path / "run"
    assert main(train_args(model, data, out, "--quant", "none", "--eval-data", str(held))) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert "eval_loss" in log[-1]
    assert json.loads((out / "train_job.json").read_text())["eval_data"] == str(held)


def test_bf16_trains_on_cpu_and_is_taken_on_an_hqq_base(setup, tmp_path, capsys):
    model, data = setup
    out = tmp_path / "bf16"
    assert main(train_args(model, data, out, "--quant", "none", "--bf16", "--device", "cpu")) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log if "loss" in e)
    assert json.loads((out / "train_job.json").read_text())["settings"]["bf16"] is True
    TrainJob(out=str(tmp_path), quant="hqq", settings=TrainSettings(bf16=True))  # HQQ trains under bf16 autocast


def test_training_on_every_assistant_turn(setup, tmp_path, monkeypatch):
    model, _ = setup
    rows = [
        {
            "messages": [
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and +1?"},
                {"role": "assistant", "content": "3"},
            ]
        }
    ] * 8
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = TrainJob(
        out=str(tmp_path / "run"),
        model=str(model),
        data=str(data),
        quant="none",
        r=4,
        eval_size=1,
        train_on="all-assistant-turns",
        settings=TrainSettings(steps=2, batch_size=2),
        progress=False,
    )
    seen = []
    monkeypatch.setattr(train_job, "evaluate", lambda *a, **kw: seen.append(kw.get("train_on")) or evaluate(*a, **kw))
    run_job(job)
    assert seen and set(seen) == {"all-assistant-turns"}  # the held-out loss on the turns trained, not the last only
    assert json.loads((tmp_path / "run" / "train_job.json").read_text())["train_on"] == "all-assistant-turns"
    with pytest.raises(ConfigError, match="train_on"):
        TrainJob(out=str(tmp_path), train_on="every-turn")
    with pytest.raises(ConfigError, match="max_length must be a positive integer"):  # before the model loads
        TrainJob(out=str(tmp_path), max_length=-1)


def test_another_job_into_the_same_out_is_refused_and_no_resume_leaves_no_stale_checkpoints(setup, tmp_path, capsys):
    """A job is resumed only from the checkpoints of a job with the same options (it resumed another job's
    state silently: the adapter of the first job, labelled with the second's options), and --no-resume
    removes the earlier job's state (its later steps outlived the new job's checkpoints, and resuming
    the new job then read them)."""
    model, data = setup
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(train_args(model, data, out, "--quant", "none")) == 0  # checkpoints at steps 2 and 4
    other = ("--quant", "none", "--steps", "2", "--lr", "1e-2", "--seed", "3")
    assert main(train_args(model, data, out, *other)) == 3
    err = capsys.readouterr().err
    assert "holds the checkpoints of another training job" in err and "lr: 0.003 -> 0.01" in err
    assert "seed: 0 -> 3" in err and "steps: 4 -> 2" in err and "--no-resume" in err
    assert main(train_args(model, data, fresh, *other)) == 0
    expected = (fresh / "lordba_model.safetensors").read_bytes()
    assert main(train_args(model, data, out, *other, "--no-resume")) == 0
    assert (out / "lordba_model.safetensors").read_bytes() == expected
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((out / "train_job.json").read_text())["settings"]["lr"] == 1e-2
    assert main(train_args(model, data, out, *other, "--checkpoint-every", "1")) == 0  # the same job: resumed
    assert (out / "lordba_model.safetensors").read_bytes() == expected
    assert "resumed at step 2" in capsys.readouterr().out


def test_a_heldout_example_too_long_to_encode_is_refused_before_training(setup, tmp_path, capsys):
    """Held-out examples were encoded only at the evaluation: one whose prompt alone is longer than
    ``--max-length`` stopped the job after all its training steps, before the adapter was saved, with an
    "example 0" that named no file (and every resume trained to the end and failed again). Now the job is
    refused before it trains, naming the held-out file."""
    model, data = setup
    held = tmp_path / "held.jsonl"
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]
    held.write_text(json.dumps({"messages": long_prompt}) + "\n")
    out = tmp_path / "run"
    args = train_args(model, data, out, "--quant", "none", "--eval-data", str(held), "--max-length", "64")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert f"held-out data ({held}): {held}:1 (example 0): the prompt alone is longer than max_length=64" in err
    assert not (out / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_a_bad_lora_changes_nothing_in_out(setup, tmp_path, capsys, mode):
    """`--out`'s train_job.json was written before the options build_adapter checks: a --lora that cannot be read
    (or one with --mode qat) failed the job after replacing the record of the adapter already in --out, which
    then described a job that never ran. Now such a job is refused before --out is touched."""
    model, data = setup
    out = tmp_path / "out"
    assert main(train_args(model, data, out, "--quant", "none", "--checkpoint-every", "0")) == 0
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a finished job whose checkpoints were pruned
    record, adapter = (out / "train_job.json").read_bytes(), (out / "lordba_model.safetensors").read_bytes()
    capsys.readouterr()
    missing = tmp_path / "no-such-lora"
    assert main(train_args(model, data, out, "--quant", "none", "--mode", mode, "--lora", str(missing))) == 3
    err = capsys.readouterr().err
    assert (str(missing) if mode == "ptq" else "with mode 'qat'") in err
    assert (out / "train_job.json").read_bytes() == record
    assert (out / "lordba_model.safetensors").read_bytes() == adapter


def test_a_job_resumed_with_gradient_checkpointing_continues_its_checkpoints(setup, tmp_path, capsys):
    """Gradient checkpointing changes the memory a step takes, not what it computes (the same adapter, byte for
    byte): it is what one turns on to resume a job that ran out of memory. Such a resume was refused as
    "another training job (options that differ: gradient_checkpointing: False -> True)", the job's steps lost."""
    model, data = setup
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(train_args(model, data, whole, "--quant", "none")) == 0
    assert main(train_args(model, data, out, "--quant", "none")) == 0
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the checkpoint of step 2
    (out / "lordba_model.safetensors").unlink()
    capsys.readouterr()
    assert main(train_args(model, data, out, "--quant", "none", "--gradient-checkpointing")) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert (out / "lordba_model.safetensors").read_bytes() == (whole / "lordba_model.safetensors").read_bytes()


def test_a_model_folder_under_the_home_directory_given_with_a_tilde_is_loaded(setup, tmp_path, monkeypatch):
    """``--model=~/models/x`` (the shell leaves a ``~`` after ``=`` as it is): the folder check expanded it and
    passed, then transformers got ``~/model`` unexpanded and the job failed with "cannot be loaded by
    transformers (Repo id must use alphanumeric chars ...)"."""
    model, data = setup
    assert model == tmp_path / "model"
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "run"
    assert main(train_args("~/model", data, out, "--quant", "none", "--steps", "1", "--checkpoint-every", "0")) == 0
    assert (out / "lordba_model.safetensors").is_file()


def test_a_given_lora_sets_the_rank_and_alpha_left_unset(setup, tmp_path):
    """``lordba train --mode ptq --lora DIR`` converted at ``--r 16`` / ``--alpha 32`` whatever the LoRA's rank,
    where ``lordba convert`` keeps the LoRA's ranks (per module) and its ``lora_alpha``: a rank-2 LoRA became a
    rank-16 adapter 8x the size. Left unset they are now the LoRA's; given, they stay as given."""
    from transformers import AutoModelForCausalLM

    from lordba.train.lora import get_peft_lora_model, peft_lora_config

    model, data = setup
    config = peft_lora_config(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3})
    get_peft_lora_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(str(tmp_path / "lora"))

    def trained(**given):
        job = TrainJob(
            out=str(tmp_path / f"run{len(given)}"),
            model=str(model),
            data=str(data),
            mode="ptq",
            lora=str(tmp_path / "lora"),
            quant="none",
            eval_size=0,
            settings=TrainSettings(steps=1, batch_size=2),
            progress=False,
            **given,
        )
        lm, _ = run_job(job)
        return lm.peft_config["default"], {k: m.r for k, m in lm.adapter_modules("default").items()}

    config, ranks = trained()
    assert (config.r, config.alpha) == (2, 6.0)
    assert {k.rsplit(".", 1)[-1]: r for k, r in ranks.items()} == {"q_proj": 2, "v_proj": 3}
    config, ranks = trained(r=4, alpha=8.0)
    assert (config.r, config.alpha, set(ranks.values())) == (4, 8.0, {4})


def test_a_seed_past_torchs_range_is_a_usage_error_naming_the_option(tmp_path, capsys):
    """``--seed 18446744073709551616`` (2**64) passed argparse and was refused as invalid input (exit 3) naming
    ``TrainSettings.seed``, where every other number out of range is a usage error (exit 2) naming its option. The
    largest seed torch takes is an option's value."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "o"), "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--seed" in err and str(2**64 - 1) in err
    assert not (tmp_path / "o").exists()
    from lordba.cli import build_parser

    assert build_parser("train").parse_args(["train", "--out", "o", "--seed", str(2**64 - 1)]).seed == 2**64 - 1


def test_an_embedded_models_name_is_taken_as_the_model_as_the_job_loads_it():
    """``lordba train --model gemma-3-270m`` was refused ("no such folder") though the job loads every embedded model
    by its name (``resolve_model_path``), as ``lordba reproduce --model gemma-3-270m`` does: only the default's name
    passed the check. A bare name that is no embedded model is still refused naming it; nothing is fetched here."""
    from lordba_lab.assets.models import MODELS

    assert "gemma-3-270m" in MODELS
    for name in MODELS:
        train_job.check_model_source(name)  # no error
    with pytest.raises(ConfigError, match="gemma-3-27b: no such folder"):
        train_job.check_model_source("gemma-3-27b")


def test_a_name_that_is_no_folder_is_refused_naming_the_embedded_models_and_the_default():
    """``lordba train --model default`` (as ``lordba generate`` / ``serve`` take it) said only "no such folder (a local
    transformers model folder is expected)": the embedded models' names, which the job takes, and that leaving
    ``--model`` out gives the default, went unsaid."""
    with pytest.raises(ConfigError) as err:
        train_job.check_model_source("default")
    said = str(err.value)
    assert "--model default: no such folder" in said and "gemma-3-270m, smollm2-135m-instruct" in said, said
    assert "without --model, the default: smollm2-135m-instruct" in said, said
