"""The training loop shared by every method (LoRDBA modes and the LoRA baselines).

AdamW on the trainable parameters only (frozen ones get no optimizer state), linear warm-up and
decay, gradient clipping, held-out evaluation, crash-safe checkpoints with exact resume (batch k
depends only on the seed and k), and a stop with a clear message on a non-finite loss that keeps
the last good checkpoint. A progress bar shows the loss and the ETA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lordba._util.jsonio import parse_json, safe_repr
from lordba.errors import ConfigError, LoRDBAError, TrainingError
from lordba.format.atomic import atomic_write_bytes
from lordba.train.checkpoint import (
    Checkpoint,
    clear_checkpoints,
    latest_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from lordba.train.tokenize import Batcher, following_run_seed


@dataclass
class TrainSettings:
    """Optimisation settings of one run. ``lr`` defaults to LoRDBA's measured best, 1e-4
    (docs/training.md; a LoRA wants about 10x more). ``bf16`` runs forward passes under
    ``torch.autocast`` in bfloat16 on the model's device (parameters and optimizer stay float32)."""

    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    first_batch: int = 0  # the batch step 0 reads: a second phase continues the data after the first's

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ConfigError: naming the first field out of range or of the wrong type.
        """
        for name, low in (("steps", 0), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0),
                          ("checkpoint_every", 0), ("keep_checkpoints", 1), ("first_batch", 0)):  # fmt: skip
            _check_int(name, getattr(self, name), low)
        _check_int("seed", self.seed, None)
        if not -(2**63) <= self.seed < 2**64:  # what torch's generators take (seed_everything)
            raise ConfigError(f"TrainSettings.seed must be in [-2**63, 2**64) (torch's seeds), got {self.seed}")
        _check_number("lr", self.lr, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        _check_number("warmup_ratio", self.warmup_ratio, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _check_number("weight_decay", self.weight_decay, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        _check_number("max_grad_norm", self.max_grad_norm, lambda v: v > 0, "a number > 0 (inf: no clipping)")
        for name in ("gradient_checkpointing", "bf16"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"TrainSettings.{name} must be True or False, got {safe_repr(getattr(self, name))}")


def _check_int(name: str, value: object, low: int | None) -> None:
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or (low is not None and value < low):
        what = "an integer" if low is None else f"an integer >= {low}"
        raise ConfigError(f"TrainSettings.{name} must be {what}, got {safe_repr(value)}")


def _check_number(name: str, value: object, ok: Callable[[float], bool], what: str) -> None:
    try:
        good = isinstance(value, numbers.Real) and not isinstance(value, bool) and ok(float(value))
    except OverflowError:  # an int too large for a float
        good = False
    if not good:
        raise ConfigError(f"TrainSettings.{name} must be {what}, got {safe_repr(value)}")


DEVICES = ("cpu", "cuda", "mps")


def resolve_device(name: str | None = None) -> str:
    """``name`` if this machine has it, or the best available device for ``None`` (cuda, then mps, then cpu).

    Raises:
        ConfigError: an unknown device name, or one this machine does not have.
    """
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }
    if name is None:
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
    if not available[name]:
        raise ConfigError(
            f"device {name!r} is not available on this machine (available: {[d for d in DEVICES if available[d]]})"
        )
    return name


def seed_everything(seed: int) -> None:
    """Seed every random generator a run draws from (Python, NumPy, torch on every device), so that
    what is built after it (adapter initialisation, a LoRA warm-up, data) is the same run to run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA and MPS generators


@dataclass
class TrainResult:
    """What a run of :func:`train_loop` returns: its log (``{"step", "loss", "lr"}`` entries and eval
    entries), wall seconds, the step it resumed from, and a peak resident memory in bytes for callers
    that measure it."""

    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    peak_rss_bytes: int = 0


def _schedule(settings: TrainSettings) -> Callable[[int], float]:
    warm = max(1, int(settings.warmup_ratio * settings.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warm))

    return factor


def train_loop(
    model: torch.nn.Module,
    batcher: Batcher,
    settings: TrainSettings,
    out_dir: Path | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
    description: str = "training",
    origin: str | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters; see the module docstring. Writes
    ``out_dir/train_log.json`` and ``out_dir/checkpoints/step-*`` when ``out_dir`` is given: resumed from the
    newest intact one (``resume``), else started over (an earlier run's checkpoints there are removed first,
    so that neither pruning nor a later resume takes its newer steps for this run's). ``out_dir`` may be a
    ``str``; ``settings`` that are not :class:`TrainSettings` are a :class:`ConfigError`. A :class:`Batcher` built
    without a seed shuffles with ``settings.seed``, the seed of everything random in the run. ``origin``: a digest of
    what the run starts from that neither its settings nor its adapters' configs show (the LoRA :func:`build_adapter`
    converted): the checkpoints record it, and those of a run that started from another are refused."""
    if not isinstance(settings, TrainSettings):
        raise ConfigError(f"train_loop: settings must be a TrainSettings, got {type(settings).__name__}")
    with following_run_seed(batcher, settings.seed):
        return _train_loop(model, batcher, settings, out_dir, evaluate, resume, progress, description, origin)


def _train_loop(
    model: torch.nn.Module,
    batcher: Batcher,
    settings: TrainSettings,
    out_dir: Path | None,
    evaluate: Callable[[], dict[str, float]] | None,
    resume: bool,
    progress: bool,
    description: str,
    origin: str | None,
) -> TrainResult:
    out_dir = Path(out_dir) if out_dir is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    seed_everything(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    factor = _schedule(settings)
    result = TrainResult()
    start = 0
    run, check = _same_run(settings, batcher, adapter_configs(model), origin)
    ckpt_dir = out_dir / "checkpoints" if out_dir is not None else None
    if ckpt_dir is not None and resume and (meta := resume_checkpoint(ckpt_dir, model, optimizer, check)) is not None:
        start = result.resumed_from = meta["step"]
        result.log = meta["extra"].get("log", [])
    elif ckpt_dir is not None and not resume:
        clear_checkpoints(ckpt_dir)  # starting over: an earlier run's steps must not outlive this run's own
    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    model.train()
    device = params[0].device
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, settings.steps), desc=description, initial=start, total=settings.steps, disable=not progress
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor(step)
        total = 0.0
        first = settings.first_batch + step * settings.grad_accum
        batches = [batcher.batch(k) for k in range(first, first + settings.grad_accum)]
        for batch, weight in zip(batches, _micro_weights(batches)):
            if weight == 0.0:  # nothing to score in this micro-batch: it adds nothing to the step's mean
                continue
            batch = {name: t.to(device) for name, t in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                loss = model(**batch).loss.float() * weight
            if not torch.isfinite(loss):
                _stop_non_finite(step, settings, ckpt_dir)
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        if not torch.isfinite(norm):
            _stop_non_finite(step, settings, ckpt_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.log.append({"step": step + 1, "loss": total, "lr": settings.lr * factor(step)})
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        if evaluate is not None and settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
            result.log.append({"step": done, **evaluate()})
            model.train()
        if ckpt_dir is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0:
            extra = {"log": result.log, **run}
            save_checkpoint(ckpt_dir, done, model, optimizer, extra, settings.keep_checkpoints)
    bar.close()
    if evaluate is not None:
        result.log.append({"step": settings.steps, **evaluate()})
    result.seconds = time.perf_counter() - t0
    model.eval()
    if out_dir is not None:
        write_log(out_dir, result.log)
    return result


# what a resumed run may change: how the run is watched and checkpointed, not what it trains (gradient_checkpointing
# recomputes the same activations, the same adapter byte for byte: turned on to resume a run that ran out of memory)
RUN_ONLY_SETTINGS = ("eval_every", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")


def settings_record(settings: TrainSettings) -> dict:
    """``settings`` as a checkpoint records them: JSON numbers (a numpy number as the int or float it is)."""
    return {
        k: v if isinstance(v, bool) else int(v) if isinstance(v, numbers.Integral) else float(v)
        for k, v in dataclasses.asdict(settings).items()
    }


def settings_differences(saved: object, settings: TrainSettings) -> list[str]:
    """``name: recorded -> now`` for each setting of a recorded run (``saved``, a :func:`settings_record`) that
    ``settings`` change, but :data:`RUN_ONLY_SETTINGS`; a record of an earlier version (none, or without a field) is
    not compared there."""
    saved, record = saved if isinstance(saved, dict) else {}, settings_record(settings)
    compared = (k for k in record if k in saved and k not in RUN_ONLY_SETTINGS)
    return [f"{k}: {saved[k]!r} -> {record[k]!r}" for k in compared if saved[k] != record[k]]


START_OVER = "start over (resume=False; lordba train --no-resume) or in another out_dir"  # a refused resume's way out


def data_digest(batcher: object) -> str | None:
    """The digest of ``batcher``'s data (:meth:`Batcher.digest`), or None for a batcher that has none."""
    digest = getattr(batcher, "digest", None)
    return digest() if callable(digest) else None


def adapter_configs(model: torch.nn.Module) -> dict[str, dict]:
    """The adapter configs of ``model`` (a ``LoRDBAModel``'s ``peft_config``; ``{}`` for another model) as a
    checkpoint records them, but the base's name (the model folder may move between runs)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    return {
        name: {
            k: v
            for k, v in json.loads(json.dumps(cfg.to_dict(), default=_jsonable)).items()
            if k != "base_model_name_or_path"
        }
        for name, cfg in configs.items()
        if hasattr(cfg, "to_dict")
    }


def _jsonable(value: object) -> object:
    """A config value JSON has no type for: a set of module names as its sorted list, anything else as text."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def _config_differences(saved: object, now: dict[str, dict]) -> list[str]:
    """``adapter.field: recorded -> now`` for each adapter config field of a recorded run (``saved``; none in a record
    of an earlier version) that differs from ``now``'s."""
    if not isinstance(saved, dict) or not now:
        return []
    if set(saved) != set(now):
        return [f"adapters: {sorted(saved)!r} -> {sorted(now)!r}"]
    return [
        f"{name}.{k}: {saved[name].get(k)!r} -> {cfg.get(k)!r}"
        for name, cfg in now.items()
        if isinstance(saved[name], dict)
        for k in sorted(set(cfg) | set(saved[name]))
        if saved[name].get(k) != cfg.get(k)
    ]


def _same_run(
    settings: TrainSettings, batcher: object, configs: dict[str, dict], origin: str | None = None
) -> tuple[dict, Callable[[Checkpoint], None]]:
    """What the checkpoints record of the run (``settings``, ``data``: the digest of the batches, ``adapters``:
    ``configs``, ``origin``: see :func:`train_loop`), computed once for all of them, and a check that refuses a
    checkpoint of a run with other settings, on other data or of adapters configured otherwise (``configs``:
    :func:`adapter_configs`): resuming it continued that run's steps under these settings (or on these batches,
    or into another alpha, scale dtype, ...), or returned its finished adapter for a run that asked for another."""
    data = data_digest(batcher)

    def check(ckpt: Checkpoint) -> None:
        if changed := _config_differences(ckpt.meta["extra"].get("adapters"), configs):
            raise ConfigError(
                f"{ckpt.path}: a checkpoint of adapters configured otherwise (LoRDBAConfig fields that differ: "
                f"{'; '.join(changed[:4])}): resume it with its config, or {START_OVER}"
            )
        if changed := settings_differences(ckpt.meta["extra"].get("settings"), settings):
            raise ConfigError(
                f"{ckpt.path}: a checkpoint of a run with other settings (TrainSettings that differ: "
                f"{'; '.join(changed)}): resume it with its settings, or {START_OVER}"
            )
        if data_differs(ckpt.meta["extra"].get("data"), data):
            raise ConfigError(
                f"{ckpt.path}: a checkpoint of a run on other training data (the batcher's rows, batch size, "
                f"shuffle seed or padding id differ): resume it with its data, or {START_OVER}"
            )
        if data_differs(ckpt.meta["extra"].get("origin"), origin):
            raise ConfigError(
                f"{ckpt.path}: a checkpoint of a run that started from another LoRA (build_adapter's lora_dir, "
                f"lordba train --lora: its tensors differ): resume it from that LoRA, or {START_OVER}"
            )

    return {"settings": settings_record(settings), "data": data, "adapters": configs, "origin": origin}, check


def data_differs(saved: object, data: str | None) -> bool:
    """Whether a recorded data digest (``saved``; none in a record of an earlier version) is not ``data``'s."""
    return isinstance(saved, str) and data is not None and saved != data


def _micro_weights(batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """The weight of each micro-batch's mean loss in its optimizer step: its share of the step's scored
    tokens (labels other than -100 after the causal shift), so that the step's loss is the mean over all of
    its tokens, as one batch of them all would give (a plain ``1 / grad_accum`` weighs a token of a
    micro-batch with few scored tokens more than one of a micro-batch with many). Batches without
    ``labels``, or a step with no scored token at all, are weighed equally."""
    counts = [int((b["labels"][..., 1:] != -100).sum()) if "labels" in b else -1 for b in batches]
    total = sum(counts)
    if min(counts) < 0 or total == 0:
        return [1.0 / len(batches)] * len(batches)
    return [n / total for n in counts]


def _stop_non_finite(step: int, settings: TrainSettings, ckpt_dir: Path | None) -> None:
    last = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise TrainingError(
        f"non-finite loss or gradient at step {step + 1} (learning rate {settings.lr:g} too high?); "
        f"training stopped without applying that update; {kept}"
    )


LOG_NAME = "train_log.json"


def write_log(out_dir: Path, log: list[dict]) -> None:
    """``out_dir/train_log.json``: ``[{"step", "loss", "lr"}, ..., {"step", "eval_loss", "metric"}]``."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in e.items()} for e in log]
    atomic_write_bytes(Path(out_dir) / LOG_NAME, (json.dumps(clean, indent=1) + "\n").encode())


def read_log(out_dir: Path) -> list[dict]:
    """The log :func:`write_log` wrote in ``out_dir`` (a finished run's steps); ``[]`` if it is missing or
    unreadable (a run of an older version)."""
    path = Path(out_dir) / LOG_NAME
    try:
        log = parse_json(path.read_bytes(), str(path))
    except (OSError, LoRDBAError):
        return []
    return log if isinstance(log, list) and all(isinstance(e, dict) for e in log) else []
