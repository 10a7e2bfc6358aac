"""The Hub metadata of a model card a user wrote beside an adapter, updated as PEFT's
``create_or_update_model_card`` updates it: ``library_name``, ``base_model`` and lordba's tags set in its metadata
block, the user's other fields, tags and text kept. ``huggingface_hub`` (its ``ModelCard``) is imported only when a
card is updated."""

from __future__ import annotations


def update_card(text: str, ours: str) -> str:
    """``text`` (a ``README.md``) with the metadata of lordba's card ``ours`` put in its metadata block (made where it
    has none): ``library_name`` and ``base_model`` set, lordba's tags added after the card's own; the text below the
    block is kept as it is.

    A leading UTF-8 byte order mark (a Windows editor's) is dropped: behind it the block is not found, and a second
    one was put before it (the user's metadata then read as text).

    Raises:
        ValueError: a metadata block that is no YAML mapping; yaml.YAMLError: one that is no YAML.
    """
    from huggingface_hub import ModelCard

    card, data = ModelCard(text.removeprefix("\ufeff")), ModelCard(ours).data
    card.data["library_name"] = data.library_name
    if data.base_model is not None:
        card.data["base_model"] = data.base_model
    tags = card.data.tags or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    card.data["tags"] = tags + [t for t in data.tags or [] if t not in tags]
    return str(card)
