"""The files of a PEFT LoRA adapter directory (:mod:`lordba.convert.peft_reader` reads them): which folder holds
adapter ``adapter_name`` (PEFT saves ``default`` at the top, any other in a subfolder of its name), and its tensors from
``adapter_model.safetensors``, or from a pickle ``adapter_model.bin`` only with ``allow_pickle=True``
(``torch.load(weights_only=True)``). Both are opened as untrusted files of the directory."""

from __future__ import annotations

from pathlib import Path

import torch

from lordba._util.files import not_a_directory, open_untrusted
from lordba.errors import AdapterFormatError

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


def _resolve_dir(source: Path, adapter_name: str) -> Path:
    """The folder of adapter ``adapter_name``: PEFT saves "default" at the top and any other in a subfolder
    of its name (beside the default one, if the model had one)."""
    if not source.is_dir():
        raise AdapterFormatError(f"{not_a_directory(source)}; expected a PEFT adapter directory")
    sub = source / adapter_name
    if adapter_name != "default" and (sub / CONFIG_NAME).is_file():
        return sub
    if not (source / CONFIG_NAME).is_file():
        named = sorted(p.parent.name for p in source.glob(f"*/{CONFIG_NAME}"))
        hint = f"; adapters found in subfolders: {named} (pass adapter_name / --adapter-name)" if named else ""
        raise AdapterFormatError(f"{source / CONFIG_NAME}: missing (not a PEFT adapter directory){hint}")
    return source


def _load_tensors(directory: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    st_path, bin_path = directory / SAFETENSORS_NAME, directory / PICKLE_NAME
    if st_path.is_file():
        from safetensors.torch import load_file

        open_untrusted(st_path).close()  # a regular file, a link only into the directory (as the config)
        try:
            return load_file(str(st_path)), st_path
        except Exception as err:  # safetensors' own header/size checks
            raise AdapterFormatError(f"{st_path}: cannot read safetensors ({err})") from None
    if bin_path.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{bin_path}: pickle weights are refused (loading pickle can run code); pass allow_pickle=True "
                "/ --allow-pickle to load them with torch.load(weights_only=True), or re-save as safetensors"
            )
        open_untrusted(bin_path).close()
        try:
            data = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterFormatError(f"{bin_path}: cannot load with torch.load(weights_only=True) ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
            raise AdapterFormatError(f"{bin_path}: expected a dict of tensors by name (string keys)")
        for name, t in data.items():  # a pickle, unlike safetensors, stores strides: a view repeating a few bytes
            if t.numel() * t.element_size() > t.untyped_storage().nbytes():
                raise AdapterFormatError(
                    f"{bin_path}: tensor {name} of shape {tuple(t.shape)} repeats the {t.untyped_storage().nbytes()} "
                    "bytes stored for it (overlapping strides): a checked copy would take far more memory than the file"
                )
        return data, bin_path
    raise AdapterFormatError(f"{directory}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) found")
