"""The issue's targets checked on synthetic sweeps: which baseline LoRDBA beats, which trained point matches."""

from lordba_lab.demo.analysis import allocation_vs_uniform, summarize, trained_target, training_free_target
from lordba_lab.demo.stats import compact_details

N = 200


def _series(family, label, nbytes, bpw, loss, rate, seeds=(0, 1, 2)):
    pts = []
    for s in seeds:
        k = int(rate * N)
        correct = [i < k for i in range(N)]
        losses = [loss + 0.05 * ((i * 7 + s) % 5 - 2) for i in range(N)]  # per-example noise, mean `loss`
        details = compact_details({"correct": correct, "loss_sum": losses, "tokens": [1] * N})
        pts.append({
            "seed": s, "family": family, "label": label, "bytes": nbytes, "bpw": bpw, "eval_loss": loss + 0.001 * s,
            "metric": k / N, "per_example": details,
        })  # fmt: skip
    return pts


def test_training_free_target_picks_the_best_lordba_at_or_below_each_baselines_bytes():
    pts = (
        _series("LoRDBA ptq", "r=8", 600, 1.0, 0.80, 0.8)
        + _series("LoRDBA ptq", "r=16", 900, 1.5, 0.70, 0.85)
        + _series("LoRAQuant-style", "2-bit head", 800, 1.34, 0.75, 0.8)
        + _series("BitDelta-style", "sign", 610, 1.0, 0.90, 0.5)
        + _series("RTN", "3-bit g64", 2100, 3.5, 0.60, 0.9)  # outside 0.75-2.5 BPW: not judged
    )
    rows = {r["baseline"]: r for r in training_free_target(pts)}
    assert set(rows) == {"LoRAQuant-style 2-bit head", "BitDelta-style sign"}
    lq = rows["LoRAQuant-style 2-bit head"]  # only r=8 fits in 800 bytes, and its loss is higher
    assert lq["lordba"] == "LoRDBA ptq r=8" and lq["verdict"] == "higher" and lq["eval_loss_diff"] > 0
    assert lq["smallest_lower"] is None
    bd = rows["BitDelta-style sign"]  # nothing at <= 610 bytes but r=8 (600)
    assert bd["lordba"] == "LoRDBA ptq r=8" and bd["verdict"] == "lower"
    assert bd["eval_loss_diff_ci"][1] < 0 and bd["metric_diff_ci"][0] > 0
    assert bd["smallest_lower"] == (1.0, "LoRDBA ptq r=8")


def test_a_baseline_smaller_than_every_lordba_point_has_no_comparison():
    pts = _series("LoRDBA ptq", "r=8", 600, 1.0, 0.8, 0.8) + _series(
        "fp16 LoRA (SVD-truncated)", "r=1", 500, 0.8, 1, 0.5
    )
    (row,) = training_free_target(pts)
    assert row["lordba"] is None and row["verdict"] == "no LoRDBA at <= its bytes"


def test_trained_target_matches_within_the_seed_spread_and_the_exact_match_interval():
    ref = _series("fp16 LoRA", "r=16", 9000, 16, 0.50, 0.90)
    close = _series("LoRDBA qat (int4 scales)", "r=16", 700, 1.27, 0.5005, 0.90)
    behind = _series("LoRDBA qat", "r=16", 900, 1.52, 0.60, 0.70)
    rows = {r["series"]: r for r in trained_target(ref + close + behind, ("fp16 LoRA", "r=16"))}
    assert rows["LoRDBA qat (int4 scales) r=16"]["verdict"] == "matches"
    assert rows["LoRDBA qat (int4 scales) r=16"]["in_target_size"]
    assert rows["LoRDBA qat r=16"]["verdict"] == "behind" and not rows["LoRDBA qat r=16"]["in_target_size"]
    assert rows["LoRDBA qat r=16"]["metric_diff_ci"][1] < 0


def test_summary_carries_intervals_around_the_mean():
    (row,) = summarize(_series("LoRDBA ptq", "r=8", 600, 1.0, 0.8, 0.8))
    lo, hi = row["metric_ci"]
    assert lo <= row["metric_mean"] <= hi and lo < hi
    lo, hi = row["eval_loss_ci"]
    assert lo < 0.8 < hi


def test_a_baseline_whose_size_varies_by_seed_is_judged_at_its_smallest():
    lq = _series("LoRAQuant-style", "2-bit head", 800, 1.34, 0.9, 0.5)
    lq[1]["bytes"] = 700  # one seed's adaptive head is smaller: a 750-byte LoRDBA does not fit
    pts = lq + _series("LoRDBA ptq", "r=8", 750, 1.2, 0.8, 0.8) + _series("LoRDBA ptq", "r=4", 650, 0.9, 0.85, 0.7)
    (row,) = training_free_target(pts)
    assert row["lordba"] == "LoRDBA ptq r=4" and row["verdict"] == "lower"


def test_a_size_that_varies_by_seed_is_summarized_as_its_mean_and_range():
    """LoRAQuant-style's adaptive head sizes vary by seed (860,820-868,560 bytes): the summary and the table
    reported seed 0's size and BPW as the series'."""
    from lordba_lab.demo.sweep_report import _bytes

    lq = _series("LoRAQuant-style", "2-bit head", 868_560, 1.34, 0.9, 0.5)
    for p, nbytes in zip(lq, (868_560, 860_820, 864_690)):
        p["bytes"], p["bpw"] = nbytes, nbytes / 648_000
    (row,) = summarize(lq)
    assert row["bytes"] == 864_690 and row["bytes_range"] == [860_820, 868_560]
    assert row["bpw"] == 864_690 / 648_000
    assert _bytes(row) == "864,690 (860,820–868,560)"
    (fixed,) = summarize(_series("LoRDBA ptq", "r=8", 600, 1.0, 0.8, 0.8))
    assert fixed["bytes"] == 600 and fixed["bytes_range"] == [600, 600] and _bytes(fixed) == 600
    (judged,) = training_free_target(lq + _series("LoRDBA ptq", "r=8", 600, 1.0, 0.8, 0.8))
    assert judged["baseline_bpw"] == 864_690 / 648_000


def test_the_conversion_variants_of_a_corpus_sweep_are_compared_on_loss_without_a_metric():
    """A task without a metric (``--task sotu``; its points' metric is None) with the default sweep's allocated
    and calibrated points: allocation_vs_uniform subtracted None from None, a TypeError after the whole sweep."""
    from lordba_lab.demo.families import LORDBA_ALLOCATED, LORDBA_PTQ
    from lordba_lab.demo.sweep_report import _allocation_table

    def pt(seed, family, label, loss, **extra):
        return {"seed": seed, "family": family, "label": label, "eval_loss": loss, "metric": None, "rel_error": 0.3,
                "file_bytes": 100, **extra}  # fmt: skip

    pts = [pt(s, LORDBA_PTQ, "r=8", 3.0 + s) for s in (0, 1)]
    pts += [pt(s, LORDBA_ALLOCATED, "at r=8's size", 2.9 + s, at_rank=8, rank_histogram={"8": 3}) for s in (0, 1)]
    (row,) = allocation_vs_uniform(pts)
    assert row["metric_diff_mean"] is None and row["allocated_wins"] == 2
    assert abs(row["loss_diff_mean"] + 0.1) < 1e-9
    table = "\n".join(_allocation_table([row]))
    assert "-0.1000 ± 0.0000" in table and "None" not in table
