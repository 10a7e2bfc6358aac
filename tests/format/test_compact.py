"""Format version 3 (lordba.format.compact): one entry per tensor kind, the module list folded,
per-module tensors handed out as views of one buffer, every field checked as in version 1."""

import json

import pytest
import torch

from lordba import AdapterFormatError, ConfigError, LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.format.adapter import AdapterState, read_adapter
from lordba.format.compact import fold_names, unfold_names
from lordba.format.sizes import adapter_file_bytes, size_report

from conftest import load_weights, refuse, rewrite_weights, set_config, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def _model(scale_dtype="int8", r=3, seed=4):
    torch.manual_seed(seed)
    return get_lordba_model(tiny_llama(0), LoRDBAConfig(r=r, init="random", scale_dtype=scale_dtype))


@pytest.fixture(params=["int8", "int4"])
def saved(request, tmp_path):
    _model(request.param).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
def test_saves_are_version_3_and_load_the_same_tensors_and_logits(tmp_path, scale_dtype, input_ids):
    lm = _model(scale_dtype)
    lm.save_pretrained(tmp_path)
    tensors, meta = load_weights(tmp_path)
    assert (
        meta["format_version"] == "3"
        and json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 3
    )
    assert set(tensors) == {"sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"}
    adapter = read_adapter(tmp_path)
    for path, module in lm.adapter_modules("default").items():
        for kind, t in module.stored_tensors().items():
            assert torch.equal(adapter.modules[path].tensors[kind], t), (path, kind)
    again = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=input_ids).logits, lm(input_ids=input_ids).logits)


def test_module_tensors_are_views_of_one_buffer(tmp_path):
    _model("int8").save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    storages = {
        rec.tensors[k].untyped_storage().data_ptr() for rec in adapter.modules.values() for k in ("sign_A", "scale_in")
    }
    assert len(storages) == 1  # no per-module copies


def test_version_1_is_still_written_on_request_and_reads_the_same(tmp_path):
    lm = _model("int8")
    lm.save_pretrained(tmp_path / "v1", format_version=1)
    lm.save_pretrained(tmp_path / "v3")
    assert load_weights(tmp_path / "v1")[1]["format_version"] == "1"
    v1, v3 = read_adapter(tmp_path / "v1"), read_adapter(tmp_path / "v3")
    for path, rec in v1.modules.items():
        assert all(torch.equal(t, v3.modules[path].tensors[k]) for k, t in rec.tensors.items())
    with pytest.raises(AdapterFormatError, match=r"int4.*needs version 3"):
        _model("int4").save_pretrained(tmp_path / "x", format_version=1)
    with pytest.raises(AdapterFormatError, match="cannot save format_version 5"):
        lm.save_pretrained(tmp_path / "y", format_version=5)


@pytest.mark.parametrize("version", [3.0, 1.0, True, "3"])
def test_a_format_version_that_is_not_an_int_is_refused_and_the_saved_adapter_stays(tmp_path, version):
    """save_pretrained(format_version=3.0) wrote "format_version": 3.0 into adapter_config.json, which every reader
    refuses ("format_version must be an integer"): the save replaced a good adapter with one nothing could load."""
    lm = _model("int8")
    lm.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(AdapterFormatError, match="cannot save format_version"):
        lm.save_pretrained(tmp_path, format_version=version)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    read_adapter(tmp_path)


def test_extras_travel_in_version_3(tmp_path):
    state = _model("int8").adapter_state("default")
    extras = {"model.norm.weight": torch.randn(40)}
    AdapterState(state.config, state.modules, extras=extras).save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.format_version == 3 and torch.equal(adapter.extras["model.norm.weight"], extras["model.norm.weight"])


def test_the_file_is_within_one_percent_of_the_payload_for_smollm2():
    """SmolLM2-135M all-linear, r = 16: version 1 spends ~117 kB on its header, version 3 under 1%."""
    shapes = {
        "self_attn.q_proj": (576, 576),
        "self_attn.k_proj": (576, 192),
        "self_attn.v_proj": (576, 192),
        "self_attn.o_proj": (576, 576),
        "mlp.gate_proj": (576, 1536),
        "mlp.up_proj": (576, 1536),
        "mlp.down_proj": (1536, 576),
    }
    dims = {f"model.layers.{i}.{n}": (*io, 16) for i in range(30) for n, io in shapes.items()}
    for dtype in ("int8", "int4"):
        payload = size_report(dims, dtype).payload_bytes
        assert adapter_file_bytes(dims, dtype) - payload < 0.01 * payload
    assert adapter_file_bytes(dims, "int8", 1) - size_report(dims, "int8").payload_bytes > 100_000
    with pytest.raises(ConfigError, match="only in format version 3"):  # int4 scales: no version-1 file exists
        adapter_file_bytes(dims, "int4", 1)
    lora_params = sum(16 * (i + o) for i, o, _ in dims.values())
    assert 8 * adapter_file_bytes(dims, "int4") / lora_params == pytest.approx(1.25, abs=0.03)
    r8 = {p: (i, o, 8) for p, (i, o, _) in dims.items()}
    assert 8 * adapter_file_bytes(r8, "int4") / lora_params == pytest.approx(0.75, abs=0.03)


def test_fold_names_round_trips_and_is_canonical(tmp_path):
    dims = {f"m.layers.{i}.q": [4, 4, 2] for i in (0, 1, 2, 4)} | {"m.layers.3.q": [4, 4, 1], "head": [1, 2, 3]}
    folded = fold_names(dims)
    assert folded == {
        "head": [1, 2, 3],
        "m.layers.3.q": [4, 4, 1],
        "m.layers.4.q": [4, 4, 2],
        "m.layers.{0..2}.q": [4, 4, 2],
    }
    assert unfold_names(folded, 100, tmp_path) == {**dims}
    for bad, match in (
        ({"m.{0..1}.q": [1, 1, 1], "m.2.q": [1, 1, 1]}, "canonical"),  # not a maximal run
        ({"m.{2..2}.q": [1, 1, 1]}, "single index"),
        ({"m.{0..4294967295}.q": [1, 1, 1]}, "more modules than"),  # refused before expanding
        ({"m.{0..1}.{0..1}": [1, 1, 1]}, "more than one range"),
        ({"m.{0..1}x.q": [1, 1, 1]}, "canonical"),
        ({"m.q": [1, 1, 1], "m.k": [1, 1, 1]}, "canonical"),  # keys not sorted
        ({"m.{0..2}.q": [1, 1, 1], "m.1.q": [1, 1, 1]}, "names module 'm.1.q' twice"),
        ({"a.{0..599}.q": [1, 1, 1], "b.{0..599}.q": [1, 1, 1]}, "range 0..599 .* more modules than the file's 1000"),
        ({f"m{i}": [1, 1, 1] for i in range(1001)}, "names more modules than the file can hold"),
        ({"m.q": 5}, "canonical"),
    ):
        with pytest.raises(AdapterFormatError, match=match):
            unfold_names(bad, 1000, tmp_path)


KINDS = ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t, m: t.__setitem__("scale_mid", t["scale_mid"].half()), "scale_mid: dtype 'F16', expected F32"),
        (lambda t, m: t.__setitem__("sign_A", t["sign_A"][:-1]), "sign_A: shape"),
        (lambda t, m: t.pop("sign_B"), "missing tensor"),
        (lambda t, m: t.__setitem__(f"{Q}.sign_A", t["sign_A"]), "unexpected tensor"),
        (
            lambda t, m: t["scale_mid"].__setitem__(0, float("nan")),
            "mlp.down_proj.scale_mid: holds NaN",
        ),  # first sorted
        (lambda t, m: t["sign_B"].__setitem__(-1, 255), "sign_B: non-zero padding bits"),
        (lambda t, m: m.__setitem__("format_version", "1"), "format_version '1' differs"),
        (lambda t, m: m.__setitem__("modules", json.dumps({Q: [40, 40, 3]})), "sign_A: shape"),
        (lambda t, m: m.__setitem__("modules", "{}"), "non-empty object"),
        (lambda t, m: m.__setitem__("modules", m["modules"].replace("{0..1}", "{0..9}")), "has no module|shape"),
        (lambda t, m: m.__setitem__("modules", m["modules"].replace("[40,40,3]", "[40,40,-3]")), "dims must be"),
        (  # a list inside the dims of a folded run was a TypeError (unhashable) from the canonical-form check
            lambda t, m: m.__setitem__("modules", m["modules"].replace("[40,40,3]", "[[40],40,3]")),
            r"module 'model\.layers\.0\.self_attn\.\w+': dims must be \[in, out, r\] positive ints, got \[\[40\]",
        ),
    ],
)
def test_structurally_bad_version_3_files_are_refused(saved, mutate, match):
    tensors, meta = load_weights(saved)
    mutate(tensors, meta)
    rewrite_weights(saved, tensors, meta)
    refuse(saved, match)


def test_int4_nibbles_are_checked(tmp_path):
    _model("int4").save_pretrained(tmp_path)
    tensors, meta = load_weights(tmp_path)
    tensors["scale_in"][0] = 0x80  # 4-bit index -8: not a code
    rewrite_weights(tmp_path, tensors, meta)
    refuse(tmp_path, "scale_in: byte 0 holds the invalid 4-bit index -8")


def test_int4_padding_nibbles_must_be_zero(tmp_path):
    from lordba.core.packing import pack_signs
    from lordba.core.scales import get_codec
    from lordba.format.header import ModuleRecord

    config = LoRDBAConfig(r=2, target_modules=["q"], scale_dtype="int4")
    codes = get_codec("int4").encode(torch.tensor([1.0, -0.5, 0.2, 0.9, 0.4]), torch.ones(2), torch.tensor([0.3, 1, 2]))
    record = ModuleRecord("m.q", 5, 3, 2)
    record.tensors = dict(zip(("scale_in", "scale_mid", "scale_out"), codes))
    record.tensors |= {"sign_A": pack_signs(torch.randn(2, 5)), "sign_B": pack_signs(torch.randn(3, 2))}
    AdapterState(config, {"m.q": record}).save_pretrained(tmp_path)
    assert torch.equal(read_adapter(tmp_path).modules["m.q"].tensors["scale_out"], codes[2])
    tensors, meta = load_weights(tmp_path)
    assert tensors["scale_in"].tolist()[-1] & 0xF == 0  # five codes: the sixth nibble pads
    tensors["scale_in"][-1] |= 1
    rewrite_weights(tmp_path, tensors, meta)
    with pytest.raises(AdapterFormatError, match=r"m\.q\.scale_in: non-zero padding nibble"):
        read_adapter(tmp_path)
    tensors["scale_in"][-1] &= 0xF0
    tensors["scale_out"][:] = torch.tensor([0x21, 0x10], dtype=torch.uint8)  # codes 36, 18, 18: no 127
    rewrite_weights(tmp_path, tensors, meta)
    with pytest.raises(AdapterFormatError, match=r"m\.q\.scale_out: a non-zero int8 scale vector must reach code"):
        read_adapter(tmp_path)


def test_int4_in_a_version_1_file_is_refused(tmp_path):
    _model("int4").save_pretrained(tmp_path)
    set_config(tmp_path, format_version=1)
    tensors, meta = load_weights(tmp_path)
    rewrite_weights(tmp_path, tensors, {**meta, "format_version": "1"})
    refuse(tmp_path, "int4.*only in format version 3")


def test_truncated_version_3_file_is_refused(tmp_path):
    import hashlib

    _model("int8").save_pretrained(tmp_path)
    path = tmp_path / "lordba_model.safetensors"
    data = path.read_bytes()[:-4]
    path.write_bytes(data)
    set_config(tmp_path, weights_sha256=hashlib.sha256(data).hexdigest())
    refuse(tmp_path, "truncated")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"exclude_modules": ["q_proj"]}, "excluded by exclude_modules"),
        ({"target_modules": ["v_proj"]}, "not matched by target_modules"),
        ({"rank_pattern": {"q_proj": 5}}, "the config gives it rank 5"),
        ({"r": 4}, "the config gives it rank 4"),
        ({"layers_to_transform": [1]}, "not matched by target_modules"),
    ],
)
def test_a_layout_checked_once_is_still_checked_against_each_config(tmp_path, change, match):
    """The checked module layouts are kept (a fleet shares one): the same ``modules`` string under a
    config that does not describe it is refused, before and after the layout was kept."""
    _model("int8").save_pretrained(tmp_path / "good")
    read_adapter(tmp_path / "good")  # the layout is now kept
    bad = tmp_path / "bad"
    _model("int8").save_pretrained(bad)
    set_config(bad, **change)
    meta = load_weights(bad)[1]
    assert meta["modules"] == load_weights(tmp_path / "good")[1]["modules"]
    refuse(bad, match)
    first, second = read_adapter(tmp_path / "good"), read_adapter(tmp_path / "good")
    assert first.modules[Q] is not second.modules[Q]  # fresh records per read: their tensors are their own
    assert torch.equal(first.modules[Q].tensors["sign_A"], second.modules[Q].tensors["sign_A"])


def test_int4_modules_of_odd_dims_read_back_each_its_own_codes(tmp_path):
    """Each odd-length int4 vector is padded to a whole byte: the second module's codes start after the first
    one's padding nibble, and each module's padding nibble is its own (a non-zero one names that module)."""
    from lordba.core.packing import pack_signs
    from lordba.core.scales import get_codec
    from lordba.format.header import ModuleRecord

    config = LoRDBAConfig(r=2, target_modules=["q"], scale_dtype="int4")
    g = torch.Generator().manual_seed(1)
    modules = {}
    for i in range(3):
        codes = get_codec("int4").encode(torch.randn(5, generator=g), torch.ones(2), torch.randn(3, generator=g))
        record = ModuleRecord(f"m.{i}.q", 5, 3, 2, dict(zip(("scale_in", "scale_mid", "scale_out"), codes)))
        record.tensors |= {"sign_A": pack_signs(torch.randn(2, 5)), "sign_B": pack_signs(torch.randn(3, 2))}
        modules[record.path] = record
    AdapterState(config, modules).save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    for name, rec in modules.items():
        for kind in ("scale_in", "scale_out"):
            assert torch.equal(adapter.modules[name].tensors[kind], rec.tensors[kind]), (name, kind)
    tensors, meta = load_weights(tmp_path)
    tensors["scale_out"][3] |= 1  # the second module's codes are bytes 2 and 3: its padding nibble
    rewrite_weights(tmp_path, tensors, meta)
    with pytest.raises(AdapterFormatError, match=r"m\.1\.q\.scale_out: non-zero padding nibble"):
        read_adapter(tmp_path)
    tensors["scale_out"][3] &= 0xF0
    tensors["scale_out"][4] = (tensors["scale_out"][4] & 0xF0) | 0x8  # a low nibble 8 in byte 4
    rewrite_weights(tmp_path, tensors, meta)
    with pytest.raises(AdapterFormatError, match="scale_out: byte 4 holds the invalid 4-bit index -8"):
        read_adapter(tmp_path)


def test_modules_are_read_in_sorted_order(saved):
    """The folded runs expand layer by layer per key (layers.0.mlp.down_proj, layers.1.mlp.down_proj, ...):
    a version 3 file's modules come back sorted, as version 1's do."""
    names = list(read_adapter(saved).modules)
    assert names == sorted(names) and len(names) == 14


def test_more_modules_than_the_data_can_hold_are_refused_before_expanding(saved):
    """Every module takes at least two data bytes: a run naming more is refused from the metadata alone."""
    from lordba.format.header import read_header

    path = saved / "lordba_model.safetensors"
    with open(path, "rb") as f:
        data_bytes = path.stat().st_size - 8 - read_header(f, path, path.stat().st_size)[2]
    tensors, meta = load_weights(saved)
    meta["modules"] = meta["modules"].replace("{0..1}", f"{{0..{data_bytes}}}")
    rewrite_weights(saved, tensors, meta)
    refuse(saved, rf"range 0\.\.{data_bytes} .* more modules than the file's {data_bytes // 2} can hold")
