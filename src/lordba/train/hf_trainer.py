"""``transformers.Trainer`` integration: the packed adapter directory in every checkpoint.

The Trainer saves a model that is neither a ``PreTrainedModel`` nor a ``PeftModel`` as
``model.safetensors`` holding ``model.state_dict()`` (``Trainer._save``); it never calls the
model's ``save_pretrained``. For a :class:`~lordba.nn.model.LoRDBAModel` that state dict is the
adapters' *training* state (latent signs in ``qat`` mode, float32 scales): it is what
``trainer.train(resume_from_checkpoint=...)`` reads back, so resuming is exact. It is not the
adapter file. :class:`LoRDBACallback`, passed to an unchanged ``Trainer`` (or any subclass, e.g.
TRL's), adds the packed adapter (``adapter_config.json``, ``lordba_model.safetensors``, model card)
to each ``checkpoint-N`` when the Trainer has saved it, and to ``output_dir`` when training ends,
so ``LoRDBAModel.from_pretrained(base, "out/checkpoint-N")`` works. With ``push_to_hub``, the Trainer
uploads ``output_dir`` (and the checkpoint, per ``hub_strategy``) from inside its save, before ``on_save``:
the callback writes the adapter into both when the push begins, so every upload holds it.

The adapters' inference caches (packed signs, decoded scales) are keyed by the tensors' version
counters, which a fused optimizer (``adamw_torch_fused``, the Trainer's default) does not bump: the
callback clears them after every optimizer step, so evaluation during training and the saved files
see the current weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.training_args import ParallelMode

from lordba.errors import ConfigError
from lordba.nn.adapter_base import AdapterBase
from lordba.nn.model import LoRDBAModel

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


class LoRDBACallback(TrainerCallback, ExportableState):
    """Writes the packed LoRDBA adapter into each Trainer checkpoint and into ``output_dir`` at the
    end of training, in the processes where the Trainer saves (``args.should_save``: the main one, each
    node's with ``save_on_each_node``). ``model.safetensors`` (the training state the Trainer resumes
    from) is left beside it.

    Args:
        selected_adapters: the adapters to write (default: all), a list of names or one name, as
            ``LoRDBAModel.save_pretrained``.
        at_train_end: also write the adapter into ``args.output_dir`` when training ends (the
            directory ``trainer.save_model()`` writes by default).
    """

    def __init__(self, selected_adapters: str | Sequence[str] | None = None, at_train_end: bool = True) -> None:
        one = isinstance(selected_adapters, str)  # one name, as save_pretrained takes it (not its characters)
        self.selected_adapters = (
            [selected_adapters] if one else None if selected_adapters is None else list(selected_adapters)
        )
        self.at_train_end = at_train_end
        self._training = False
        self._written: tuple[Path, int] | None = None  # the checkpoint written at a push, before on_save
        self.trainable_names: list[str] | None = None  # the model's trainable parameters, in the optimizer's order

    def state(self) -> dict:
        """What a checkpoint's ``trainer_state.json`` records of the callback (``stateful_callbacks``): its
        arguments and the names of the trainable parameters, whose optimizer state the Trainer saves by position."""
        args = {"selected_adapters": self.selected_adapters, "at_train_end": self.at_train_end}
        return {"args": args, "attributes": {"trainable_names": self.trainable_names}}

    def _write(self, model: Any, directory: Path, args: TrainingArguments) -> None:
        if not args.should_save:  # where the Trainer saves: the main process (each node's with save_on_each_node)
            return
        _check_model(model)
        _clear_caches(model)
        model.save_pretrained(directory, self.selected_adapters)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Check that the Trainer's model is a ``LoRDBAModel``, and that DDP can train it.

        Raises:
            ConfigError: it is not, or DDP would fail at the first backward (re-entrant gradient checkpointing
                without ``ddp_find_unused_parameters=False``).
        """
        model = kwargs.get("model")
        _check_model(model)
        _check_ddp_checkpointing(model, args)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        _check_resumed_parameters(state, names)
        self.trainable_names = names
        self._training = True
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """After an optimizer step: drop the adapters' inference caches (see the module's docstring)."""
        _clear_caches(kwargs.get("model"))
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """After the Trainer saved ``checkpoint-<global_step>``: add the packed adapter to it.

        Raises:
            ConfigError: the Trainer's model is not a ``LoRDBAModel``.
        """
        directory = _checkpoint(args, state)
        if directory is None:
            warnings.warn(
                f"LoRDBACallback: no checkpoint of step {state.global_step} to add the adapter to", stacklevel=2
            )
        elif self._written != (directory, state.global_step):
            self._write(kwargs.get("model"), directory, args)
        return control

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Before the Trainer uploads ``args.output_dir``: write the packed adapter into it and, during training
        (a push from the checkpoint just saved, before ``on_save``), into that checkpoint.

        Raises:
            ConfigError: the Trainer's model is not a ``LoRDBAModel``.
        """
        directory = _checkpoint(args, state) if self._training else None
        if directory is not None:
            self._write(kwargs.get("model"), directory, args)
            self._written = (directory, state.global_step)
        self._write(kwargs.get("model"), Path(args.output_dir), args)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """When training ends: write the packed adapter into ``args.output_dir``.

        Raises:
            ConfigError: the Trainer's model is not a ``LoRDBAModel``.
        """
        self._training = False
        if self.at_train_end:
            self._write(kwargs.get("model"), Path(args.output_dir), args)
        return control


def _checkpoint(args: TrainingArguments, state: TrainerState) -> Path | None:
    """The Trainer's ``checkpoint-<global_step>`` folder (the newest of the trials' in a hyper-parameter
    search: ``run-<trial>/``), or None."""
    directory = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
    if directory.is_dir():
        return directory
    found = sorted(Path(args.output_dir).glob(f"*/{CHECKPOINT_PREFIX}-{state.global_step}"))
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _check_model(model: Any) -> None:
    if not isinstance(model, LoRDBAModel):
        raise ConfigError(f"LoRDBACallback: the Trainer's model is a {type(model).__name__}, not a LoRDBAModel")


def _check_ddp_checkpointing(model: Any, args: TrainingArguments) -> None:
    """Refuse DDP with re-entrant gradient checkpointing and ``find_unused_parameters``: the Trainer passes
    ``find_unused_parameters=True`` to DDP for a model that is not a ``PreTrainedModel`` unless
    ``ddp_find_unused_parameters`` is set, and DDP then marks each checkpointed parameter ready twice ("Expected to
    mark a variable ready only once", at the first backward)."""
    ddp = (
        args.world_size > 1 and args.parallel_mode == ParallelMode.DISTRIBUTED and not args.fsdp and not args.deepspeed
    )
    if ddp and args.ddp_find_unused_parameters is not False and _reentrant_checkpointing(model):
        raise ConfigError(
            "LoRDBACallback: DDP with re-entrant gradient checkpointing needs "
            "TrainingArguments(ddp_find_unused_parameters=False) (the Trainer passes find_unused_parameters=True to "
            "DDP for a model that is not a PreTrainedModel, and DDP fails at the first backward): set it, or use "
            "non-reentrant checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False})"
        )


def _check_resumed_parameters(state: TrainerState, names: list[str]) -> None:
    """Refuse a resume whose checkpoint trained other parameters than ``names`` (another adapter's, other target
    modules): the Trainer loads ``model.safetensors`` leniently (a logged warning for the missing and unexpected keys)
    and the optimizer state by position, so the model's adapters would start over with another tensor's moments.
    A checkpoint that does not record them (written without the callback) is not compared.

    Raises:
        ConfigError: naming the first parameters that differ.
    """
    saved = getattr(state, "stateful_callbacks", None) or {}
    saved = saved.get(LoRDBACallback.__name__) if isinstance(saved, dict) else None
    saved = (saved[-1] if isinstance(saved, list) and saved else saved) or {}
    recorded = saved.get("attributes", {}).get("trainable_names") if isinstance(saved, dict) else None
    if state.global_step > 0 and isinstance(recorded, list) and recorded != names:
        missing, extra = [n for n in names if n not in recorded], [n for n in recorded if n not in names]
        differ = f"this model's only: {missing[:3]}, the checkpoint's only: {extra[:3]}"
        differ = differ if missing or extra else "in another order"
        raise ConfigError(
            f"LoRDBACallback: the checkpoint resumed from (step {state.global_step}) trained other parameters than "
            f"this model's trainable ones ({differ}); the Trainer would restore its optimizer state by position into "
            "other tensors: resume with the adapters and target modules it was trained with, or start over"
        )


def _reentrant_checkpointing(model: Any) -> bool:
    """Whether a layer of ``model`` recomputes its forward with re-entrant checkpointing (transformers'
    ``_gradient_checkpointing_func``; torch's checkpoint is re-entrant unless ``use_reentrant=False``)."""
    for module in model.modules() if isinstance(model, nn.Module) else ():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and func is not None:
            return getattr(func, "keywords", {}).get("use_reentrant") is not False
    return False


def _clear_caches(model: Any) -> None:
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, AdapterBase):
                module.clear_cache()
