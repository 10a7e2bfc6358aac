"""Two rules about a model's modules, kept in one place: replacing the submodule at a dotted path,
and recognising the output head by name."""

from __future__ import annotations

from torch import nn

OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier")


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` below ``root`` (``"model.layers.0.mlp.up_proj"``), in place.

    Takes the root module, the path of an existing submodule's slot and the new module; returns
    nothing. Raises ``AttributeError`` if the parent path does not exist.
    """
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def is_output_head(name: str) -> bool:
    """Whether the module path ``name`` names an output head: its last component is ``lm_head``
    (causal LMs), ``score`` or ``classifier`` (classification heads). Never raises."""
    return name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")  # config names of a context


def context_positions(model: nn.Module) -> int | None:
    """The most positions (prompt + generated) ``model``'s config allows, ``None`` where it names none."""
    config = getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
