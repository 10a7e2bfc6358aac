"""One training job, end to end: what ``lordba train`` runs and the demo reuses.

Loads the base model (a local transformers folder or the embedded default), moves it to the
device, quantizes it, builds the data, trains in one of the four modes (SPEC §3), evaluates on a
held-out set (``eval_data``, or a split of the data) and saves the packed adapter (SPEC §6) plus
``train_log.json``. Everything random is seeded from ``settings.seed`` before it is drawn, so the
same job gives the same adapter file, byte for byte, on the same machine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lordba.config import MODES, LoRDBAConfig
from lordba.convert import default_config, read_lora
from lordba.errors import ConfigError, DataError, LoRDBAError
from lordba.format.atomic import atomic_write_bytes
from lordba.quant.cache import quantize_model_cached
from lordba.quant.quantize import DEFAULT_BACKEND
from lordba.train.evaluate import evaluate
from lordba.train.loop import RUN_ONLY_SETTINGS, TrainResult, TrainSettings, resolve_device, seed_everything, write_log
from lordba.train.modes import build_adapter, check_arguments
from lordba.train.records import Example, read_jsonl
from lordba.train.tokenize import TRAIN_ON, Batcher, encode_examples
from lordba_lab.assets import load_model_and_tokenizer
from lordba_lab.assets.models import DEFAULT_MODEL, MODELS, resolve_model_path
from lordba_lab.tasks import get_task

# Files that make a folder a tokenizer (one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What a job leaves in --out to resume from: its checkpoints, the LoRA seed's checkpoints, the finished seed.
RESUME_STATE = ("checkpoints", "lora", "lora_seed")
# Options that do not change what is trained: a resumed job may change them.
RUN_ONLY = ("out", "resume", "progress", "device")


@dataclass
class TrainJob:
    """Everything one run needs; the CLI's options map onto these fields. ``device`` None: the best
    available (cuda, then mps, then cpu). ``eval_data``: a held-out JSONL file instead of a split of
    ``data``. ``train_on``: one of :data:`~lordba.train.tokenize.TRAIN_ON`. ``r`` / ``alpha`` None: with ``lora``,
    the LoRA's ranks (per module) and its ``lora_alpha``, as ``lordba convert`` takes them; else 16 and 32.
    Invalid values raise :class:`~lordba.errors.ConfigError` at construction."""

    out: str
    model: str | None = None
    data: str = "arithmetic"
    mode: str = "qat"
    r: int | None = None
    alpha: float | None = None
    scale_dtype: str = "int8"  # float16's held-out loss at 3/4 of its bytes (docs/format.md)
    target_modules: list[str] | str | None = None
    quant: str = DEFAULT_BACKEND
    bits: int = 4
    group_size: int = 64
    lora: str | None = None
    lora_warmup: float = 0.1
    lora_lr: float = 1e-3
    train_size: int = 2000
    eval_size: int = 100
    max_length: int = 256
    eval_data: str | None = None
    train_on: str = "last-assistant-turn"
    device: str | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.lora_warmup < 1.0:
            raise ConfigError(f"lora_warmup must be in (0, 1), got {self.lora_warmup}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        LoRDBAConfig(
            **_rank(self, None),
            scale_dtype=self.scale_dtype,
            target_modules=self.target_modules,
        )
        check_model_source(self.model)


def check_model_source(model: str | None) -> None:
    """Refuse a ``--model`` that is not a loadable local transformers folder, naming the path.

    ``None`` and an embedded model's name (:data:`~lordba_lab.assets.models.MODELS`: ``smollm2-135m-instruct``,
    ``gemma-3-270m``) are fine (fetched on demand, as the job loads them); a name like ``user/repo``
    that is no local path is left to transformers (the hub).

    Raises:
        ConfigError: the path does not exist, is not a folder, or lacks a config or a tokenizer.
    """
    if model is None or model in MODELS:
        return
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1
    if not path.exists():
        if looks_local:
            names = ", ".join(sorted(MODELS))
            raise ConfigError(
                f"--model {model}: no such folder (a local transformers model folder is expected), nor an embedded "
                f"model's name ({names}; without --model, the default: {DEFAULT_MODEL})"
            )
        return
    if not path.is_dir():
        raise ConfigError(f"--model {model}: not a folder (a local transformers model folder is expected)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model}: no config.json in this folder (not a transformers model)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--model {model}: no tokenizer in this folder (expected one of {list(TOKENIZER_FILES)})")


def load_data(spec: str, tokenizer, train_size: int, eval_size: int, seed: int, eval_data: str | None = None):  # noqa: ANN001, ANN201
    """``(train examples, eval examples, task or None)`` for a built-in task name or a JSONL file.

    With ``eval_data`` (a JSONL file) all of a file's records train and ``eval_data``'s are held
    out; otherwise the file's last ``eval_size`` records, at most 10%, are held out.
    """
    held = read_jsonl(eval_data) if eval_data is not None else None
    if spec.endswith(".jsonl") or Path(spec).is_file():
        rows: list[Example] = read_jsonl(spec)
        if held is not None:
            return rows, held, None
        n_eval = min(eval_size, max(1, len(rows) // 10)) if len(rows) > 1 else 0
        return rows[: len(rows) - n_eval], rows[len(rows) - n_eval :], None
    task = get_task(spec)
    return task.examples("train", train_size, seed), held or task.examples("eval", eval_size, seed), task


def run_job(job: TrainJob) -> tuple[object, TrainResult]:
    """Run ``job``; returns the trained LoRDBA model and the training result.

    Raises:
        LoRDBAError: bad data, model folder, device or options (each naming what is wrong).
    """
    out = Path(job.out)
    device = resolve_device(job.device)
    seed_everything(job.settings.seed)
    model, tok = _load_model(job, device)
    train_ex, eval_ex, task = load_data(job.data, tok, job.train_size, job.eval_size, job.settings.seed, job.eval_data)
    rows = encode_examples(tok, train_ex, job.max_length, job.train_on)
    _check_heldout(tok, eval_ex, job)
    batcher = Batcher(rows, job.settings.batch_size, seed=job.settings.seed, pad_id=tok.pad_token_id or 0)
    lora = read_lora(job.lora) if job.lora is not None and job.mode != "qat" else None  # a --lora unread is refused
    config = LoRDBAConfig(
        **_rank(job, lora),
        scale_dtype=job.scale_dtype,
        target_modules=job.target_modules,
        mode=job.mode,
        base_model_name_or_path=job.model or model.config._name_or_path,
    )

    def run_eval(m) -> dict[str, float]:  # noqa: ANN001
        return evaluate(
            m,
            tok,
            eval_ex,
            task.score if task else None,
            task.max_new_tokens if task else 0,
            job.max_length,
            train_on=job.train_on,
        )

    check_arguments(config, job.lora, job.lora_warmup)  # what build_adapter refuses, before --out is touched
    out.mkdir(parents=True, exist_ok=True)
    prepare_out(job, out)
    lm, result = build_adapter(
        model,
        config,
        batcher,
        job.settings,
        out_dir=out,
        lora_dir=lora,
        lora_warmup=job.lora_warmup,
        lora_lr=job.lora_lr,
        evaluate=run_eval if eval_ex else None,
        resume=job.resume,
        progress=job.progress,
    )
    lm.save_pretrained(out)
    write_log(out, result.log)
    _write_record(job, out)
    return lm, result


def _rank(job: TrainJob, lora: object | None) -> dict:
    """``r``, ``alpha`` and ``rank_pattern`` of the job's adapter: those given, else the LoRA's (as
    :func:`~lordba.convert.default_config` has them), else 16 and 32."""
    if lora is None:
        return {"r": 16 if job.r is None else job.r, "alpha": 32.0 if job.alpha is None else job.alpha}
    of_lora = default_config(lora)
    if job.r is None:
        ranks = {"r": of_lora.r, "rank_pattern": dict(of_lora.rank_pattern)}
    else:
        ranks = {"r": job.r}
    return {**ranks, "alpha": of_lora.alpha if job.alpha is None else job.alpha}


def _check_heldout(tokenizer, examples: list[Example], job: TrainJob) -> None:  # noqa: ANN001
    """Encode the held-out examples as the evaluation will, before anything trains: one it cannot encode (a
    prompt longer than ``max_length``, a conversation the chat template refuses) otherwise stopped the job at
    its first evaluation, after the training steps and before the adapter was saved (and again on every resume).

    Raises:
        DataError: naming the held-out data and the example.
    """
    try:
        encode_examples(tokenizer, examples, job.max_length, job.train_on)
    except DataError as err:
        where = job.eval_data or f"the held-out part of {job.data}"
        raise DataError(f"held-out data ({where}): {err}") from None


def _record(job: TrainJob) -> dict:
    """``train_job.json``'s content: every option of ``job`` (``settings`` as a dict), as JSON gives it back;
    ``r`` / ``alpha`` left unset without a LoRA as their defaults (16, 32), as records before they could be unset
    hold them."""
    given = _rank(job, None) if job.lora is None else {}
    return json.loads(json.dumps({**asdict(job), **given, "settings": asdict(job.settings)}))


def _write_record(job: TrainJob, out: Path) -> None:
    atomic_write_bytes(out / "train_job.json", (json.dumps(_record(job), indent=1) + "\n").encode())


def _differences(earlier: dict, now: dict) -> list[str]:
    """The options that change what is trained and differ between two records (``name: earlier -> now``);
    an option one of them lacks (a record written before it existed) is not compared."""
    pairs = [(k, earlier.get(k), v) for k, v in now.items() if k not in RUN_ONLY and k != "settings" and k in earlier]
    settings = earlier.get("settings") if isinstance(earlier.get("settings"), dict) else {}
    pairs += [(k, settings[k], v) for k, v in now["settings"].items() if k not in RUN_ONLY_SETTINGS and k in settings]
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in pairs if a != b]


def prepare_out(job: TrainJob, out: Path) -> None:
    """Make ``out`` ready for ``job`` and record the job there (``train_job.json``) before it trains.

    With ``resume``, checkpoints in ``out`` are only resumed from when the job that wrote them (its
    ``train_job.json``) had the same options, but for those that do not change what is trained
    (:data:`RUN_ONLY`, :data:`RUN_ONLY_SETTINGS`): another job's state would be continued silently with
    this one's options. Without ``resume``, the earlier job's state (:data:`RESUME_STATE`) is removed:
    its checkpoints would outlive this job's (the newest steps are kept) and be resumed later.

    Raises:
        ConfigError: ``out`` holds the state of a job with other options, naming them.
    """
    state = [out / name for name in RESUME_STATE if (out / name).exists()]
    if job.resume and state:
        try:
            earlier = json.loads((out / "train_job.json").read_text())
        except (OSError, ValueError):
            earlier = None  # no record (a job of an older version): resumed as before
        if isinstance(earlier, dict) and (changed := _differences(earlier, _record(job))):
            raise ConfigError(
                f"--out {out} holds the checkpoints of another training job (options that differ: "
                f"{'; '.join(changed)}): run that job's command again to resume it, or start this one over "
                "(--no-resume, resume=False) or in another --out"
            )
    if not job.resume:
        for path in state:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    _write_record(job, out)


def _load_model(job: TrainJob, device: str):
    """The base model on ``device``, quantized, and its tokenizer; a folder transformers cannot read
    is a :class:`ConfigError` naming it."""
    try:
        model, tok = load_model_and_tokenizer(job.model)
    except LoRDBAError:
        raise
    except (OSError, ValueError) as err:  # transformers' "not a model folder / unknown model type"
        raise ConfigError(f"--model {job.model}: cannot be loaded by transformers ({err})") from None
    model.to(device)
    quantize_model_cached(model, resolve_model_path(job.model), job.quant, job.bits, job.group_size, job.progress)
    return model, tok
