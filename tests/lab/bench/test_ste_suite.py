"""The STE suite's machinery on a tiny model (the real-model measurement is ``lordba bench --suite ste``):
paired runs, the summary's statistics and verdict, the files written."""

import json

import pytest
import torch

from lordba_lab.bench import ste, suites

from conftest import tiny_llama


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 101, (3, 8), generator=g)
    return [
        {"input_ids": patterns[i].tolist(), "labels": patterns[i].tolist()}
        for i in torch.randint(0, 3, (n,), generator=g)
    ]


def test_the_suite_is_discovered_and_not_default():
    assert suites()["ste"] is ste and not ste.DEFAULT


def test_tiny_run_writes_a_paired_report(tmp_path):
    setup = ste.Setup(seeds=(0, 1), steps=3, batch_size=4, r=2, targets=("q_proj", "v_proj"))
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = ste.compare(model, rows(16, 0), rows(8, 1), setup, progress=False)
    assert model.state_dict().keys() == before.keys()  # unloaded again
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    runs = measured["runs"]
    assert [(r["seed"], r["ste"]) for r in runs] == [
        (0, "smoothsign"),
        (0, "identity"),
        (1, "smoothsign"),
        (1, "identity"),
    ]
    assert all(len(r["train_loss"]) == 3 and r["eval_loss"] < measured["base_eval_loss"] for r in runs)
    # same seed: same start and same batches, so the first step's loss (a = 0: the base) agrees
    assert runs[0]["train_loss"][0] == runs[1]["train_loss"][0]

    files = ste.write(tmp_path, ste.build_report(setup, measured, model="tiny"))
    assert [f.name for f in files] == ["ste.json", "ste.md", "ste.png"] and all(f.stat().st_size for f in files)
    report = json.loads((tmp_path / "ste.json").read_text())
    assert report["setup"]["steps"] == 3 and report["setup"]["model"] == "tiny" and report["setup"]["mode"] == "qat"
    assert set(report["summary"]["per_ste"]) == {"smoothsign", "identity"}
    smooth = report["summary"]["per_ste"]["smoothsign"]
    losses = [r["eval_loss"] for r in runs if r["ste"] == "smoothsign"]
    assert smooth["n"] == 2 and smooth["eval_loss_mean"] == pytest.approx(sum(losses) / 2)
    assert smooth["eval_loss_min"] == min(losses) and smooth["eval_loss_std"] > 0
    diffs = report["summary"]["paired_difference"]["per_seed"]
    assert diffs["0"] == pytest.approx(runs[1]["eval_loss"] - runs[0]["eval_loss"])
    assert "identity" in (tmp_path / "ste.md").read_text()


def test_the_verdict_needs_every_seed():
    def runs(pairs):
        return [
            {"seed": s, "ste": k, "eval_loss": v}
            for s, (a, b) in enumerate(pairs)
            for k, v in (("smoothsign", a), ("identity", b))
        ]

    assert ste.summarize(runs([(1.0, 1.2), (1.1, 1.3)]))["favours"] == "smoothsign"
    assert ste.summarize(runs([(1.3, 1.2), (1.4, 1.3)]))["favours"] == "identity"
    assert ste.summarize(runs([(1.0, 1.2), (1.4, 1.3)]))["favours"] is None
