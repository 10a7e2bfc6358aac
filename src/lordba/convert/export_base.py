"""The base model of a saved adapter, for :func:`~lordba.convert.export.export_lora` from a directory or an
``AdapterState``: what the export of a live ``LoRDBAModel`` reads off its model — each adapted layer's type (a
GPT-2 ``Conv1D``: ``fan_in_fan_out``), whether the model can generate (its default ``task_type``) and the base
tensors of the modules PEFT's ``modules_to_save`` suffix rule wraps besides the saved ones (DistilBERT's
``pre_classifier``). The base is named by ``base=`` (``lordba export-lora --base``) or by the adapter config's
``base_model_name_or_path``: a folder, or a hub id in the local HF cache (nothing is downloaded). Its skeleton is
built on the meta device from its ``config.json`` (no weights read); the few base tensors the export carries are
read from its checkpoint alone."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lordba._util.models import registered_model
from lordba.errors import ConfigError, LoRDBAError
from lordba.format.adapter import AdapterState

# PEFT's task types and the transformers auto class each loads its base with (peft.auto's AutoPeftModelFor...).
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
CHECKPOINT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class BaseSkeleton:
    """A base model built on the meta device (``root``: module types and paths, no values) and the folder holding
    its ``config.json`` and checkpoint (``folder``), named ``name``."""

    root: nn.Module
    folder: Path
    name: str

    @functools.cached_property
    def checkpoint_keys(self) -> dict[str, Path]:
        """Every tensor name of the base's checkpoint and the file holding it (read once: :func:`_checkpoint_keys`)."""
        return _checkpoint_keys(self.folder)

    def tensors(self, module: str) -> dict[str, torch.Tensor] | None:
        """The checkpoint's tensors of the module at path ``module`` under their names in its ``state_dict``, or
        ``None`` where the checkpoint lacks one of them (a head the checkpoint's model had none of)."""
        from safetensors import SafetensorError

        prefix = getattr(self.root, "base_model_prefix", "") or ""
        out = {}
        try:
            stored = self.checkpoint_keys
            for name in self.root.get_submodule(module).state_dict():
                key = f"{module}.{name}"
                # saved from the model itself, from its base model (no prefix) or from a model with a head (with it)
                tries = [key, key.removeprefix(f"{prefix}.") if key.startswith(f"{prefix}.") else f"{prefix}.{key}"]
                found = next((k for k in tries if k in stored), None)
                if found is None:
                    return None
                out[name] = _read(stored[found], found)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):  # an unreadable checkpoint
            return None
        return out


def find_base(adapter: AdapterState, base: str | Path | None) -> tuple[BaseSkeleton | None, str]:
    """The skeleton of the base ``base`` names (else the adapter config's ``base_model_name_or_path``) and ``""``, or
    ``None`` and why there is none. :class:`ConfigError` where ``base`` is given and cannot be used (an explicit
    request is not left to a warning)."""
    name = str(base) if base is not None else adapter.config.base_model_name_or_path
    if not name:
        return None, "its config has no base_model_name_or_path"
    try:
        return _skeleton(name, adapter), ""
    except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError, RuntimeError, LoRDBAError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if base is not None:
            raise ConfigError(f"export_lora: base {name!r} cannot be used: {reason}") from None
        return None, f"its base_model_name_or_path {name!r} cannot be used ({reason})"


def _skeleton(name: str, adapter: AdapterState) -> BaseSkeleton:
    import transformers
    from transformers.utils import cached_file

    registered = registered_model(name)  # a name the lab registers (its embedded models), else transformers'
    config_file = (
        registered[0] / "config.json"
        if registered is not None
        else cached_file(name, "config.json", local_files_only=True)  # a folder's, or the local HF cache's
    )
    if config_file is None:
        raise OSError(f"no config.json for {name!r} in a local folder, the HF cache or the registered models")
    folder = Path(config_file).parent
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    classes = [TASK_CLASSES.get(adapter.config.task_type or ""), *(config.architectures or ()), "AutoModel"]
    paths = [*adapter.modules, *(name.rpartition(".")[0] for name in adapter.extras)]
    missing = ""
    for class_name in dict.fromkeys(c for c in classes if c):
        cls = getattr(transformers, class_name, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                root = cls.from_config(config) if class_name.startswith("Auto") else cls(config)
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            continue  # a class for another kind of model (AutoModelForCausalLM of an encoder)
        names = dict(root.named_modules())
        lacking = next((p for p in paths if p not in names), "")
        if not lacking:  # the model the adapter was trained on: every adapted and saved module is in it
            return BaseSkeleton(root, folder, name)
        missing = missing or lacking  # the first class's, the adapter's own (AutoModel's paths lack its prefix)
    raise ValueError(f"no model built from {folder / 'config.json'} has the adapter's module {missing or paths[0]!r}")


def _checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint in ``folder`` and the file holding it (a sharded one's index, else its
    single file); empty where there is none."""
    for index in CHECKPOINT_INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return {key: folder / file for key, file in weight_map.items()}
    for file in CHECKPOINT_FILES:
        if (folder / file).is_file():
            return dict.fromkeys(_file_keys(folder / file), folder / file)
    return {}


def _file_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, "pt", device="cpu") as f:
            return list(f.keys())
    return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))


def _read(file: Path, key: str) -> torch.Tensor:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, "pt", device="cpu") as f:
            return f.get_tensor(key).contiguous()
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)[key].contiguous()
