"""Loading refuses every malformed adapter with an error naming the file and tensor, and leaves
the model untouched."""

import json

import pytest
import torch

from lordba import AdapterFormatError, ConfigError, LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.format.adapter import read_adapter

from conftest import load_weights, refuse, rewrite_weights, set_config, tiny_llama

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"  # out = 20, r = 3: sign_B has 4 padding bits


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(4)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random"))
    lm.save_pretrained(tmp_path, format_version=1)  # the per-module layout these cases edit (v3: test_compact.py)
    return tmp_path


def test_valid_adapter_reads(saved):
    adapter = read_adapter(saved)
    assert len(adapter.modules) == 14 and not adapter.recovered


def test_missing_files(saved):
    (saved / "lordba_model.safetensors").unlink()
    refuse(saved, "lordba_model.safetensors: missing")
    (saved / "adapter_config.json").unlink()
    refuse(saved, "adapter_config.json: missing")


def test_checksum_mismatch_from_a_flipped_byte(saved):
    path = saved / "lordba_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    refuse(saved, "checksum mismatch")


def test_truncated_file(saved):
    path = saved / "lordba_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    refuse(saved, "checksum mismatch")


def test_truncated_file_with_matching_checksum(saved):
    import hashlib

    path = saved / "lordba_model.safetensors"
    data = path.read_bytes()[:-10]
    path.write_bytes(data)
    set_config(saved, weights_sha256=hashlib.sha256(data).hexdigest())
    refuse(saved, "truncated")


def test_huge_declared_header(saved):
    import hashlib
    import struct

    path = saved / "lordba_model.safetensors"
    data = struct.pack("<Q", 1 << 62) + path.read_bytes()[8:]
    path.write_bytes(data)
    set_config(saved, weights_sha256=hashlib.sha256(data).hexdigest())
    refuse(saved, "header length")
    data = struct.pack("<Q", len(data) - 7) + data[8:]  # one byte past the end of the file
    path.write_bytes(data)
    set_config(saved, weights_sha256=hashlib.sha256(data).hexdigest())
    refuse(saved, rf"header length {len(data) - 7} exceeds the file \({len(data)} bytes\)")


def test_newer_format_version(saved):
    set_config(saved, format_version=99)
    refuse(saved, "format_version 99 is not supported")


def test_wrong_config_types(saved):
    for change, match in (
        ({"r": "3"}, "r must be a positive integer"),
        ({"alpha": None}, "alpha must be a positive finite number"),
        ({"scale_dtype": "int4"}, "scale_dtype"),
        ({"target_modules": 5}, "target_modules"),
        ({"peft_type": "LORA"}, "peft_type"),
        ({"surprise": 1}, "unknown field"),
        ({"weights_sha256": 12}, "weights_sha256"),
    ):
        original = (saved / "adapter_config.json").read_text()
        set_config(saved, **change)
        with pytest.raises((ConfigError, AdapterFormatError), match=match):
            read_adapter(saved)
        (saved / "adapter_config.json").write_text(original)
    (saved / "adapter_config.json").write_text("[1, 2]")
    refuse(saved, "expected a JSON object")
    (saved / "adapter_config.json").write_text('{"r": NaN}')
    refuse(saved, "not valid JSON")


def test_rank_mismatch_between_config_and_file(saved):
    set_config(saved, r=4)
    refuse(saved, r"module 'model\.layers\.\d\.\w+\.\w+' has rank 3 but the config gives it rank 4")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t, m: t.__setitem__(f"{Q}.scale_in", t[f"{Q}.scale_in"].float()), f"{Q}.scale_in: dtype 'F32'"),
        (lambda t, m: t.__setitem__(f"{Q}.scale_out", t[f"{Q}.scale_out"][:-1]), f"{Q}.scale_out: shape"),
        (
            lambda t, m: t.__setitem__(f"{Q}.sign_A", torch.cat([t[f"{Q}.sign_A"], torch.zeros(1, dtype=torch.uint8)])),
            "sign_A: shape",
        ),
        (lambda t, m: t.pop(f"{Q}.sign_B"), "missing tensor"),
        (lambda t, m: t.__setitem__("model.extra.sign_A", torch.zeros(1, dtype=torch.uint8)), "unexpected tensor"),
        (lambda t, m: t[f"{Q}.scale_mid"].__setitem__(0, float("nan")), f"{Q}.scale_mid: holds NaN"),
        (lambda t, m: t[f"{Q}.scale_in"].__setitem__(0, float("inf")), "holds NaN or infinite"),
        (lambda t, m: t[f"{K}.sign_B"].__setitem__(-1, 255), f"{K}.sign_B: non-zero padding bits"),
        (lambda t, m: m.__setitem__("format_version", "7"), "format_version '7'"),
        (lambda t, m: m.__setitem__("scale_dtype", "bfloat16"), "scale_dtype 'bfloat16' differs"),
        (lambda t, m: m.__setitem__("modules", "[]"), "non-empty object"),
        (lambda t, m: m.__setitem__("modules", "{}"), "non-empty object"),
        (
            lambda t, m: m.__setitem__("modules", json.dumps({**json.loads(m["modules"]), Q: [0, 40, 3]})),
            "dims must be",
        ),
        (
            lambda t, m: m.__setitem__("modules", json.dumps({**json.loads(m["modules"]), Q: [1 << 31, 40, 3]})),
            "dims must be",
        ),
        (
            lambda t, m: m.__setitem__("modules", json.dumps({**json.loads(m["modules"]), Q: [40, 40, -1]})),
            "dims must be",
        ),
        (lambda t, m: m.pop("format"), "metadata format"),
    ],
)
def test_structurally_bad_files_are_refused(saved, mutate, match):
    tensors, meta = load_weights(saved)
    mutate(tensors, meta)
    rewrite_weights(saved, tensors, meta)
    refuse(saved, match)


def test_int8_codes_must_be_in_range(tmp_path):
    torch.manual_seed(4)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random", scale_dtype="int8"))
    lm.save_pretrained(tmp_path, format_version=1)
    tensors, meta = load_weights(tmp_path)
    tensors[f"{Q}.scale_in"][0] = -128
    rewrite_weights(tmp_path, tensors, meta)
    refuse(tmp_path, "-128")
    tensors[f"{Q}.scale_in"] = tensors[f"{Q}.scale_in"].clamp(-100, 100)
    rewrite_weights(tmp_path, tensors, meta)
    refuse(tmp_path, "must reach code")


@pytest.mark.parametrize("format_version", [1, 3])
def test_a_refused_file_is_refused_again_by_a_second_load_tensors(tmp_path, format_version):
    # the first call's refusal left every module's tensors behind, so a second call returned them unchecked
    from lordba.format.adapter import open_adapter

    torch.manual_seed(4)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random", scale_dtype="float16"))
    lm.save_pretrained(tmp_path, format_version=format_version)
    tensors, meta = load_weights(tmp_path)
    kind = f"{Q}.scale_mid" if format_version == 1 else "scale_mid"
    tensors[kind][0] = float("nan")
    rewrite_weights(tmp_path, tensors, meta)
    adapter = open_adapter(tmp_path)
    for _ in range(2):
        with pytest.raises(AdapterFormatError, match="NaN or infinite"):
            adapter.load_tensors()
    assert not any(rec.tensors for rec in adapter.modules.values())


def test_mismatched_base_model(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    other = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 48}))
    with pytest.raises(AdapterFormatError, match=r"module '[\w.]+' is \d+→40 in the file but \d+→48 in the base model"):
        LoRDBAModel.from_pretrained(other, saved)
    shallow = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    with pytest.raises(AdapterFormatError, match=r"has no module 'model\.layers\.1"):
        LoRDBAModel.from_pretrained(shallow, saved)


def test_save_refuses_non_finite_scales(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, scale_dtype="float16"))
    with torch.no_grad():
        lm.adapter_modules("default")[Q].scale_out[0] = 1e6  # overflows float16
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        lm.save_pretrained(tmp_path)
    assert not (tmp_path / "lordba_model.safetensors").exists()


@pytest.mark.parametrize(
    "change, match",
    [({"target_modules": ["q_proj"]}, "not matched by target_modules"), ({"r": 2}, "config gives it rank 2")],
)
def test_save_refuses_modules_its_config_does_not_describe(saved, change, match):
    # The loader refuses such a file: writing it would replace a good adapter with one that cannot be read.
    import dataclasses

    good = (saved / "lordba_model.safetensors").read_bytes()
    state = read_adapter(saved)
    with pytest.raises(AdapterFormatError, match=f"cannot save: module .*{match}"):
        dataclasses.replace(state, config=dataclasses.replace(state.config, **change)).save_pretrained(saved)
    assert (saved / "lordba_model.safetensors").read_bytes() == good


def test_training_on_after_hot_swapping_to_a_subset_does_not_save_an_unreadable_adapter(tmp_path, saved):
    # A hot-swap to a file of q_proj only silences the other modules and takes that file's config; trained on,
    # they hold weights again that this config does not describe: the save is refused, the old files stay.
    torch.manual_seed(2)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random", target_modules=["q_proj"])).save_pretrained(
        tmp_path / "sub"
    )
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random"))
    lm.hotswap_adapter(tmp_path / "sub")
    lm.save_pretrained(tmp_path / "swapped")  # silenced modules are left out: it loads
    LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "swapped")
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1).step()
    good = (saved / "lordba_model.safetensors").read_bytes()
    with pytest.raises(AdapterFormatError, match=r"cannot save: module .* not matched by target_modules"):
        lm.save_pretrained(saved)
    assert (saved / "lordba_model.safetensors").read_bytes() == good
    read_adapter(saved)


def test_no_pickle_is_ever_read(saved):
    """A .bin beside the adapter is ignored; only safetensors and JSON are opened."""
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle we would ever load")
    assert len(read_adapter(saved).modules) == 14


def test_a_path_the_file_system_cannot_hold_is_refused_naming_it(tmp_path):
    """A name too long for the file system was an OSError from the loader's first stat (a 500 in a server
    that did not expect one); it is the library's error, naming the path (shortened)."""
    long = tmp_path / ("a" * 5000)
    with pytest.raises(AdapterFormatError, match=r"cannot be read \(File name too long\)") as err:
        read_adapter(long)
    assert str(tmp_path)[:30] in str(err.value) and len(str(err.value)) < 1000
    with pytest.raises(AdapterFormatError, match="cannot be read"):
        LoRDBAModel.from_pretrained(tiny_llama(), long)


def _edit_header(directory, edit):
    """Rewrite the weights file as ``edit(header, data)`` returns it (the parsed safetensors header and
    data section; the header padded to 8 bytes) and fix the checksum, as an attacker would."""
    import hashlib
    import struct

    path = directory / "lordba_model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header, data = edit(json.loads(raw[8 : 8 + n]), raw[8 + n :])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    set_config(directory, weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _move(d_start, d_stop):
    """Move the second tensor of the data section's start and end by these many bytes, the later tensors and
    the file's end by ``d_stop``: the file length still matches its header."""

    def edit(header, data):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        start, stop = header[names[1]]["data_offsets"]
        header[names[1]]["data_offsets"] = [start + d_start, stop + d_stop]
        for name in names[2:]:
            header[name]["data_offsets"] = [o + d_stop for o in header[name]["data_offsets"]]
        return header, data[: len(data) + d_stop] if d_stop < 0 else data + bytes(d_stop)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_move(0, -1), r"tensor [\w.]+: byte range \[\d+, \d+\] holds \d+ bytes, expected \d+"),
        (_move(-1, -1), r"tensor [\w.]+: data does not follow the previous tensor \(gap or overlap\)"),
        (_move(1, 1), r"tensor [\w.]+: data does not follow the previous tensor \(gap or overlap\)"),
    ],
    ids=["short", "overlap", "gap"],
)
def test_byte_ranges_that_do_not_tile_the_data_are_refused_naming_the_tensor(saved, edit, match):
    """The file's length still matches the header's last byte: only the ranges themselves are wrong (a
    tensor one byte short of its shape, one reading its neighbour's last byte, one byte between two)."""
    _edit_header(saved, edit)
    refuse(saved, match)
    with pytest.raises(AdapterFormatError, match=r"lordba_model\.safetensors: tensor model\.layers"):
        read_adapter(saved)


def test_a_module_inside_a_lordba_layer_is_refused(saved):
    """A version 1 file naming ``P.base_layer`` (what a wrapped model holds inside P): it would adapt the wrapped
    layer's own base, a LoRDBA layer inside a LoRDBA layer."""
    tensors, meta = load_weights(saved)
    inner = f"{Q}.base_layer"
    tensors = {k.replace(Q, inner): t for k, t in tensors.items()}
    meta["modules"] = meta["modules"].replace(f'"{Q}"', f'"{inner}"')
    rewrite_weights(saved, tensors, meta)
    refuse(saved, rf"lordba_model\.safetensors: module name '{inner}' points inside a LoRDBA layer")


def test_a_file_shorter_than_a_safetensors_header_length_is_refused(saved):
    import hashlib

    path = saved / "lordba_model.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    set_config(saved, weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    refuse(saved, r"lordba_model\.safetensors: 5 bytes, too short for a safetensors file")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["__metadata__"].__setitem__("modules", json.loads(h["__metadata__"]["modules"])), "__metadata__"),
        (lambda h: h[f"{Q}.sign_A"].__setitem__("offsets", [0, 1]), rf"tensor {Q}\.sign_A: malformed header entry"),
    ],
    ids=["metadata-not-strings", "unknown-entry-key"],
)
def test_malformed_header_entries_are_refused(saved, edit, match):
    """safetensors metadata maps strings to strings (a JSON object as 'modules' reached str methods), and a
    tensor entry holds exactly dtype, shape and data_offsets."""

    def apply(header, data):
        edit(header)
        return header, data

    _edit_header(saved, apply)
    refuse(saved, match)
