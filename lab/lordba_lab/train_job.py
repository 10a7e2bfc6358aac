"""One training job, end to end: what ``lordba train`` runs and the demo reuses.

Loads the base model (a local transformers folder or the embedded default), quantizes it, builds
the data, trains in one of the four modes (SPEC §3), evaluates on a held-out split and saves the
packed adapter (SPEC §6) plus ``train_log.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lordba.config import MODES, LoRDBAConfig
from lordba.errors import ConfigError
from lordba.train.evaluate import evaluate
from lordba.train.loop import TrainResult, TrainSettings, write_log
from lordba.train.modes import build_adapter
from lordba.train.records import Example, read_jsonl
from lordba.train.tokenize import Batcher, encode_examples
from lordba_lab.assets import load_model_and_tokenizer
from lordba_lab.assets.models import resolve_model_path
from lordba_lab.quant_cache import quantize_model_cached
from lordba_lab.tasks import get_task


@dataclass
class TrainJob:
    """Everything one run needs; the CLI's options map onto these fields."""

    out: str
    model: str | None = None
    data: str = "arithmetic"
    mode: str = "qat"
    r: int = 16
    alpha: float = 32.0
    scale_dtype: str = "float16"
    target_modules: list[str] | str | None = None
    quant: str = "hqq"
    bits: int = 4
    group_size: int = 64
    lora: str | None = None
    lora_warmup: float = 0.1
    lora_lr: float = 1e-3
    train_size: int = 2000
    eval_size: int = 100
    max_length: int = 256
    settings: TrainSettings = field(default_factory=TrainSettings)
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.lora_warmup < 1.0:
            raise ConfigError(f"lora_warmup must be in (0, 1), got {self.lora_warmup}")
        LoRDBAConfig(r=self.r, alpha=self.alpha, scale_dtype=self.scale_dtype, target_modules=self.target_modules)


def load_data(spec: str, tokenizer, train_size: int, eval_size: int, seed: int):  # noqa: ANN001, ANN201
    """``(train examples, eval examples, task or None)`` for a built-in task name or a JSONL file
    (the file's last ``eval_size`` records, at most 10%, are held out)."""
    if spec.endswith(".jsonl") or Path(spec).is_file():
        rows: list[Example] = read_jsonl(spec)
        n_eval = min(eval_size, max(1, len(rows) // 10)) if len(rows) > 1 else 0
        return rows[: len(rows) - n_eval], rows[len(rows) - n_eval :], None
    task = get_task(spec)
    return task.examples("train", train_size, seed), task.examples("eval", eval_size, seed), task


def run_job(job: TrainJob) -> tuple[object, TrainResult]:
    """Run ``job``; returns the trained LoRDBA model and the training result."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer(job.model)
    quantize_model_cached(model, resolve_model_path(job.model), job.quant, job.bits, job.group_size, job.progress)
    train_ex, eval_ex, task = load_data(job.data, tok, job.train_size, job.eval_size, job.settings.seed)
    rows = encode_examples(tok, train_ex, job.max_length)
    batcher = Batcher(rows, job.settings.batch_size, seed=job.settings.seed, pad_id=tok.pad_token_id or 0)
    config = LoRDBAConfig(
        r=job.r,
        alpha=job.alpha,
        scale_dtype=job.scale_dtype,
        target_modules=job.target_modules,
        mode=job.mode,
        base_model_name_or_path=job.model or model.config._name_or_path,
    )

    def run_eval(m) -> dict[str, float]:  # noqa: ANN001
        return evaluate(
            m, tok, eval_ex, task.score if task else None, task.max_new_tokens if task else 0, job.max_length
        )

    lm, result = build_adapter(
        model,
        config,
        batcher,
        job.settings,
        out_dir=out,
        lora_dir=job.lora,
        lora_warmup=job.lora_warmup,
        lora_lr=job.lora_lr,
        evaluate=run_eval if eval_ex else None,
        resume=job.resume,
        progress=job.progress,
    )
    lm.save_pretrained(out)
    write_log(out, result.log)
    (out / "train_job.json").write_text(json.dumps({**asdict(job), "settings": asdict(job.settings)}, indent=1) + "\n")
    return lm, result
