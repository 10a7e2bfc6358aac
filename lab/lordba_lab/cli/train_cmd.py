"""``lordba train``: train a LoRDBA adapter on a frozen quantized base, in one of the four modes."""

from __future__ import annotations

import argparse

from lordba.config import MODES
from lordba.core.scales import SCALE_DTYPES
from lordba.quant import QUANT_BACKENDS
from lordba.train import TrainSettings
from lordba_lab.tasks import TASKS
from lordba_lab.train_job import TrainJob, run_job

NAME = "train"
HELP = "train a LoRDBA adapter (modes: ptq, qat, qat-from-lora, scales-only) on a frozen quantized base"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="local transformers folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data",
        default="arithmetic",
        help=f"a JSONL file of chat/instruction records, or a built-in dataset: {', '.join(TASKS)}",
    )
    p.add_argument("--mode", choices=MODES, default="qat", help="training mode (default qat)")
    p.add_argument("--out", required=True, help="output directory: adapter, train_log.json, checkpoints")
    p.add_argument("--r", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="scaling numerator, s = alpha / r (default 32)")
    p.add_argument("--scale-dtype", choices=SCALE_DTYPES, default="float16", help="storage of the scales")
    p.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or 'all-linear' (default: all linear layers but the head)",
    )
    p.add_argument("--quant", choices=QUANT_BACKENDS, default="hqq", help="base quantization backend (default hqq)")
    p.add_argument("--bits", type=int, default=4, help="base weight bits (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument(
        "--lora", default=None, help="a trained PEFT LoRA directory to start from (ptq, qat-from-lora, scales-only)"
    )
    p.add_argument(
        "--lora-warmup", type=float, default=0.1, help="fraction of steps for the LoRA warm-up seed (default 0.1)"
    )
    p.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA seed (default 1e-3)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="peak learning rate (default 1e-4: best of 1e-3/3e-4/1e-4 in every mode, measured)",
    )
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-size", type=int, default=2000, help="examples drawn from a built-in dataset")
    p.add_argument("--eval-size", type=int, default=100, help="held-out examples")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps (0: never)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    targets = args.target_modules
    if targets and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    job = TrainJob(
        out=args.out,
        model=args.model,
        data=args.data,
        mode=args.mode,
        r=args.r,
        alpha=args.alpha,
        scale_dtype=args.scale_dtype,
        target_modules=targets,
        quant=args.quant,
        bits=args.bits,
        group_size=args.group_size,
        lora=args.lora,
        lora_warmup=args.lora_warmup,
        lora_lr=args.lora_lr,
        train_size=args.train_size,
        eval_size=args.eval_size,
        max_length=args.max_length,
        settings=settings,
        resume=not args.no_resume,
        progress=not args.quiet,
    )
    lm, result = run_job(job)
    final = [e for e in result.log if "eval_loss" in e]
    print(
        f"saved adapter to {args.out} ({result.seconds:.0f} s of training"
        + (f", resumed at step {result.resumed_from}" if result.resumed_from else "")
        + ")"
    )
    if final:
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in final[-1].items() if k != "step"))
    print(lm.size_report().summary())
    return 0
