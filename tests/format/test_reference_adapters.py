"""Adapters written before the restructure of issue 13 (tests/fixtures/reference, made by
tests/fixtures/make_reference_adapters.py with the code of commit 0e086ec) still load and give the
same logits, and the same recipe today writes the same files but for one addition: the config's
digest (``config_sha256``) in the weights' metadata, and hence the config's ``weights_sha256``.
Without that key the weights are byte-identical, and the key is the digest of the committed config:
the tensors, their layout and every other metadata and config byte did not change."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lordba import LoRDBAModel
from lordba.format.integrity import CONFIG_DIGEST_KEY, config_digest
from lordba.format.tensorfile import to_bytes

from conftest import tiny_llama

REFERENCE = Path(__file__).parents[1] / "fixtures" / "reference"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_digest(path: Path) -> tuple[bytes, str | None]:
    """The weights file re-serialised without ``config_sha256``, and that key's value."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    digest = metadata.pop(CONFIG_DIGEST_KEY, None)
    return to_bytes(tensors, metadata), digest


def _assert_equal_but_training_rounding(new: Path, old: Path) -> None:
    """The trained recipe's file against the committed one where the bytes differ: a few training
    steps' float arithmetic runs through the CPU's BLAS, whose last bits differ between CPUs (the
    committed file was written on an AMD EPYC; an Intel Xeon's float32 scales differ by ~1 ulp). Same
    metadata, tensor names, dtypes and shapes; packed signs and integer codes equal; float tensors
    within float32 rounding."""
    with safe_open(str(new), framework="pt") as a, safe_open(str(old), framework="pt") as b:
        meta_a, meta_b = dict(a.metadata()), dict(b.metadata())
        meta_a.pop(CONFIG_DIGEST_KEY, None)
        assert meta_a == meta_b and sorted(a.keys()) == sorted(b.keys()), new
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=key)
            else:
                assert torch.equal(x, y), key


def test_the_same_recipe_writes_the_same_files_plus_the_config_digest(tmp_path, monkeypatch):
    import lordba.format.adapter
    from fixtures.make_reference_adapters import main

    monkeypatch.setattr(lordba.format.adapter, "DEFAULT_FORMAT_VERSION", 1)  # the committed files are version 1
    main(tmp_path)
    written, committed = _files(tmp_path), _files(REFERENCE)
    adapters = {k for k in committed if not k.endswith("logits.safetensors")}
    assert adapters and adapters <= written.keys()
    for name in sorted(adapters):
        if name.endswith("lordba_model.safetensors"):
            weights, digest = _without_digest(tmp_path / name)
            if weights != committed[name] and name.startswith("trained/"):
                _assert_equal_but_training_rounding(tmp_path / name, REFERENCE / name)
            else:
                assert weights == committed[name], name
            config = json.loads(committed[name.replace("lordba_model.safetensors", "adapter_config.json")])
            assert digest == config_digest(config), name
        elif name.endswith("adapter_config.json") and "-lora" not in name:
            new, old = json.loads(written[name]), json.loads(committed[name])
            assert new.pop("weights_sha256") != old.pop("weights_sha256")
            assert written[name].decode().replace(json.loads(written[name])["weights_sha256"], "") == committed[
                name
            ].decode().replace(json.loads(committed[name])["weights_sha256"], ""), name
        elif name.startswith("fp16-lora/"):  # per-module ranks and alphas: now one rank, one scaling
            _assert_same_peft_deltas(tmp_path / "fp16-lora", REFERENCE / "fp16-lora")
        else:  # the PEFT LoRA exports
            assert written[name] == committed[name], name


def _peft_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """``{module: ΔW}`` of an exported PEFT LoRA by PEFT's rule (``alpha_pattern`` / ``rank_pattern`` keys are
    the escaped module paths an export writes)."""
    import re

    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            A, B = tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float()
            alpha = config["alpha_pattern"].get(re.escape(path), config["lora_alpha"])
            assert A.shape[0] == config["rank_pattern"].get(re.escape(path), config["r"])
            out[path] = alpha / A.shape[0] * B @ A
    return out


def _assert_same_peft_deltas(new: Path, old: Path) -> None:
    """The fp16 recipe's export has per-module ranks and alphas, which it writes (since they were found
    ignored by vLLM and llama.cpp) at one rank with each module's scaling in its factors: the same ΔW
    as the committed export's, to float16 rounding, and no patterns left."""
    config = json.loads((new / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    got, expected = _peft_deltas(new), _peft_deltas(old)
    assert sorted(got) == sorted(expected)
    for path, delta in expected.items():
        torch.testing.assert_close(got[path], delta, rtol=0, atol=2e-3 * float(delta.abs().max()), msg=path)


@pytest.mark.parametrize("name", ["fp16", "int8", "trained"])
def test_committed_adapters_load_and_give_the_committed_logits(name):
    from fixtures.make_reference_adapters import input_ids

    expected = load_file(str(REFERENCE / "logits.safetensors"))
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), REFERENCE / name)
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=input_ids()).logits, expected[name], rtol=0, atol=1e-5)
    if name != "trained":
        lm.load_adapter(REFERENCE / name / "second", "second")
        lm.set_adapter(["default", "second"])
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=input_ids()).logits, expected[name + "+second"], rtol=0, atol=1e-5)
