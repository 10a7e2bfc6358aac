"""The declared dependency floors (pyproject.toml) are at least the oldest versions with the APIs the library calls
unguarded: below them pip would install lordba next to a version it crashes on, where it should refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package -> (oldest version that has what lordba calls, what)
NEEDED = {
    # torch.compiler.is_exporting (first in 2.7's API): LoRDBAModel's every forward asks it
    "torch": "2.7",
    # LoraConfig.exclude_modules (0.14): export_lora writes it, and PeftModel.from_pretrained on 0.13 fails with
    # "LoraConfig.__init__() got an unexpected keyword argument 'exclude_modules'"
    "peft": "0.14",
}


def _floors() -> dict[str, Version]:
    text = PYPROJECT.read_text()
    return {name.lower(): Version(v) for name, v in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)', text)}


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_the_declared_floor_is_at_least_the_oldest_version_with_the_apis_lordba_calls(package):
    floors = _floors()
    assert package in floors, f"{package} has no floor in {PYPROJECT}"
    assert floors[package] >= Version(NEEDED[package]), (package, floors[package])
