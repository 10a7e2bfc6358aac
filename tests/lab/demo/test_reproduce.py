"""`lordba reproduce --quick` on the real model: the output contract, and the statistics helpers."""

import json

import pytest

from lordba.cli import main
from lordba.train import train_loop
from lordba_lab.demo.families import TRAINED_LORDBA
from lordba_lab.demo.reproduce import (
    LORDBA_ALLOCATED,
    LORDBA_ALLOCATED_CAL,
    LORDBA_CALIBRATED,
    LORDBA_PTQ,
    allocation_vs_uniform,
    spearman,
    summarize,
)


@pytest.mark.long
def test_quick_reproduce_writes_the_sweep(tmp_path):
    out = tmp_path / "rep"
    assert main(["reproduce", "--quick", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "reproduce.json").read_text())
    seeds = res["settings"]["seeds"]
    assert seeds == [0, 1]
    families = {(r["family"], r["label"]) for r in res["summary"]}
    assert {("LoRDBA ptq", "r=4"), ("LoRDBA ptq", "r=16"), ("LoRDBA ptq (float16 scales)", "r=16")} <= families
    assert {("LoRDBA qat", "r=16"), ("LoRDBA scales-only", "r=4"), ("fp16 LoRA", "r=16")} <= families
    assert ("fp16 LoRA (trained at matched bytes)", "r=1") in families
    assert {("LoRDBA ptq (int4 scales)", "r=4"), ("LoRDBA scales-only (int4 scales)", "r=4")} <= families
    for p in res["points"]:  # per-example results for the intervals: one per held-out example
        assert len(p["per_example"]["loss_sum"]) == len(p["per_example"]["correct"]) == 4
    for row in res["summary"]:
        assert (
            row["eval_loss_ci"][0] <= row["eval_loss_mean"] + 1e-9
            and row["eval_loss_ci"][1] >= row["eval_loss_mean"] - 1e-9
        )
    judged = {r["baseline"].split(" ")[0] for r in res["training_free_target"]}
    assert judged <= {"RTN", "LoRAQuant-style", "BitDelta-style", "fp16"} and judged
    trained = {r["series"]: r for r in res["trained_target"]}
    assert {"LoRDBA qat r=16", "LoRDBA scales-only r=4", "LoRDBA scales-only (int4 scales) r=4"} <= set(trained)
    assert all(r["verdict"] in ("matches", "behind") and r["eval_loss_diff_ci"] for r in trained.values())
    assert {"RTN", "LoRAQuant-style", "BitDelta-style", "fp16 LoRA (SVD-truncated)", "base"} <= {f for f, _ in families}
    for row in res["summary"]:
        assert row["n"] == (1 if row["family"] == "base" else len(seeds))
    ptq = {r["label"]: r for r in res["summary"] if r["family"] == "LoRDBA ptq"}
    assert ptq["r=4"]["bytes"] < ptq["r=16"]["bytes"] and ptq["r=16"]["bpw"] < 2.0
    assert len(res["conversion_layers"]) == 30 * len(seeds)  # q_proj of 30 layers, r=16, each seed
    assert -1.0 <= res["rmr_error_spearman"] <= 1.0
    alloc, calibrated, alloc_cal = res["allocation_vs_uniform"]  # at uniform r=4's file size, paired per seed
    assert [r["family"] for r in (alloc, calibrated, alloc_cal)] == [
        LORDBA_ALLOCATED,
        LORDBA_CALIBRATED,
        LORDBA_ALLOCATED_CAL,
    ]
    for row in (alloc, calibrated, alloc_cal):
        assert row["uniform_rank"] == 4 and row["seeds"] == len(seeds)
        assert row["allocated_file_bytes"] <= row["uniform_file_bytes"]
    assert (
        calibrated["allocated_file_bytes"] == calibrated["uniform_file_bytes"] and calibrated["rank_histogram"] is None
    )
    assert alloc["allocated_rel_error"] <= alloc["uniform_rel_error"] + 1e-9  # it minimises ΔW error
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["seed0.json", "seed1.json"]  # for --resume
    md = (out / "reproduce.md").read_text()
    assert "Spearman" in md and "against the uniform rank at the same file size" in md
    assert "Target 1: training-free LoRDBA" in md and "Target 2: trained LoRDBA" in md and "95% CI" in md
    for png in ("sweep.png", "error_vs_rmr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.long
def test_quick_reproduce_on_a_corpus_task_reports_held_out_loss_only(monkeypatch, tmp_path):
    import lordba_lab.demo.reproduce as rep

    first_batches = []  # scales-only's training: on the batches after the LoRA's with --scales-fresh-batches

    def recording(model, batcher, settings, *args, **kwargs):
        first_batches.append(settings.first_batch)
        return train_loop(model, batcher, settings, *args, **kwargs)

    monkeypatch.setattr(rep, "train_loop", recording)
    out = tmp_path / "sotu"
    args = ["reproduce", "--quick", "--quiet", "--seeds", "1", "--r16-only", "--task", "sotu", "--out", str(out)]
    assert main([*args, "--scales-fresh-batches"]) == 0
    res = json.loads((out / "reproduce.json").read_text())
    assert res["settings"]["demo"]["task"] == "sotu" and res["settings"]["ptq_ranks"] == [16]
    assert res["settings"]["scales_fresh_batches"] and first_batches == [rep.QUICK.demo.steps] * 2  # int8, int4
    assert "(scales-only 1 step on the batches after the fp16 LoRA's)" in (out / "reproduce.md").read_text()
    assert all(r["metric_mean"] is None and r["metric_ci"] is None for r in res["summary"])
    assert all(r["eval_loss_ci"] is not None for r in res["summary"])
    assert all("correct" not in p["per_example"] for p in res["points"])
    assert {r["family"] for r in res["summary"]} >= {"LoRDBA ptq (int4 scales)", "LoRDBA qat (int4 scales)"}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.long
def test_quick_sizes_only_reports_trained_lordba_against_the_trained_small_loras(tmp_path):
    out = tmp_path / "sizes"
    assert main(["reproduce", "--quick", "--quiet", "--seeds", "1", "--sizes-only", "--out", str(out)]) == 0
    res = json.loads((out / "reproduce.json").read_text())
    families = {(r["family"], r["label"]) for r in res["summary"]}
    assert ("fp16 LoRA", "r=16") in families and ("fp16 LoRA (trained at matched bytes)", "r=1") in families
    assert not {f for f, _ in families} & {"RTN", "LoRAQuant-style", "BitDelta-style", "fp16 LoRA (SVD-truncated)"}
    matched = res["trained_vs_matched_lora"]
    assert {r["series"] for r in matched} == {f"{f} {lab}" for f, lab in families if f in TRAINED_LORDBA}
    assert all(r["lora"] == "fp16 LoRA (trained at matched bytes) r=1" for r in matched)  # the only one (quick)
    assert res["conversion_layers"] == [] and res["rmr_error_spearman"] is None
    md = (out / "reproduce.md").read_text()
    assert "an fp16 LoRA trained at about its size" in md and "Spearman" not in md and "error_vs_rmr" not in md


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--seeds", "0"])
    assert exc.value.code == 2 and "--seeds: must be an integer >= 1" in capsys.readouterr().err


def test_summary_is_mean_and_sample_std_over_seeds():
    pts = [
        {"family": "X", "label": "a", "bytes": 10, "bpw": 1.0, "metric": m, "eval_loss": 2.0 * m, "seed": i}
        for i, m in enumerate((0.1, 0.3))
    ]
    (row,) = summarize(pts)
    assert (
        row["n"] == 2
        and row["metric_mean"] == pytest.approx(0.2)
        and row["metric_std"] == pytest.approx(0.1414, abs=1e-4)
    )
    assert row["eval_loss_mean"] == pytest.approx(0.4)


def test_spearman_ranks_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)


def test_allocation_is_paired_with_the_uniform_rank_of_the_same_seed():
    def pt(seed, family, label, loss, metric, err):
        at = {"at_rank": 8} if family == LORDBA_ALLOCATED else {}
        return {"seed": seed, "family": family, "label": label, "eval_loss": loss, "metric": metric,
                "rel_error": err, "file_bytes": 100, **at}  # fmt: skip

    pts = [pt(0, LORDBA_PTQ, "r=8", 1.0, 0.2, 0.5), pt(0, LORDBA_ALLOCATED, "at r=8's size", 0.9, 0.3, 0.4),
           pt(1, LORDBA_PTQ, "r=8", 1.2, 0.2, 0.5), pt(1, LORDBA_ALLOCATED, "at r=8's size", 1.3, 0.1, 0.4),
           pt(0, LORDBA_PTQ, "r=16", 0.5, 0.5, 0.3)]  # fmt: skip
    (row,) = allocation_vs_uniform(pts)
    assert row["uniform_rank"] == 8 and row["seeds"] == 2 and row["allocated_wins"] == 1
    assert row["family"] == LORDBA_ALLOCATED and row["variant"] == "per-layer ranks, ΔW error"
    assert row["loss_diff_mean"] == pytest.approx(0.0) and row["loss_diff_std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["metric_diff_mean"] == pytest.approx(0.0)


def test_all_sizes_trains_every_family_at_every_size(monkeypatch, tmp_path):
    import lordba_lab.demo.reproduce as rep

    seen = {}

    def fake(out, quick, seeds, progress, all_sizes, resume, r16_only, model, task, sizes_only, scales_fresh_batches):
        seen.update(quick=quick, all_sizes=all_sizes, resume=resume, r16_only=r16_only, model=model, task=task)
        seen.update(sizes_only=sizes_only, scales_fresh_batches=scales_fresh_batches)
        return {"points": []}

    monkeypatch.setattr(rep, "run_reproduce", fake)
    assert main(["reproduce", "--all-sizes", "--resume", "--quiet", "--out", str(tmp_path)]) == 0
    assert seen == {"quick": False, "all_sizes": True, "resume": True, "r16_only": False, "model": None, "task": None,
                    "sizes_only": False, "scales_fresh_batches": False}  # fmt: skip
    args = ["reproduce", "--r16-only", "--model", "gemma-3-270m", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0 and seen["r16_only"] and seen["model"] == "gemma-3-270m"
    assert rep.ALL_SIZES["qat_ranks"] == (4, 8, 16) and rep.ALL_SIZES["lora_small_ranks"] == (1, 2)
    assert main(["reproduce", "--sizes-only", "--quiet", "--out", str(tmp_path)]) == 0 and seen["sizes_only"]


def test_sizes_only_adds_what_all_sizes_adds_and_keeps_the_default_sweeps_kept_seeds(tmp_path):
    import dataclasses

    import lordba_lab.demo.reproduce as rep

    sizes = dataclasses.replace(rep.ReproduceSettings(), **rep.SIZES_ONLY)
    default = rep.ReproduceSettings()
    added = set(rep.ALL_SIZES["qat_ranks"]) - set(default.qat_ranks)
    assert set(sizes.qat_ranks) == added == set(sizes.scales_ranks) <= set(sizes.ptq_ranks)  # scales start from ptq
    assert sizes.lora_small_ranks == rep.ALL_SIZES["lora_small_ranks"] and not sizes.low_bit_baselines
    assert not (sizes.truncate_ranks or sizes.rtn_bits or sizes.qat_int4_ranks or sizes.allocated_at)
    # the field added with --sizes-only does not change the default sweep's key: its kept seeds still resume
    rep._keep_seed(tmp_path, default, 0, [], [])
    record = rep._kept_record(tmp_path, default, 0)
    assert record is not None and rep._kept_record(tmp_path, sizes, 0) is None
    assert record["settings_key"] == rep._settings_key(dataclasses.replace(default, low_bit_baselines=True))
    assert rep._settings_key(dataclasses.replace(default, low_bit_baselines=False)) != record["settings_key"]
    assert rep._settings_key(dataclasses.replace(default, scales_fresh_batches=True)) != record["settings_key"]


def test_trained_lordba_is_paired_with_the_trained_lora_of_nearest_size():
    from lordba_lab.demo.analysis import trained_vs_matched_lora
    from lordba_lab.demo.families import LORA, LORA_SMALL, LORDBA_QAT

    def pt(seed, family, label, nbytes, losses):
        per = {"loss_sum": losses, "tokens": [1] * len(losses), "correct": [0] * len(losses)}
        return {"seed": seed, "family": family, "label": label, "bytes": nbytes, "bpw": nbytes / 100,
                "eval_loss": sum(losses) / len(losses), "metric": 0.0, "per_example": per}  # fmt: skip

    pts = []
    for seed in (0, 1):
        pts += [pt(seed, LORA, "r=16", 1600, [0.1, 0.2, 0.1]), pt(seed, LORA_SMALL, "r=1", 100, [0.9, 0.8, 0.9]),
                pt(seed, LORA_SMALL, "r=2", 200, [0.5, 0.5, 0.6]), pt(seed, LORDBA_QAT, "r=8", 101, [0.4, 0.5, 0.4]),
                pt(seed, LORDBA_QAT, "r=16", 190, [0.7, 0.7, 0.8])]  # fmt: skip
    rows = {r["series"]: r for r in trained_vs_matched_lora(pts)}
    assert set(rows) == {"LoRDBA qat r=8", "LoRDBA qat r=16"}
    r8, r16 = rows["LoRDBA qat r=8"], rows["LoRDBA qat r=16"]
    assert r8["lora"].endswith("r=1") and r8["bytes_ratio"] == pytest.approx(1.01) and r8["verdict"] == "lower"
    assert r16["lora"].endswith("r=2") and r16["eval_loss_diff"] > 0 and r16["verdict"] == "higher"
    assert trained_vs_matched_lora([p for p in pts if p["family"] != LORA_SMALL]) == []


def test_a_finished_seed_is_kept_for_resume_under_the_same_settings_only(tmp_path):
    import dataclasses

    from lordba_lab.demo.reproduce import QUICK, _keep_seed, _kept_record, _kept_seed

    pts, layers = [{"seed": 1, "family": "X", "label": "a", "eval_loss": 0.5}], [{"seed": 1, "module": "m"}]
    assert _kept_seed(tmp_path, QUICK, 1) is None
    _keep_seed(tmp_path, QUICK, 1, pts, layers, seconds=12.5)
    assert _kept_seed(tmp_path, QUICK, 1) == (pts, layers) and _kept_record(tmp_path, QUICK, 1)["seconds"] == 12.5
    assert _kept_seed(tmp_path, dataclasses.replace(QUICK, seeds=(5,)), 1) == (
        pts,
        layers,
    )  # the seed list is not a setting
    assert _kept_seed(tmp_path, dataclasses.replace(QUICK, rtn_bits=(2,)), 1) is None  # other settings: rerun
    assert _kept_seed(tmp_path, QUICK, 0) is None
    (tmp_path / "seeds" / "seed1.json").write_text('{"settings_key": ')  # a torn file is not trusted
    assert _kept_seed(tmp_path, QUICK, 1) is None


def test_a_sweep_that_fails_writing_its_results_leaves_the_earlier_ones_whole(monkeypatch, tmp_path, capsys):
    """reproduce.json, reproduce.md and the plots are replaced whole or not at all: a write that failed
    half-way (a full disk, a kill) left a truncated file in place of the earlier sweep's."""
    import lordba_lab.demo.reproduce as rep
    from full_disk import disk_full_after

    class FakeDemo:  # the model, training and evaluation left out: only the writing is under test
        def __init__(self, out, settings, progress):
            self.eval_examples, self.keep_details = [], False

        def add_row(self, method, mode, nbytes, model):
            return {"method": method, "bytes": nbytes, "bpw": 0.0, "metric": 0.1, "eval_loss": 3.0}

    def one_seed(demo, settings, seed):
        points = [{"seed": seed, "family": LORDBA_PTQ, "label": f"r={r}", "bytes": 10 * r, "bpw": r / 8,
                   "metric": 0.5, "eval_loss": 1.0 + seed / r} for r in (4, 8, 16)]  # fmt: skip
        layers = [{"seed": seed, "module": f"l.{i}.q_proj", "rmr_A": 0.1 * i, "rmr_B": 0.2, "rel_error": 0.01 * i}
                  for i in range(4)]  # fmt: skip
        return points, layers

    monkeypatch.setattr(rep, "Demo", FakeDemo)
    monkeypatch.setattr(rep, "_one_seed", one_seed)
    rep.run_reproduce(tmp_path, quick=True, seeds=1, progress=False)
    files = ("reproduce.json", "reproduce.md", "sweep.png", "error_vs_rmr.png")
    before = {name: (tmp_path / name).read_bytes() for name in files}
    assert all(len(b) > 1000 for b in before.values()), {k: len(b) for k, b in before.items()}
    with disk_full_after(1000), pytest.raises(OSError):
        rep.run_reproduce(tmp_path, quick=True, seeds=2, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, "seeds"])  # no temporary file left
