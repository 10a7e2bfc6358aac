"""Model names registered in the ``lordba.models`` entry-point group (the lab registers its embedded models:
``default``, ``smollm2-135m-instruct``, ``gemma-3-270m``), each a callable returning a local transformers folder.
An adapter trained on such a model records its name as ``base_model_name_or_path``: ``lordba serve --model``,
``export_lora`` and ``AutoLoRDBAModelForCausalLM`` find the folder through here (the library never imports the lab)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

MODEL_ENTRY_POINTS = "lordba.models"


def registered_model(name: str) -> tuple[Path, str] | None:
    """``(folder, canonical name)`` of the model registered as ``name`` (the canonical name: another name
    registered for the same callable, ``smollm2-135m-instruct`` for ``default``), or None where none is.
    Calling the entry point may fetch and convert the model once (the lab's do)."""
    points = list(importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS))
    found = next((ep for ep in points if ep.name == name), None)
    if found is None:
        return None
    canonical = next((ep.name for ep in points if ep.value == found.value and ep.name != "default"), name)
    return Path(found.load()()), canonical


def registered_names() -> set[str]:
    """The names registered in the ``lordba.models`` group (none of their entry points loaded: nothing is fetched)."""
    return {ep.name for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS)}
