"""convert_lora end to end on the tiny model: files, model loading, budgets, CLI, inspect."""

import json

import pytest
import torch

from lordba import ConfigError, ConversionError, LoRDBAConfig, LoRDBAModel, read_adapter
from lordba.cli import main
from lordba.convert import SIDECAR_NAME, collect_input_moments, convert_lora, read_lora, save_converted

from .test_peft_reader import peft_adapter
from conftest import tiny_llama


def lora_delta(lora, path):
    layer = lora.layers[path]
    return layer.scaling * layer.B.double() @ layer.A.double()


def test_loaded_adapter_reproduces_the_reported_errors(tmp_path):
    model, path = peft_adapter(tmp_path, target_modules="all-linear", use_rslora=True)
    state, report = convert_lora(path, scale_dtype="int8", progress=False)
    assert state.config.mode == "ptq" and state.config.scale_dtype == "int8"
    assert state.config.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    lm = LoRDBAModel(model.get_base_model().__class__(model.get_base_model().config))
    lm.load_adapter_state(state, "default")
    # copied (the state is the caller's), into one buffer as a loaded file's tensors are held
    held = [t for ad in lm.adapter_modules("default").values() for t in ad.buffers()]
    given = {t.data_ptr() for rec in state.modules.values() for t in rec.tensors.values()}
    assert len({t.untyped_storage().data_ptr() for t in held}) == 1 and not given & {t.data_ptr() for t in held}
    lora = read_lora(path)
    for layer_report in report.layers:
        adapter = lm.adapter_modules("default")[layer_report.path]
        target = lora_delta(lora, layer_report.path)
        err = ((adapter.delta_weight().double() - target).norm() / target.norm()).item()
        assert err == pytest.approx(layer_report.rel_error, abs=1e-5)
        assert layer_report.delta_norm == pytest.approx(target.norm().item(), rel=1e-5)
    assert 0 < report.total_rel_error < 0.8
    totals = report.to_dict()["totals"]
    assert totals["file_bytes"] == report.size.file_bytes and totals["bpw_lora"] > 0
    assert "| layers | 14 |" in report.to_markdown()


def test_same_input_gives_byte_identical_files(tmp_path):
    _, path = peft_adapter(tmp_path)
    for name in ("a", "b"):
        state, report = convert_lora(path, progress=False)
        save_converted(state, report, tmp_path / name)
    for file in ("adapter_config.json", "lordba_model.safetensors", SIDECAR_NAME):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    adapter = read_adapter(tmp_path / "a")  # full validation of what was written
    assert adapter.config.mode == "ptq"


def test_config_rank_and_alpha_are_honoured(tmp_path):
    _, path = peft_adapter(tmp_path)
    config = LoRDBAConfig(r=6, alpha=3.0, rank_pattern={"v_proj": 2}, scale_dtype="bfloat16")
    state, _ = convert_lora(path, config, progress=False)
    assert state.config.alpha == 3.0 and state.config.scale_dtype == "bfloat16"
    assert state.modules["model.layers.0.self_attn.v_proj"].r == 2
    assert state.modules["model.layers.0.self_attn.q_proj"].r == 6
    state, _ = convert_lora(path, config, r=3, progress=False)
    assert {m.r for m in state.modules.values()} == {3}
    with pytest.raises(ConfigError, match="either r or target_bpw"):
        convert_lora(path, r=3, target_bpw=2.0)


def test_budget_allocation_fits_and_beats_the_uniform_rank(tmp_path):
    _, path = peft_adapter(tmp_path, r=8, lora_alpha=16)
    state, report = convert_lora(path, target_bpw=12.0, rank_candidates=(1, 2, 4, 8), progress=False)
    alloc = report.allocation
    assert report.bpw_lora <= 12.0 + 1e-9 and alloc["file_bytes"] == report.size.file_bytes
    assert alloc["uniform_bpw_lora"] <= 12.0
    assert alloc["total_rel_error"] <= alloc["uniform_total_rel_error"] + 1e-12
    assert report.total_rel_error == pytest.approx(alloc["total_rel_error"], rel=1e-6)
    for path_, rec in state.modules.items():
        assert state.config.rank_for(path_) == rec.r
    save_converted(state, report, tmp_path / "out")
    assert read_adapter(tmp_path / "out").dims() == state.dims()
    with pytest.raises(ConfigError, match="below the smallest possible size"):
        convert_lora(path, target_bpw=0.5, progress=False)


def test_budget_allocation_counts_the_larger_header_of_mixed_ranks(tmp_path):
    """A target at exactly a uniform rank's file size: mixed ranks store every module's rank in the
    header, and the payload budget shrinks by that, so the file still fits (else the uniform rank)."""
    from lordba.format.sizes import size_report

    _, path = peft_adapter(tmp_path, r=8, lora_alpha=16)
    lora = read_lora(path)
    params = sum(x.r * (x.in_features + x.out_features) for x in lora.layers.values())
    for r in (2, 4):
        uniform = size_report({p: (x.in_features, x.out_features, r) for p, x in lora.layers.items()}, "int8")
        target = 8 * uniform.file_bytes / params
        _, report = convert_lora(
            path, target_bpw=target, scale_dtype="int8", rank_candidates=(1, 2, 4, 8), progress=False
        )
        alloc = report.allocation
        assert alloc["uniform_rank"] == r and alloc["file_bytes"] <= uniform.file_bytes
        assert report.size.file_bytes == alloc["file_bytes"] and report.bpw_lora <= target + 1e-9
        assert alloc["total_rel_error"] <= alloc["uniform_total_rel_error"] + 1e-12


def test_budget_uniform_rank_above_the_candidates_fits_the_file_and_the_least_size_is_accepted(tmp_path):
    """The uniform rank is found with its own header (a rank above every candidate has larger header
    offsets than the largest candidate's), and a target at the smallest file size is accepted."""
    from lordba.format.sizes import size_report

    _, path = peft_adapter(tmp_path, r=16, lora_alpha=16, target_modules=["q_proj"])
    lora = read_lora(path)
    params = sum(x.r * (x.in_features + x.out_features) for x in lora.layers.values())

    def file_bytes(r):
        return size_report({p: (x.in_features, x.out_features, r) for p, x in lora.layers.items()}, "int8").file_bytes

    allowed = file_bytes(100) - 1  # rank 100's file is one byte too large: rank 99 is the uniform rank
    target = (allowed + 0.5) * 8 / params
    state, report = convert_lora(path, target_bpw=target, scale_dtype="int8", rank_candidates=(1,), progress=False)
    save_converted(state, report, tmp_path / "out")
    written = (tmp_path / "out" / "lordba_model.safetensors").stat().st_size
    assert report.allocation["uniform_rank"] == 99 and written == report.size.file_bytes <= allowed
    least = (file_bytes(1) + 0.5) * 8 / params  # exactly the rank-1 file: fits
    _, report = convert_lora(path, target_bpw=least, scale_dtype="int8", rank_candidates=(1,), progress=False)
    assert report.allocation["uniform_rank"] == 1 and report.size.file_bytes == file_bytes(1)


def test_calibration_moments_and_weighted_conversion(tmp_path, input_ids):
    model, path = peft_adapter(tmp_path)
    paths = sorted(read_lora(path).layers)
    moments = collect_input_moments(model, [input_ids, {"input_ids": input_ids[:1]}], paths)
    assert sorted(moments) == paths and all(m.shape == (40,) or m.shape == (52,) for m in moments.values())
    _, report = convert_lora(path, calibration=moments, progress=False)
    assert all(lr.rel_error_weighted is not None for lr in report.layers)
    with pytest.raises(Exception, match="calibration has no statistics"):
        convert_lora(path, calibration={paths[0]: moments[paths[0]]}, progress=False)


def test_calibration_moments_leave_out_padding(tmp_path, input_ids):
    """Sequences of different lengths padded into one batch give the moments of the sequences alone:
    positions the attention mask leaves out are not calibration inputs (they were averaged in)."""
    model, path = peft_adapter(tmp_path)
    paths = sorted(read_lora(path).layers)
    short, full = input_ids[0, :4], input_ids[1]
    ids = torch.stack([torch.cat([short, torch.zeros(5, dtype=short.dtype)]), full])
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    padded = collect_input_moments(model, [{"input_ids": ids, "attention_mask": mask}], paths)
    alone = collect_input_moments(model, [short[None], full[None]], paths)
    for p in paths:
        torch.testing.assert_close(padded[p], alone[p], rtol=1e-4, atol=1e-9)


def test_calibration_runs_without_dropout_and_keeps_each_modules_mode():
    """A model left in train mode (as after training) was calibrated with its dropout on: the moments of a
    linear after a dropout of 0.5 came out ~2x too large and random."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 3), torch.nn.Dropout(0.1))
    model[2].eval()
    x = torch.randn(64, 8)
    moments = collect_input_moments(model, [x], ["1"])
    torch.testing.assert_close(moments["1"], x.square().mean(0))
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_calibration_moments_are_summed_in_float64_and_returned_on_the_cpu():
    """One batch of x = 4096 (x² = 2**24) and 1000 of x = 1: the float32 running sum dropped every later batch
    (mean 16760.45 for 16761.45); the sums are float64 on the CPU, the result float32 on the CPU."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    batches = [torch.full((1, 2), 4096.0)] + [torch.ones(1, 2)] * 1000
    moments = collect_input_moments(model, batches, ["0"])["0"]
    assert moments.dtype == torch.float32 and moments.device.type == "cpu"
    torch.testing.assert_close(moments, torch.full((2,), (4096.0**2 + 1000) / 1001), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_calibration_of_a_model_on_the_gpu_takes_cpu_inputs_and_feeds_a_cpu_conversion(tmp_path, input_ids):
    """A model on the GPU with CPU input ids: torch's device mismatch error; moments left on the GPU then broke
    convert_lora (a LoRA read on the CPU)."""
    model, path = peft_adapter(tmp_path)
    model.cuda()
    paths = sorted(read_lora(path).layers)
    moments = collect_input_moments(model, [input_ids, {"input_ids": input_ids[:1]}], paths)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in moments.values())
    _, report = convert_lora(path, calibration=moments, progress=False, iters=1)
    assert all(lr.rel_error_weighted is not None for lr in report.layers)


def test_cli_convert_and_inspect_show_the_sidecar(tmp_path, capsys):
    _, path = peft_adapter(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "convert",
            str(path),
            str(out),
            "--r",
            "3",
            "--scale-dtype",
            "int8",
            "--quiet",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote LoRDBA adapter" in printed and "relative error of ΔW" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["layers"] == 6 and "seconds" in data
    assert (tmp_path / "r.md").read_text().startswith("# LoRDBA conversion")
    sidecar = json.loads((out / SIDECAR_NAME).read_text())
    assert "seconds" not in sidecar and len(sidecar["layers"]) == 6
    assert main(["convert", str(path), str(out), "--quiet"]) == 3
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), str(tmp_path / "x"), "--quiet"]) == 3
    assert "adapter_config.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "conversion (stored errors of ΔW)" in shown and "RMR A" in shown
    assert main(["inspect", str(out), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["conversion"]["layers"]) == 6


def test_inspect_leaves_out_a_conversion_report_of_other_weights(tmp_path, capsys):
    """An adapter converted into a folder and then saved again there (trained in scales-only mode, say) kept the
    conversion's sidecar: ``lordba inspect`` showed the old per-layer errors as the new adapter's."""
    _, path = peft_adapter(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(path), str(out), "--r", "3", "--quiet"]) == 0
    capsys.readouterr()
    lm = LoRDBAModel.from_pretrained(tiny_llama(), out, is_trainable=True)
    with torch.no_grad():
        next(p for n, p in lm.named_parameters() if p.requires_grad).mul_(2)
    lm.save_pretrained(out)
    assert (out / SIDECAR_NAME).is_file()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "RMR A" not in shown and "describes another weights file" in shown
    assert main(["inspect", str(out), "--json"]) == 0
    assert "layers" not in json.loads(capsys.readouterr().out)["conversion"]


def test_cli_solver_defaults_are_the_library_defaults():
    import argparse

    from lordba.cli import convert_cmd
    from lordba.convert import SolverOptions

    p = argparse.ArgumentParser()
    convert_cmd.add_arguments(p)
    args = p.parse_args(["in", "out"])
    lib = SolverOptions()
    assert (args.gauge, args.method, args.iters, args.tol) == (lib.gauge, lib.method, lib.iters, lib.tol)
    assert args.admm_iters is None  # convert_lora's own default is used


def test_budget_fitting_bisects_to_a_file_that_fits():
    """SmolLM2's 210 projections at 4 candidate ranks: the largest payload budget whose file (mixed
    ranks: a larger header) fits; nothing when even the cheapest ranks' file is too large."""
    import math
    import random

    from lordba.convert.allocate import _file_bytes, _fitting
    from lordba.format.sizes import payload_bytes, size_report

    rng = random.Random(0)
    shapes = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536),
              "up": (576, 1536), "down": (1536, 576)}  # fmt: skip
    dims = {f"model.layers.{i}.{n}_proj": s for i in range(30) for n, s in shapes.items()}
    curves = {
        p: {r: (payload_bytes(i, o, r, "int8"), rng.uniform(0.5, 2) * math.exp(-r / rng.uniform(6, 30)))
            for r in (4, 8, 16, 32)}
        for p, (i, o) in dims.items()
    }  # fmt: skip
    for r in (8, 16):
        uniform = size_report({p: (i, o, r) for p, (i, o) in dims.items()}, "int8")
        budget = uniform.payload_bytes
        alloc = _fitting(curves, budget, uniform.file_bytes, dims, "int8")
        assert alloc is not None and len(set(alloc.ranks.values())) > 1
        file_bytes = _file_bytes(dims, alloc.ranks, "int8")
        assert file_bytes <= uniform.file_bytes < file_bytes + 2048  # fits, and uses nearly all of it
    assert _fitting(curves, 10**6, 1000, dims, "int8") is None


def test_budget_allocation_with_calibration_minimises_the_output_error(tmp_path):
    """With calibration the ranks go where the output error is: a layer whose inputs are 100 times
    larger gets at least the rank the ΔW objective gives it, and the allocation's output error on the
    calibration moments (recomputed here from the stored adapter) is no larger than the uniform rank's."""
    torch = pytest.importorskip("torch")
    model, path = peft_adapter(tmp_path, r=8, lora_alpha=16)
    lora = read_lora(path)
    paths = sorted(lora.layers)
    g = torch.Generator().manual_seed(0)
    moments = {p: torch.rand(lora.layers[p].in_features, generator=g) + 0.5 for p in paths}
    loud = paths[0]
    moments[loud] = moments[loud] * 1e4  # inputs 100x larger
    kw = {"target_bpw": 12.0, "rank_candidates": (1, 2, 4, 8), "progress": False}
    plain_state, plain = convert_lora(path, **kw)
    state, report = convert_lora(path, calibration=moments, **kw)
    alloc = report.allocation
    assert alloc["objective"] == "output error on the calibration inputs"
    assert plain.allocation["objective"] == "ΔW error"
    assert state.config.rank_for(loud) >= plain_state.config.rank_for(loud)
    lm = LoRDBAModel(model.get_base_model().__class__(model.get_base_model().config))
    lm.load_adapter_state(state, "default")

    def output_error2(adapters):
        return sum(
            float(
                ((adapters[p].delta_weight().double() - lora_delta(lora, p)) * moments[p].double().sqrt()).norm() ** 2
            )
            for p in paths
        )

    norm2 = sum(float((lora_delta(lora, p) * moments[p].double().sqrt()).norm() ** 2) for p in paths)
    assert alloc["total_rel_error"] == pytest.approx(
        (output_error2(lm.adapter_modules("default")) / norm2) ** 0.5, rel=1e-4
    )
    assert alloc["total_rel_error"] <= alloc["uniform_total_rel_error"] + 1e-12


def test_bad_arguments_are_the_librarys_errors_naming_them(tmp_path):
    """Calibration vectors of another shape or type, a zero ``max_batch``, an infinite ``target_bpw``
    and non-integer rank candidates were RuntimeError, AttributeError, ValueError, OverflowError and
    TypeError from deep inside the conversion."""

    _, path = peft_adapter(tmp_path)
    paths = sorted(read_lora(path).layers)
    q = "model.layers.0.self_attn.q_proj"
    for bad, shown in (
        (torch.ones(2, 40), r"shape \(2, 40\)"),
        ([1.0] * 40, "list"),
        (torch.ones(40, dtype=torch.int64), r"shape \(40,\)"),
    ):
        calibration = {p: torch.ones(52 if "down" in p else 40) for p in paths} | {q: bad}
        with pytest.raises(ConversionError, match=rf"calibration statistics for '{q}'.*\[40\].*{shown}"):
            convert_lora(path, calibration=calibration, progress=False)
    with pytest.raises(ConfigError, match="max_batch"):
        convert_lora(path, max_batch=0, progress=False)
    with pytest.raises(ConfigError, match="target_bpw"):
        convert_lora(path, target_bpw=float("inf"), progress=False)
    for candidates in (["a"], [], 8, [0, 4]):
        with pytest.raises(ConfigError, match="rank_candidates"):
            convert_lora(path, target_bpw=12.0, rank_candidates=candidates, progress=False)


def test_calibration_refuses_negative_or_non_finite_moments_naming_their_module(tmp_path, input_ids):
    # A negative mean x² (e.g. mean x passed by mistake) was clamped to 0, silently: the conversion ran unweighted
    # where the vector was negative. A bad vector of a group's second layer was reported under the first's name.
    from lordba import ConversionError

    model, path = peft_adapter(tmp_path)
    paths = sorted(read_lora(path).layers)
    moments = collect_input_moments(model, [input_ids], paths)
    same_shape = [p for p in paths if moments[p].shape == moments[paths[-1]].shape]
    bad_path = same_shape[-1]  # converted in one group with the others of its shape, not first
    for bad in (-moments[bad_path], torch.full_like(moments[bad_path], float("nan"))):
        with pytest.raises(ConversionError, match=rf"{bad_path!r} must be finite and non-negative"):
            convert_lora(path, calibration={**moments, bad_path: bad}, progress=False)


def test_convert_lora_names_arguments_of_the_wrong_type(tmp_path):
    # config={...}: AttributeError 'dict' object has no attribute 'base_model_name_or_path'; adapter_name=3
    # (None: left out): TypeError from Path / int; options={...}: AttributeError.
    _, path = peft_adapter(tmp_path)
    for kwargs, field in (({"config": {"r": 4}}, "config"), ({"adapter_name": 3}, "adapter_name"),
                          ({"options": {"iters": 3}}, "options")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            convert_lora(path, progress=False, **kwargs)


def test_a_target_bpw_above_a_float32_lora_is_refused_at_once(tmp_path):
    """A huge --target-bpw once searched the uniform rank one rank at a time (1e9: over a billion steps, a hang)
    and then converted at that rank; it is refused before any work, naming the bound."""
    import time

    _, path = peft_adapter(tmp_path, r=8, lora_alpha=16)
    for target in (1e9, 32.5):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match="target_bpw must be at most 32"):
            convert_lora(path, target_bpw=target, progress=False)
        assert time.perf_counter() - start < 30
    _, report = convert_lora(path, target_bpw=32.0, rank_candidates=(1, 2), iters=0, progress=False)
    assert report.bpw_lora <= 32.0


def test_a_target_bpw_never_converts_or_chooses_a_rank_above_a_layers_limit(tmp_path):
    """v_proj (20×40) may not take r > 426 (its sign factors would outweigh ΔW in float32: convert_lora refuses
    r=427); a rank-64 LoRA at --target-bpw 12 gave it the uniform rank 597, and a candidate above the limit was
    converted too. The uniform rank is capped at each layer's limit, and a candidate above it is not tried; the bytes
    v's cap frees go to q_proj (40×40), up to its own limit 640."""
    _, path = peft_adapter(tmp_path, r=64, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="above 426"):
        convert_lora(path, r=427, progress=False)
    state, report = convert_lora(path, target_bpw=12.0, rank_candidates=(1, 500), method="init", progress=False)
    alloc = report.allocation
    assert alloc["uniform_rank"] == 640 and report.bpw_lora <= 12.0
    for p, rec in state.modules.items():
        limit = 32 * rec.in_features * rec.out_features // (rec.in_features + rec.out_features)
        assert rec.r == min(640, limit) and state.config.rank_for(p) == rec.r
        assert max(map(int, alloc["curves"][p])) <= limit
    save_converted(state, report, tmp_path / "out")
    assert read_adapter(tmp_path / "out").dims() == state.dims()


def test_a_uniform_rank_above_every_layers_limit_is_reported_at_the_rank_converted(tmp_path):
    """q_proj (40×40) takes at most r=640; a rank-64 LoRA at --target-bpw 20 has room for a uniform rank of 1029,
    and the report said "uniform rank 1029" (and listed it among the candidates) where every layer was converted
    and stored at 640. It says the rank the uniform allocation converts at."""
    _, path = peft_adapter(tmp_path, r=64, lora_alpha=64, target_modules=["q_proj"])
    state, report = convert_lora(path, target_bpw=20.0, rank_candidates=(1,), method="init", progress=False)
    alloc = report.allocation
    assert {rec.r for rec in state.modules.values()} == {640}
    assert alloc["uniform_rank"] == 640 and max(alloc["candidates"]) == 640
    assert "| budget: uniform rank 640, same |" in report.to_markdown()


def test_a_full_disk_while_saving_the_conversion_names_the_output_and_keeps_the_old_one(tmp_path):
    """The error named the temporary folder the save wrote into (``.out.lordba-tmp.PID.HEX``, gone by then), not the
    output the user named."""
    from full_disk import disk_full_after

    _, path = peft_adapter(tmp_path, r=4, lora_alpha=8)
    state, report = convert_lora(path, r=4, progress=False)
    save_converted(state, report, tmp_path / "out")
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    with disk_full_after(500), pytest.raises(ConversionError) as caught:
        save_converted(state, report, tmp_path / "out", overwrite=True)
    assert str(tmp_path / "out") in str(caught.value) and "lordba-tmp" not in str(caught.value)
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if "lordba-tmp" in p.name) == []
