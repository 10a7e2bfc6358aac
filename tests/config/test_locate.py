"""``config.locate``: which records of a base model's name are the same model (the base-model warning's rule)."""

import pytest

from lordba.config.locate import base_key, other_base

SNAPSHOT = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12fd25f7"


@pytest.mark.parametrize(
    "current",
    [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "huggingfacetb/smollm2-135m-instruct",  # Hub ids ignore case
        "/models/SmolLM2-135M-Instruct/",  # a local folder of it, trailing slash
        "models\\SmolLM2-135M-Instruct\\",
        SNAPSHOT,  # the HF cache's snapshot folder of the Hub id
        SNAPSHOT + "/",
    ],
)
def test_the_same_model_under_another_name_or_folder_is_not_another_base(current):
    assert not other_base("HuggingFaceTB/SmolLM2-135M-Instruct", current)
    assert not other_base(current, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert base_key(current) == "smollm2-135m-instruct"


def test_another_model_is_another_base_and_an_unknown_name_never_is():
    assert other_base("HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m")
    assert other_base("/models/llama-3.2-1b", SNAPSHOT)
    assert not other_base(None, "google/gemma-3-270m") and not other_base("google/gemma-3-270m", "")


def test_a_registered_model_name_is_not_compared(monkeypatch):
    """The lab's ``default`` names a folder it makes on first use: the load does not look it up."""
    import sys

    monkeypatch.setattr(sys.modules["lordba.config.locate"], "registered_names", lambda: {"default"})
    assert not other_base("default", "/home/u/.cache/lordba/models/smollm2")
    assert other_base("other", "/home/u/.cache/lordba/models/smollm2")
