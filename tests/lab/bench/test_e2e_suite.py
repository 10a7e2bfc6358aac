"""The ``e2e`` suite's machinery on a tiny random model, llama.cpp skipped (no SmolLM2, no llama.cpp)."""

import contextlib
import json
import sys

import pytest
import torch

from lordba import ConfigError
from lordba.kernels.q4 import amx_prefill_available
from lordba_lab.bench import _e2e_models, _e2e_report, _llama_cpp, e2e, suites


def test_the_suite_is_discovered_and_not_default():
    assert suites()["e2e"] is e2e and not e2e.DEFAULT


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    note = _llama_cpp.missing()
    assert note is not None and "skipped" in note and "lordba-lab[llamacpp]" in note


def test_the_llama_cpp_version_recorded_is_the_one_installed(monkeypatch):
    """bench.json's ``settings.llama_cpp_python`` said 0.3.36 (the release the suite was written with) whatever
    llama-cpp-python ran the llama.cpp rows; it is the installed one's version, ``None`` without it."""
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.99"))
    assert _llama_cpp.installed() == "0.3.99" != _llama_cpp.VERSION
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert _llama_cpp.installed() is None


def test_a_failed_llama_cpp_conversion_skips_its_rows_with_the_reason(monkeypatch, tmp_path):
    """With llama-cpp-python installed but its GGUF or LoRA conversion failing (pip offline, the converter's
    error), the suite ended before timing anything; the llama.cpp rows are skipped with the reason, as when
    llama-cpp-python is absent."""
    from lordba.errors import LoRDBAError

    def offline(*_):
        raise LoRDBAError("could not download llama-cpp-python==0.3.36 with pip: no network")

    monkeypatch.setattr(_llama_cpp, "missing", lambda: None)
    monkeypatch.setattr(_llama_cpp, "q4_0_gguf", lambda threads: tmp_path / "model.gguf")
    monkeypatch.setattr(_llama_cpp, "lora_gguf", offline)
    runners, note = e2e._llama_runners(tmp_path / "peft", tmp_path / "model", 2, 72)
    assert runners == {} and "llama.cpp rows skipped" in note and "no network" in note
    monkeypatch.setattr(_llama_cpp, "q4_0_gguf", offline)
    assert e2e._llama_runners(tmp_path / "peft", tmp_path / "model", 2, 72)[0] == {}


def test_unknown_base_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="e2e base must be one of"):
        _e2e_models.quantized(tiny_model, "gptq", None)


def test_prompt_is_the_text_repeated_to_length():
    class Tok:
        def __call__(self, text, add_special_tokens):
            assert text == _e2e_models.TEXT and not add_special_tokens
            return {"input_ids": [5, 6, 7]}

    assert _e2e_models.prompt_ids(Tok(), 8, 100) == [5, 6, 7, 5, 6, 7, 5, 6]
    ids = _e2e_models.prompt_ids(None, 20, 50)
    assert len(ids) == 20 and max(ids) < 50 and ids == _e2e_models.prompt_ids(None, 20, 50)


def test_the_adapters_agree_across_lordba_and_peft(tiny_model, tmp_path):
    lordba_dir, peft_dir = _e2e_models.save_adapters(tiny_model, 4, tmp_path)
    models = _e2e_models.variants(tiny_model, ("none", "q4"), lordba_dir, peft_dir, None)
    fast = ["fp32+LoRDBA fast"] if amx_prefill_available() else []  # the branch compute `fast`, where it runs
    assert list(models) == ["fp32", "fp32+LoRDBA", "fp32+LoRA", *fast, "q4", "q4+LoRDBA", "q4+LoRA"]
    ids = list(range(40))  # a prompt (more tokens than the sign path takes)
    logits = {k: _e2e_models.last_logits(m, ids) for k, m in models.items()}
    if fast:  # the same model with the prompt's branch in bfloat16: close to, not equal to, float32
        assert models["fp32+LoRDBA fast"].model is models["fp32+LoRDBA"]
        change = (logits["fp32+LoRDBA"] - logits["fp32"]).norm()
        assert 0 < (logits["fp32+LoRDBA fast"] - logits["fp32+LoRDBA"]).norm() < 1e-2 * change
    # the PEFT LoRA is the LoRDBA adapter's export: the same function up to its float16 factors
    assert torch.allclose(logits["fp32+LoRA"], logits["fp32+LoRDBA"], atol=1e-2, rtol=1e-2)
    assert not torch.allclose(logits["fp32+LoRDBA"], logits["fp32"], atol=1e-3)  # the adapter acts
    from lordba.quant.q4 import Q4Linear

    assert any(isinstance(m, Q4Linear) for m in models["q4+LoRA"].modules())  # PEFT wraps the q4 layers
    near = _e2e_models.closeness(logits["q4+LoRDBA"], logits["fp32+LoRDBA"])
    assert 0 < near["rel_l2"] < 0.5 and near["cosine"] > 0.8


def test_targets_compare_against_llama_cpp_and_fp32():
    def row(variant, decode, prefill, **extra):
        return {"variant": variant, "decode_s": decode, "prefill_s": prefill, **extra}

    rows = [
        row("fp32", 0.04, 0.5),
        row("fp32+LoRDBA", 0.042, 0.52, decode_overhead_paired=1.04, prefill_overhead_paired=1.02),
        row("q4", 0.02, 0.4, decode_vs_fp32=0.5, decode_vs_llama=1.6, prefill_vs_llama=0.8),
        row("q4+LoRDBA", 0.021, 0.41, decode_overhead_paired=1.06, prefill_overhead_paired=1.01,
            decode_vs_llama_lora=0.9, prefill_vs_llama_lora=1.0),
        row("fp32+LoRDBA fast", 0.042, 0.51, decode_overhead_paired=1.04, prefill_overhead_paired=1.06),
    ]  # fmt: skip
    got = {(t["target"], t["variant"]): t["met"] for t in _e2e_report.targets(rows)}
    assert got[("4-bit base decode <= 0.6x fp32 base", "q4")]
    assert got[("LoRDBA decode overhead <= 1.05x its base (paired)", "fp32+LoRDBA")]
    assert not got[("LoRDBA decode overhead <= 1.05x its base (paired)", "q4+LoRDBA")]
    assert got[("base + LoRDBA decode <= llama.cpp + LoRA", "q4+LoRDBA")]
    assert not got[("base decode <= 1.5x llama.cpp base", "q4")]
    assert got[("base prefill ahead of llama.cpp base", "q4")]
    assert not got[("base + LoRDBA prefill ahead of llama.cpp + LoRA", "q4+LoRDBA")]  # a tie is not ahead
    assert not got[("LoRDBA prefill overhead <= 1.05x its base (paired)", "fp32+LoRDBA fast")]  # prompts only
    assert len(got) == 2 + 1 + 3 + 4


@pytest.mark.long
def test_a_quick_run_on_a_tiny_model_writes_json_markdown_and_plot(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(e2e, "load_model", lambda: (tiny_model, None, None))
    monkeypatch.setattr(e2e, "interleaved", lambda fns, *a, **k: _quick(fns, k.get("after")))
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))  # the ahead-of-time packages
    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2
    files = e2e.run(tmp_path, quick=True, threads=threads, bases=("none", "q4"), compiled=("q4",))
    assert torch.get_num_threads() == before  # the suite's thread count does not outlive it
    assert [f.name for f in files] == ["bench.json", "bench.md", "e2e.png"]
    assert all(f.stat().st_size > 0 for f in files)
    out = json.loads(files[0].read_text())
    names = [x["variant"] for x in out["rows"]]
    fast = ["fp32+LoRDBA fast"] if amx_prefill_available() else []
    assert names == ["fp32", "fp32+LoRDBA", "fp32+LoRA", *fast, "q4", "q4+LoRDBA", "q4+LoRA", "q4 compiled",
                     "q4+LoRDBA compiled", "q4 aot", "q4+LoRDBA aot"]  # no llama.cpp rows  # fmt: skip
    assert out["settings"]["branch_compute"] == "exact" and out["settings"]["tile_unit"] == bool(fast)
    assert "llama.cpp rows skipped" in out["llama_cpp"] and "llama.cpp rows skipped" in capsys.readouterr().out
    by = {x["variant"]: x for x in out["rows"]}
    assert by["fp32"]["decode_vs_fp32"] == 1.0 and "decode_vs_llama" not in by["q4"]
    assert by["q4+LoRDBA"]["decode_overhead_paired"] > 0 and by["q4+LoRDBA"]["prefill_s"] > 0
    assert out["settings"]["threads"] == threads and out["settings"]["prompt_tokens"] == 64
    assert len(out["load_avg_before"]) == 3 and out["hardware"]["cores"]
    assert out["checks"]["lordba"]["q4"]["lordba_vs_fp32_lordba"]["cosine"] > 0.8
    assert out["checks"]["adapter_change_rel_l2"] > 0
    assert {t["variant"] for t in out["targets"]} == {"fp32+LoRDBA", *fast, "q4", "q4+LoRDBA", "q4 compiled",
                                                      "q4+LoRDBA compiled", "q4 aot", "q4+LoRDBA aot"}  # fmt: skip
    if fast:  # paired with the float32 base (its group), checked against the exact variant's logits
        assert by["fp32+LoRDBA fast"]["prefill_overhead_paired"] > 0
        assert 0 < out["checks"]["lordba"]["fp32"]["fast_vs_exact"]["rel_l2"] < 1e-2
    assert "| q4+LoRDBA |" in files[1].read_text()
    # decode in runs of steps: every variant, with its ratios and the adapter's overhead paired by round
    assert all(x["decode_run_s"] > 0 and x["decode_run_n"] == 2 for x in out["rows"])
    assert by["q4+LoRDBA"]["decode_run_overhead_paired"] > 0 and by["fp32+LoRDBA"]["decode_run_vs_fp32"] > 0
    assert "decode in runs ms/token" in files[1].read_text()
    # compiled rows: decode only, against their own compiled base and their eager selves; the same logits
    fast = by["q4+LoRDBA compiled"]
    assert fast["compiled"] and "prefill_s" not in fast and fast["decode_s"] > 0
    assert fast["decode_overhead_paired"] > 0 and fast["decode_vs_eager_paired"] > 0
    for name in ("q4 compiled", "q4+LoRDBA compiled"):
        check = out["checks"]["compiled"][name]
        assert check["compile_s"] > 0 and check["vs_eager"]["top1_same"] and check["max_abs_diff"] < 1e-3
        assert check["graphs"] >= 1  # it did compile (not the eager model under another name)
    assert "| q4+LoRDBA compiled | — | — |" in files[1].read_text()
    # ahead-of-time rows: decode only, compiled once each, the eager logits
    ahead = by["q4+LoRDBA aot"]
    assert "prefill_s" not in ahead and ahead["decode_s"] > 0 and ahead["decode_vs_eager_paired"] > 0
    for name in ("q4 aot", "q4+LoRDBA aot"):
        check = out["checks"]["compiled"][name]
        assert check["compile_s"] > 0 and check["export_s"] > 0 and check["vs_eager"]["top1_same"]
        # against the eager step on a float32 cache: the default float16 cache's rounding, no more (on this
        # random tiny model ~5e-3; a wrong position or a stale cache moves the logits by O(1))
        assert check["kv_dtype"] == "float16" and 0 < check["vs_eager"]["rel_l2"] < 1e-2
    assert len(list((tmp_path / "cache" / "aot").glob("step-*.pt2"))) == 2


def _quick(fns, after):
    """:func:`._timing.interleaved` with three timed rounds and no budget (the machinery, not timings)."""
    from lordba_lab.bench import _timing

    return _timing.interleaved(fns, 0.0, min_reps=3, max_reps=3, after=after)


def test_rows_take_ratios_against_fp32_and_llama_cpp():
    from lordba_lab.bench._timing import stats

    medians = {"fp32": 4.0, "fp32+LoRDBA": 4.2, e2e.LLAMA: 2.0, e2e.LLAMA_LORA: 3.0}
    st = {k: stats([v] * 4) for k, v in medians.items()}
    rows = {x["variant"]: x for x in e2e._rows({"prefill": st, "decode": st})}
    assert set(rows) == {"fp32", "fp32+LoRDBA", e2e.LLAMA, e2e.LLAMA_LORA}
    ours = rows["fp32+LoRDBA"]
    assert ours["engine"] == "lordba" and ours["base"] == "fp32" and ours["adapter"] == "LoRDBA"
    assert ours["decode_vs_fp32"] == pytest.approx(1.05) and ours["decode_vs_llama"] == pytest.approx(2.1)
    assert ours["decode_vs_llama_lora"] == pytest.approx(1.4) and ours["decode_overhead_paired"] == pytest.approx(1.05)
    theirs = rows[e2e.LLAMA_LORA]
    assert theirs["engine"] == "llama.cpp" and theirs["base"] == e2e.LLAMA
    assert theirs["prefill_overhead_paired"] == pytest.approx(1.5) and "prefill_overhead_paired" not in rows["fp32"]


def test_decode_in_runs_gets_its_own_columns_ratios_and_overheads():
    from lordba_lab.bench._timing import stats

    medians = {"q4": 8.0, "q4+LoRDBA": 8.4, e2e.LLAMA: 10.0, e2e.LLAMA_LORA: 13.0}
    single = {k: stats([v] * 4) for k, v in medians.items()}
    runs = {"q4": stats([6.0, 7.0]), "q4+LoRDBA": stats([6.6, 7.7]), e2e.LLAMA: stats([9.0, 9.0]),
            e2e.LLAMA_LORA: stats([12.0, 12.0])}  # fmt: skip
    rows = e2e._rows({"decode": single, "decode_run": runs})
    ours = {x["variant"]: x for x in rows}["q4+LoRDBA"]
    assert ours["decode_overhead_paired"] == pytest.approx(1.05)  # the single steps'
    assert ours["decode_run_overhead_paired"] == pytest.approx(1.1)  # the runs', round by round
    assert ours["decode_run_vs_llama_lora"] == pytest.approx(7.15 / 12.0)
    table = _e2e_report.markdown_table(_e2e_report.COLUMNS, _e2e_report._table(rows))
    assert "| 7,150 | 0.794 | 0.596 | 1.100 |" in table  # runs ms/token, / llama.cpp, / llama.cpp+LoRA, overhead


def test_pair_groups_put_each_base_with_its_own_adapters():
    names = ["fp32", "fp32+LoRDBA", "fp32+LoRA", "q4", "q4+LoRDBA", e2e.LLAMA, e2e.LLAMA_LORA, "q4 compiled",
             "q4+LoRDBA compiled", "q4 aot", "q4+LoRDBA aot", "hqq+LoRDBA", "hqq aot"]  # fmt: skip
    assert e2e.pair_groups(names) == {
        "fp32": ["fp32", "fp32+LoRDBA", "fp32+LoRA"],
        "q4": ["q4", "q4+LoRDBA"],
        e2e.LLAMA: [e2e.LLAMA, e2e.LLAMA_LORA],
        "q4 compiled": ["q4 compiled", "q4+LoRDBA compiled"],
        "q4 aot": ["q4 aot", "q4+LoRDBA aot"],
    }  # an adapter without its base, a base without adapters: no group


def test_overheads_come_from_the_pairs_run_where_there_is_one():
    from lordba_lab.bench._timing import stats

    st = {k: stats([v] * 4) for k, v in {"q4": 2.0, "q4+LoRDBA": 2.4, "fp32": 4.0, "fp32+LoRDBA": 4.4}.items()}
    pairs = {"decode": {"q4": stats([2.0, 2.0, 2.0, 2.0]), "q4+LoRDBA": stats([2.1, 2.1, 2.1, 2.1])}}
    rows = {x["variant"]: x for x in e2e._rows({"decode": st}, pairs)}
    assert rows["q4+LoRDBA"]["decode_overhead_paired"] == pytest.approx(1.05)  # the pairs run's
    assert rows["q4+LoRDBA"]["decode_s"] == pytest.approx(2.4)  # medians: the run of all variants
    assert rows["fp32+LoRDBA"]["decode_overhead_paired"] == pytest.approx(1.1)  # no pair: the shared run's
    assert rows["q4+LoRDBA"]["decode_overhead_ci"] == pytest.approx([1.05, 1.05])  # its interval, same run
    assert "decode_overhead_ci" not in rows["q4"]


def test_overhead_targets_carry_their_interval_into_the_report():
    rows = [
        {"variant": "q4", "decode_s": 0.02, "prefill_s": 0.4},
        {"variant": "q4+LoRDBA", "decode_s": 0.021, "prefill_s": 0.41, "decode_overhead_paired": 1.06,
         "decode_overhead_ci": [1.04, 1.08], "prefill_overhead_paired": 1.01, "prefill_overhead_ci": [1.0, 1.02]},
    ]  # fmt: skip
    found = {t["target"]: t for t in _e2e_report.targets(rows)}
    decode = found["LoRDBA decode overhead <= 1.05x its base (paired)"]
    assert decode["ci"] == [1.04, 1.08] and not decode["met"]  # the verdict is the median's
    assert _e2e_report._measured(decode) == "1.060 [1.040, 1.080]"


@pytest.mark.slow
def test_smollm2_compiled_decode_equals_eager_on_q4_with_and_without_the_adapter(tmp_path):
    """The real model (its compile takes 1-2 min on 2 cores): greedy tokens identical, logits
    allclose, compiled against eager, on the q4 base, with a LoRDBA adapter and with it disabled."""
    from lordba.nn.decode import FastDecode
    from lordba.nn.model import LoRDBAModel

    model, tok, source = e2e.load_model()
    lordba_dir, _ = _e2e_models.save_adapters(model, 16, tmp_path, alpha=32.0)
    lm = LoRDBAModel.from_pretrained(_e2e_models.quantized(model, "q4", source), lordba_dir).eval()
    ids = torch.tensor([_e2e_models.prompt_ids(tok, 40, 49152)])
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, min_new_tokens=12)
    kw.update(attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id)

    def greedy(decode=None):
        with torch.no_grad():
            out = decode.generate(ids, 12, **kw) if decode else lm.generate(input_ids=ids, max_new_tokens=12, **kw)
        return out.sequences, torch.stack(out.logits)

    torch._dynamo.reset()
    decode = FastDecode(lm)
    for disabled in (False, True):
        with lm.disable_adapter() if disabled else contextlib.nullcontext():
            want, got = greedy(), greedy(decode)
        assert torch.equal(got[0], want[0]), disabled
        torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-3)
    assert decode.compiled and decode.failure is None
    torch._dynamo.reset()


def test_instruction_set_limits_are_recorded_and_reported(monkeypatch):
    """A run made with the instruction sets limited (an AVX2 machine measured on a newer one) says so in its
    JSON and its report; an unlimited run says nothing of it."""
    from lordba_lab.bench import ISA_LIMITS, hardware
    from lordba_lab.bench._e2e_report import _limits

    for name in ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert hardware()["isa_limits"] == {} and _limits(hardware()) == ""
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("LORDBA_CPU_ARCH", "x86-64-v3")
    hw = hardware()
    assert hw["isa_limits"] == {"LORDBA_CPU_ARCH": "x86-64-v3", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert "`MKL_ENABLE_INSTRUCTIONS=AVX2`" in _limits(hw) and "`LORDBA_CPU_ARCH=x86-64-v3`" in _limits(hw)
