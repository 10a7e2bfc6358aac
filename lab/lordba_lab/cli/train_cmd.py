"""``lordba train``: train a LoRDBA adapter on a frozen quantized base, in one of the four modes.

Numbers are checked by argparse (a bad one is a usage error, exit code 2). The module imports
nothing heavy at the top: torch and the library load when the command runs or shows its help.
"""

from __future__ import annotations

import argparse

from lordba.cli import non_negative_int, open_fraction, output_directory, positive_float, positive_int
from lordba.cli._generation_options import SEED_MAX, seed

NAME = "train"
HELP = "train a LoRDBA adapter (modes: ptq, qat, qat-from-lora, scales-only) on a frozen quantized base"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lordba train``, each with its help text."""
    from lordba.config import MODES
    from lordba.core.scales import SCALE_DTYPES
    from lordba.quant import QUANT_BACKENDS
    from lordba.train.loop import DEVICES
    from lordba.train.tokenize import TRAIN_ON
    from lordba_lab.tasks import TASKS

    _model_and_data(p, TASKS, TRAIN_ON)
    _adapter(p, MODES, SCALE_DTYPES, QUANT_BACKENDS)
    _optimisation(p, DEVICES)
    _run_control(p)


def _model_and_data(p: argparse.ArgumentParser, tasks: dict, train_on: tuple[str, ...]) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=None,
        help="local transformers folder, or an embedded model's name (smollm2-135m-instruct, gemma-3-270m; "
        "default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--data",
        default="arithmetic",
        help="a JSONL file of chat / prompt-completion / instruction records (a prompt-completion record of two "
        f"strings is plain text, no chat template), or a built-in dataset: {', '.join(tasks)}",
    )
    g.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="a held-out JSONL file to evaluate on (default: the last records of --data, or the task's eval split)",
    )
    g.add_argument(
        "--train-on",
        choices=train_on,
        default=train_on[0],
        help="chat records: take the loss on the final assistant answer only, or on every assistant turn; the "
        f"held-out loss is taken the same way (default {train_on[0]})",
    )
    g.add_argument(
        "--max-length", type=positive_int, default=256, help="tokens per example, longer ones cut (default 256)"
    )
    g.add_argument(
        "--train-size", type=positive_int, default=2000, help="examples drawn from a built-in dataset (default 2000)"
    )
    g.add_argument("--eval-size", type=non_negative_int, default=100, help="held-out examples (default 100)")


def _adapter(p: argparse.ArgumentParser, modes: tuple, scale_dtypes: tuple, backends: tuple) -> None:
    g = p.add_argument_group("adapter and base")
    g.add_argument("--mode", choices=modes, default="qat", help="training mode (default qat)")
    g.add_argument(
        "--r", type=positive_int, default=None, help="adapter rank (default 16; with --lora, the LoRA's ranks)"
    )
    g.add_argument(
        "--alpha",
        type=positive_float,
        default=None,
        help="scaling numerator, s = alpha / r (default 32; with --lora, its lora_alpha)",
    )
    g.add_argument(
        "--scale-dtype",
        choices=scale_dtypes,
        default="int8",
        help="storage of the scales (default int8: float16's held-out loss at 3/4 of its bytes, docs/format.md)",
    )
    g.add_argument(
        "--target-modules",
        type=module_names,
        default=None,
        help="comma-separated module names, or 'all-linear' (default: all linear layers but the head; "
        "with --lora, the LoRA's modules)",
    )
    default = backends[0]  # QUANT_BACKENDS lists the default first
    g.add_argument("--quant", choices=backends, default=default, help=f"base quantization backend (default {default})")
    g.add_argument("--bits", type=positive_int, default=4, help="base weight bits (default 4)")
    g.add_argument("--group-size", type=positive_int, default=64, help="quantization group size (default 64)")
    g.add_argument(
        "--lora", default=None, help="a trained PEFT LoRA directory to start from (ptq, qat-from-lora, scales-only)"
    )
    g.add_argument(
        "--lora-warmup",
        type=open_fraction,
        default=0.1,
        help="fraction of steps for the LoRA warm-up seed (default 0.1)",
    )
    g.add_argument("--lora-lr", type=positive_float, default=1e-3, help="learning rate of the LoRA seed (default 1e-3)")


def _optimisation(p: argparse.ArgumentParser, devices: tuple) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="examples per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument(
        "--lr",
        type=positive_float,
        default=1e-4,
        help="peak learning rate (default 1e-4: best of 1e-3/3e-4/1e-4 in every mode, measured)",
    )
    g.add_argument("--seed", type=seed, default=0, help=f"seed of everything random, 0 to {SEED_MAX} (default 0)")
    g.add_argument(
        "--device", choices=devices, default=None, help="where to train (default: the best available: cuda, mps, cpu)"
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="forward passes in bfloat16 autocast (weights and optimizer stay float32; "
        "not with --quant hqq, whose backward fails under autocast)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, slower)",
    )


def module_names(text: str) -> list[str] | str:
    """``--target-modules``: ``"all-linear"``, or the comma-separated module names as a list;
    ``argparse.ArgumentTypeError`` (a usage error) if it names no module (``""``, ``","``)."""
    if text.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"must name at least one module (comma-separated, or 'all-linear'), got {text!r}"
        )
    return names


def _run_control(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and run control")
    g.add_argument(
        "--out", type=output_directory, required=True, help="output directory: adapter, train_log.json, checkpoints"
    )
    g.add_argument(
        "--eval-every", type=non_negative_int, default=0, help="evaluate every N steps (default 0: at the end only)"
    )
    g.add_argument(
        "--checkpoint-every", type=non_negative_int, default=50, help="checkpoint every N steps (0: never; default 50)"
    )
    g.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say, save the adapter in ``--out`` and print a summary; returns 0.

    Raises:
        LoRDBAError: bad data, model folder, device or option combination (exit code 3).
    """
    from lordba.train import TrainSettings
    from lordba_lab.train_job import TrainJob, run_job

    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
    )
    job = TrainJob(
        out=args.out,
        model=args.model,
        data=args.data,
        mode=args.mode,
        r=args.r,
        alpha=args.alpha,
        scale_dtype=args.scale_dtype,
        target_modules=args.target_modules,
        quant=args.quant,
        bits=args.bits,
        group_size=args.group_size,
        lora=args.lora,
        lora_warmup=args.lora_warmup,
        lora_lr=args.lora_lr,
        train_size=args.train_size,
        eval_size=args.eval_size,
        max_length=args.max_length,
        eval_data=args.eval_data,
        train_on=args.train_on,
        device=args.device,
        settings=settings,
        resume=not args.no_resume,
        progress=not args.quiet,
    )
    lm, result = run_job(job)
    _summary(args.out, lm, result)
    return 0


def _summary(out: str, lm: object, result: object) -> None:
    final = [e for e in result.log if "eval_loss" in e]
    print(
        f"saved adapter to {out} ({result.seconds:.0f} s of training"
        + (f", resumed at step {result.resumed_from}" if result.resumed_from else "")
        + ")"
    )
    if final:
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in final[-1].items() if k != "step"))
    print(lm.size_report().summary())
