"""The four training modes of SPEC §3 behind one function, :func:`build_adapter`.

* ``qat``: LoRDBA from the cold start (latents ~ N(0, 0.01²), b = m = 1, a = 0), all steps QAT.
* ``ptq``: an fp16 LoRA (given, or trained for all the steps), converted post-training.
* ``qat-from-lora``: an fp16 LoRA seed (given, or a warm-up LoRA trained for ``lora_warmup`` of
  the steps, as the author-side port does), converted, then QAT for the remaining steps.
* ``scales-only``: the same seed, converted, signs frozen (packed), only ``a, m, b`` train — the
  cheapest on-device update (VeRA/BitDelta-like).

A given LoRA seed's modules trained in full and trained biases are carried into the adapter (its
``modules_to_save`` / ``bias`` / ``task_type`` fill the config's where those are left at their defaults).

A LoRA warm-up is checkpointed like any run and, once done, saved as ``out/lora_seed`` (PEFT
format, written whole or not at all), so an interrupted multi-phase job resumes in the right phase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lordba.config import LoRDBAConfig
from lordba.convert import LoraAdapter, convert_factors, read_lora
from lordba.errors import ConfigError
from lordba.format.atomic import atomic_directory
from lordba.nn.model import LoRDBAModel, get_lordba_model
from lordba.nn.saved import SavedModule
from lordba.nn.targets import find_targets
from lordba.train.checkpoint import clear_checkpoints
from lordba.train.loop import (
    START_OVER,
    TrainResult,
    TrainSettings,
    data_differs,
    data_digest,
    read_log,
    seed_everything,
    settings_differences,
    settings_record,
    train_loop,
)
from lordba.train.lora import add_lora
from lordba.train.tokenize import Batcher, following_run_seed

LATENT_MAGNITUDE = 0.01


def train_lora_seed(
    model: nn.Module,
    config: LoRDBAConfig,
    batcher: Batcher,
    settings: TrainSettings,
    out_dir: Path | None,
    resume: bool,
    progress: bool,
) -> tuple[LoraAdapter, TrainResult]:
    """Train a PEFT LoRA of the adapter's rank on ``model`` and return its factors (model restored).

    The LoRA is on exactly the modules the LoRDBA adapter will have (``target_modules`` less
    ``exclude_modules``, within ``layers_to_transform``): a seed trained on more would leave part of
    what it learnt on modules the adapter drops."""
    seed_dir = out_dir / "lora_seed" if out_dir is not None else None
    if seed_dir is not None and resume and (seed_dir / "adapter_model.safetensors").is_file():
        _check_seed_settings(seed_dir, settings, batcher)
        # the seed's steps in the log, as an uninterrupted run reports them
        return read_lora(seed_dir), TrainResult(log=read_log(out_dir / "lora"), resumed_from=settings.steps)
    targets = find_targets(model, config.target_modules, config.exclude_modules, config)
    peft_model = add_lora(model, config.r, config.alpha, targets, settings.seed)
    result = train_loop(
        peft_model,
        batcher,
        settings,
        out_dir / "lora" if out_dir is not None else None,
        resume=resume,
        progress=progress,
        description="fp16 LoRA seed",
    )
    lora = read_lora(peft_model)
    if seed_dir is not None:  # one directory, moved into place whole: a killed save leaves no half-written seed
        with atomic_directory(seed_dir, overwrite=True) as tmp:
            peft_model.save_pretrained(str(tmp))
            (tmp / SEED_SETTINGS).write_text(json.dumps({**settings_record(settings), "data": data_digest(batcher)}))
    peft_model.unload()
    return lora, result


SEED_SETTINGS = "lordba_seed_settings.json"  # the TrainSettings a LoRA seed trained with, beside it in lora_seed/


def _check_seed_settings(seed_dir: Path, settings: TrainSettings, batcher: Batcher) -> None:
    """Refuse a finished LoRA seed trained with other settings (another ``lora_lr``, warm-up length, seed) or on
    other data: a resume returned it silently, and the adapter was that run's. A seed that records none (an earlier
    version's) is taken.

    Raises:
        ConfigError: naming the seed and the settings that differ, or that the data differ.
    """
    try:
        saved = json.loads((seed_dir / SEED_SETTINGS).read_text())
    except (OSError, ValueError):
        return
    if changed := settings_differences(saved, settings):
        raise ConfigError(
            f"{seed_dir}: the LoRA seed of a run with other settings (TrainSettings that differ: {'; '.join(changed)}; "
            f"lr is lora_lr, steps the warm-up's): resume it with its settings, or {START_OVER}"
        )
    if isinstance(saved, dict) and data_differs(saved.get("data"), data_digest(batcher)):
        raise ConfigError(
            f"{seed_dir}: the LoRA seed of a run on other training data (the batcher's rows, batch size, shuffle "
            f"seed or padding id differ): resume it with its data, or {START_OVER}"
        )


def lora_digest(lora: LoraAdapter) -> str:
    """The sha256 of a LoRA's tensors (each layer's factors and scaling, the tensors it trains in full), by name:
    what identifies the LoRA a QAT phase started from, wherever it was read from."""
    h = hashlib.sha256()
    named = [(f"{p}.A", f.A) for p, f in lora.layers.items()] + [(f"{p}.B", f.B) for p, f in lora.layers.items()]
    for name, t in sorted(named + list(lora.extras.items())):
        data = t.detach().float().cpu().contiguous().numpy().tobytes()
        h.update(f"{name} {tuple(t.shape)} {len(data)}\n".encode() + data)
    h.update(json.dumps(sorted((p, float(f.scaling)) for p, f in lora.layers.items())).encode())
    return h.hexdigest()


def init_from_lora(
    lm: LoRDBAModel, lora: LoraAdapter, adapter_name: str = "default", packed: bool = False
) -> dict[str, float]:
    """Set an adapter's signs and scales from LoRA factors (closed-form init + solver, SPEC §3).

    ``packed=False`` keeps latent form (latents = sign × 0.01) for QAT; ``packed=True`` freezes the
    signs. The tensors the LoRA trains in full (``modules_to_save``, trained biases) are copied into the
    adapter's own (its config must hold them: ``modules_to_save``, ``bias``). Returns ``{module path:
    relative reconstruction error}``. Raises :class:`ConfigError`, before the adapter changes, if the LoRA
    has no factors for one of its modules, factors of other shapes, or tensors trained in full that the
    adapter does not hold (or of other shapes).
    """
    errors = {}
    missing = sorted(set(lm.adapter_modules(adapter_name)) - set(lora.layers))
    if missing:
        raise ConfigError(f"the LoRA seed has no factors for {missing[:3]} (targets differ)")
    for path, adapter in lm.adapter_modules(adapter_name).items():  # before anything changes
        f = lora.layers[path]
        if (f.out_features, f.in_features) != (adapter.out_features, adapter.in_features):
            raise ConfigError(
                f"{lora.source}: module {path!r} of the LoRA seed is (out, in) = {(f.out_features, f.in_features)}, "
                f"the model's layer {(adapter.out_features, adapter.in_features)}: a LoRA of another model"
            )
    saved = _saved_targets(lm, lora, adapter_name)
    lm.unpack_to_latent(adapter_name, LATENT_MAGNITUDE)  # the training form, latent signs, whatever it was
    modules = lm.adapter_modules(adapter_name)
    scale_dtype = lm.peft_config[adapter_name].scale_dtype
    for path, adapter in modules.items():
        f = lora.layers[path]
        res = convert_factors(f.A, f.B, adapter.r, f.scaling, adapter.scaling, scale_dtype=scale_dtype)
        with torch.no_grad():
            adapter.scale_in.copy_(res.scale_in)
            adapter.scale_mid.copy_(res.scale_mid)
            adapter.scale_out.copy_(res.scale_out)
            adapter.latent_A.copy_(res.sign_A * LATENT_MAGNITUDE)
            adapter.latent_B.copy_(res.sign_B * LATENT_MAGNITUDE)
        errors[path] = float(res.rel_error)
    with torch.no_grad():
        for name, target in saved.items():
            value = lora.extras[name].float()
            if isinstance(target, str):  # a trained bias: the adapter holds it minus the base layer's
                value = value - lm.base_model.get_submodule(target).bias.detach().float().cpu()
                target = modules[target].bias_delta
            target.copy_(value.to(target.device, target.dtype))
    if packed:
        lm.freeze_signs(adapter_name)
    return errors


def _saved_targets(lm: LoRDBAModel, lora: LoraAdapter, adapter_name: str) -> dict[str, torch.Tensor | str]:
    """Where each tensor the LoRA trains in full goes in the adapter: ``{name: the adapter's copy}`` for a
    module trained in full, ``{name: layer path}`` for a trained bias of an adapted layer (held as a delta).

    Raises:
        ConfigError: the adapter holds no such tensor (its config lacks the ``modules_to_save`` / ``bias``),
            or one of another shape.
    """
    held: dict[str, torch.Tensor | str] = {}
    for path, module in lm.base_model.named_modules():
        if isinstance(module, SavedModule) and adapter_name in module.lordba_saved:
            copy = module.lordba_saved[adapter_name]
            held.update({f"{path}.{n}": copy.get_parameter(n) for n in module.saved_params[adapter_name]})
    for path, adapter in lm.adapter_modules(adapter_name).items():
        if adapter.bias_delta is not None:
            held[f"{path}.bias"] = path
    missing = sorted(set(lora.extras) - set(held))
    if missing:
        raise ConfigError(
            f"{lora.source}: the LoRA trains {missing[:3]} in full (modules_to_save / bias), which adapter "
            f"{adapter_name!r} does not hold: give its config the same modules_to_save and bias"
        )
    for name in lora.extras:
        shape = (
            held[name].shape
            if isinstance(held[name], torch.Tensor)
            else (lm.adapter_modules(adapter_name)[held[name]].out_features,)
        )
        if tuple(lora.extras[name].shape) != tuple(shape):
            raise ConfigError(
                f"{lora.source}: {name} has shape {tuple(lora.extras[name].shape)}, the adapter's {tuple(shape)}"
            )
    return {name: held[name] for name in lora.extras}


SEED_FIELDS = ("modules_to_save", "bias", "task_type")  # what a LoRA seed trains in full besides its factors
LAYER_FIELDS = ("layers_to_transform", "layers_pattern")  # the seed's layers, taken with its targets


def with_seed_fields(config: LoRDBAConfig, lora: LoraAdapter) -> LoRDBAConfig:
    """``config`` with the given LoRA seed's :data:`SEED_FIELDS` where ``config`` leaves them at their defaults,
    so that the adapter carries the seed's trained head and biases (as :func:`lordba.convert.convert_lora`'s
    does) where its config does not say otherwise; a config without ``target_modules`` takes the seed's modules
    (their names and its :data:`LAYER_FIELDS`, as ``convert_lora`` does), not every linear layer, which a seed on
    some of them has no factors for. Raises :class:`ConfigError` for a combination the config refuses."""
    defaults = LoRDBAConfig()
    fields = SEED_FIELDS + (LAYER_FIELDS if config.target_modules is None else ())
    changes = {k: v for k, v in lora.fields.items() if k in fields and getattr(config, k) == getattr(defaults, k)}
    if config.target_modules is None:
        changes["target_modules"] = sorted({path.rsplit(".", 1)[-1] for path in lora.layers})
    return dataclasses.replace(config, **changes) if changes else config


def check_arguments(config: object, lora_dir: object, lora_warmup: object) -> None:
    """Refuse what :func:`build_adapter` would misread or ignore, before anything trains (a caller that prepares
    an output first calls it before that).

    Raises:
        ConfigError: ``config`` is not a :class:`LoRDBAConfig`, ``lora_dir`` is given in mode ``qat``, or
            ``lora_warmup`` is not a number in [0, 1].
    """
    if not isinstance(config, LoRDBAConfig):
        raise ConfigError(f"build_adapter: config must be a LoRDBAConfig, got {type(config).__name__}")
    if lora_dir is not None and config.mode == "qat":
        raise ConfigError(
            f"build_adapter: lora_dir={str(lora_dir)!r} with mode 'qat', which trains from the cold start and "
            "reads no LoRA: use mode 'qat-from-lora', 'ptq' or 'scales-only' to start from it"
        )
    number = isinstance(lora_warmup, (int, float)) and not isinstance(lora_warmup, bool)
    if not (number and 0 <= lora_warmup <= 1):
        raise ConfigError(f"build_adapter: lora_warmup must be a number in [0, 1], got {lora_warmup!r}")


def build_adapter(
    model: nn.Module,
    config: LoRDBAConfig,
    batcher: Batcher,
    settings: TrainSettings,
    out_dir: Path | None = None,
    lora_dir: str | Path | LoraAdapter | None = None,
    lora_warmup: float = 0.1,
    lora_lr: float = 1e-3,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[LoRDBAModel, TrainResult]:
    """Make a LoRDBA adapter on ``model`` in ``config.mode``; see the module docstring. The LoRA seed
    (all steps in ``ptq``, ``lora_warmup`` of them otherwise) trains at ``lora_lr``, the LoRDBA
    phase at ``settings.lr``: LoRA wants about 10× the learning rate of LoRDBA (docs/training.md).
    Everything random (the adapter's initialisation, the LoRA seed's, the order of a ``Batcher`` built without a
    seed) is seeded from ``settings.seed`` first, so the same inputs give the same adapter, bit for bit.
    ``lora_dir``: a trained PEFT LoRA to start from (a directory, or one :func:`~lordba.convert.read_lora` read), in
    place of the LoRA seed.

    Raises:
        ConfigError: ``config`` is not a :class:`LoRDBAConfig`, ``lora_dir`` is given in mode ``qat`` (which
            reads no LoRA), or ``lora_warmup`` is not a number in [0, 1].
    """
    check_arguments(config, lora_dir, lora_warmup)
    if not isinstance(settings, TrainSettings):
        raise ConfigError(f"build_adapter: settings must be a TrainSettings, got {type(settings).__name__}")
    with following_run_seed(batcher, settings.seed):  # a batcher without a seed: the run's, the LoRA seed's too
        return _build_adapter(
            model, config, batcher, settings, out_dir, lora_dir, lora_warmup, lora_lr, evaluate, resume, progress
        )


def _build_adapter(
    model: nn.Module,
    config: LoRDBAConfig,
    batcher: Batcher,
    settings: TrainSettings,
    out_dir: str | Path | None,
    lora_dir: str | Path | LoraAdapter | None,
    lora_warmup: float,
    lora_lr: float,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    resume: bool,
    progress: bool,
) -> tuple[LoRDBAModel, TrainResult]:
    out_dir = Path(out_dir) if out_dir is not None else None  # a str too
    if out_dir is not None and not resume:  # starting over: no earlier run's seed or steps is resumed after a kill
        clear_checkpoints(out_dir / "checkpoints")
        if (out_dir / "lora_seed").is_dir():
            shutil.rmtree(out_dir / "lora_seed")
    mode = config.mode
    seed_everything(settings.seed)

    def eval_of(m: nn.Module) -> Callable[[], dict[str, float]] | None:
        return (lambda: evaluate(m)) if evaluate is not None else None

    if mode == "qat":
        lm = get_lordba_model(model, config)
        return lm, train_loop(lm, batcher, settings, out_dir, eval_of(lm), resume, progress, "LoRDBA qat")

    origin = None  # a LoRA given: what the QAT phase's checkpoints record of it (a warm-up's: its settings and data)
    if lora_dir is not None:
        lora, seed_result = read_lora(lora_dir), TrainResult()
        config, origin = with_seed_fields(config, lora), lora_digest(lora)
        remaining = settings.steps
    else:
        seed_steps = settings.steps if mode == "ptq" else max(1, math.ceil(lora_warmup * settings.steps))
        seed_settings = dataclasses.replace(settings, steps=seed_steps, lr=lora_lr)  # LoRA's own lr
        lora, seed_result = train_lora_seed(model, config, batcher, seed_settings, out_dir, resume, progress)
        remaining = settings.steps - seed_steps
    seed_everything(settings.seed)  # the same state whether the LoRA seed was trained now or read back
    lm = get_lordba_model(model, config)
    errors = init_from_lora(lm, lora, packed=mode in ("ptq", "scales-only"))
    seed_result.log.append(
        {
            "step": settings.steps - remaining,
            "conversion_mean_rel_error": sum(errors.values()) / max(len(errors), 1),
            "conversion_rel_error": errors,
        }
    )
    if mode == "ptq" or remaining <= 0:
        lm.set_trainable("default", signs=False, scales=False)
        result = TrainResult(
            log=list(seed_result.log), seconds=seed_result.seconds, resumed_from=seed_result.resumed_from
        )
        if evaluate is not None:
            result.log.append({"step": settings.steps, **evaluate(lm)})
        return lm, result
    lm.set_trainable("default", signs=mode == "qat-from-lora", scales=True)
    first = settings.first_batch + (settings.steps - remaining) * settings.grad_accum  # after the warm-up's batches
    phase = dataclasses.replace(settings, steps=remaining, first_batch=first)
    result = train_loop(lm, batcher, phase, out_dir, eval_of(lm), resume, progress, f"LoRDBA {mode}", origin)
    result.log = seed_result.log + [{**e, "step": e["step"] + settings.steps - remaining} for e in result.log]
    # the run's step, as the log counts them (the QAT phase's counts from the end of the warm-up)
    result.resumed_from = (
        result.resumed_from + settings.steps - remaining if result.resumed_from else seed_result.resumed_from
    )
    result.seconds += seed_result.seconds
    return lm, result
