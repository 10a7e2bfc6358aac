"""``AutoLoRDBAModelForCausalLM``: load the base model an adapter names, then the adapter on it
(PEFT's ``AutoPeftModelForCausalLM`` for LoRDBA adapters; PEFT's own class cannot read them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lordba._util.models import registered_model
from lordba.config import CONFIG_NAME
from lordba.errors import ConfigError
from lordba.format.adapter import open_adapter
from lordba.nn.hub import resolve_adapter_dir
from lordba.nn.model import LoRDBAModel


class AutoLoRDBAModelForCausalLM:
    """Builds a :class:`~lordba.nn.model.LoRDBAModel` from an adapter alone: the base model comes
    from the adapter config's ``base_model_name_or_path`` through ``transformers.AutoModelForCausalLM``."""

    _auto_class = "AutoModelForCausalLM"

    def __init__(self) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(adapter_dir_or_id, ...)")

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **model_kwargs: Any,
    ) -> LoRDBAModel:
        """Load the base model named in the adapter's config, then the adapter on it (activated).

        Args:
            model_id: the adapter: a directory or a Hugging Face Hub repo id.
            adapter_name: the name the adapter gets.
            is_trainable: load its scales as trainable parameters.
            revision, token, cache_dir, subfolder, local_files_only: where to find the adapter (as in
                PEFT); ``token``, ``cache_dir`` and ``local_files_only`` are passed to the base model's
                loading too.
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
                ``device_map``, ``quantization_config``, ``revision`` of the base is ``base_revision``).

        Returns:
            The base model with the adapter, a ``LoRDBAModel``.

        Raises:
            ConfigError: the adapter config has no ``base_model_name_or_path``, or the base it names cannot be
                loaded (not found, offline and not cached: transformers' ``OSError`` is its ``__cause__``).
            AdapterFormatError: the adapter cannot be found or read (named).
        """
        directory = resolve_adapter_dir(
            model_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            subfolder=subfolder,
            local_files_only=local_files_only,
        )
        adapter = open_adapter(directory)
        adapter.close()
        base = adapter.config.base_model_name_or_path
        if not base:
            raise ConfigError(
                f"{directory / CONFIG_NAME}: base_model_name_or_path is not set, so the base model is unknown: "
                "load the base yourself and use LoRDBAModel.from_pretrained(base_model, adapter)"
            )
        import transformers

        auto = getattr(transformers, cls._auto_class)
        base_kwargs = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        if "base_revision" in model_kwargs:
            base_kwargs["revision"] = model_kwargs.pop("base_revision")
        registered = registered_model(base)  # a name the lab registers (its embedded models): their folder
        try:
            model = auto.from_pretrained(registered[0] if registered else base, **base_kwargs, **model_kwargs)
        except OSError as err:  # transformers' "couldn't connect ... couldn't find them in the cached files", etc.
            reason = (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"{directory / CONFIG_NAME}: base_model_name_or_path {base!r} could not be loaded with "
                f"transformers.{cls._auto_class} ({type(err).__name__}: {reason}): make that model available "
                "(download it into the HF cache, or go online), or load the base yourself and use "
                "LoRDBAModel.from_pretrained(base_model, adapter)"
            ) from err
        return LoRDBAModel.from_pretrained(model, directory, adapter_name=adapter_name, is_trainable=is_trainable)
