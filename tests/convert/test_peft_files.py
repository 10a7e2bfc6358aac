"""The files of a PEFT adapter directory crafted to hurt the reader, not merely broken: refused with an
AdapterFormatError naming the file and tensor, before anything is allocated or run for them."""

import os

import pytest
import torch
from safetensors.torch import load_file

from lordba import AdapterFormatError
from lordba.convert import read_lora

from .test_peft_reader import peft_adapter


def _as_pickle(path, tensors):
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")


def test_a_pickled_view_repeating_a_few_bytes_is_refused_before_any_allocation(tmp_path):
    """A pickle stores strides: an 11 kB adapter_model.bin whose lora_A is a stride-0 view of 4 bytes claiming
    4 x 2**40 elements. Was: the finiteness check allocated for every claimed element (17.6 TB) and failed with
    torch's RuntimeError "can't allocate memory" (a smaller claim, a few GB each, is allocated: the reader of a
    crafted file could exhaust the machine's memory)."""
    _, path = peft_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    name = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[name] = torch.zeros(1).expand(4, 2**40)
    _as_pickle(path, tensors)
    assert os.path.getsize(path / "adapter_model.bin") < 1 << 20
    with pytest.raises(AdapterFormatError, match=rf"adapter_model.bin: tensor {name} of shape \(4, 1099511627776\)"):
        read_lora(path, allow_pickle=True)


def test_pickled_views_that_do_not_repeat_bytes_still_load(tmp_path):
    """Transposed or sliced views (strides, a storage shared or larger than the tensor) are ordinary tensors."""
    _, path = peft_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    expected = read_lora(path)
    tensors = {k: (v.T.contiguous().T if "lora_A" in k else torch.cat([v, v])[: len(v)]) for k, v in tensors.items()}
    _as_pickle(path, tensors)
    lora = read_lora(path, allow_pickle=True)
    assert all(torch.equal(lora.layers[p].A, expected.layers[p].A) for p in expected.layers)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    """With allow_pickle=True the file is read by torch.load(weights_only=True): a pickle whose loading would
    create a file (any callable) is refused naming the file, and the file is never created."""
    _, path = peft_adapter(tmp_path)
    marker = tmp_path / "ran"
    tensors = load_file(path / "adapter_model.safetensors")
    _as_pickle(path, {**tensors, "x": _RunsCode(marker)})
    with pytest.raises(
        AdapterFormatError, match=r"adapter_model.bin: cannot load with torch.load\(weights_only=True\)"
    ):
        read_lora(path, allow_pickle=True)
    assert not marker.exists()
