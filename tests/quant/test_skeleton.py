"""A cached quantized base loaded without its float model (``lordba generate`` / ``lordba serve`` on a cache hit): the
same model bit for bit as ``from_pretrained`` then ``quantize_model_cached``, read from the same entry, with a peak
memory of the quantized base, not of the float model."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from lordba.quant.cache import cache_entries, quantize_model_cached
from lordba.quant.skeleton import load_cached_base

from conftest import TINY


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    """The CPU kernels of the usual cache, where a test moves it (``LORDBA_CACHE``): never built again."""
    from lordba import kernels
    from lordba.kernels.cpu import cache_root

    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(cache_root()))
    kernels.cpu_available()


def saved(folder: Path, tied: bool = False, **save) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, bos_token_id=1)
    model.save_pretrained(folder, **save)
    return folder


def today(folder: Path, backend: str, group: int, compute: str | None = None) -> torch.nn.Module:
    """What ``lordba generate`` loaded on every start: the float model, then its quantized layers."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return quantize_model_cached(model, folder, backend, 4, group, compute=compute)


def assert_same(old: torch.nn.Module, new: torch.nn.Module, input_ids: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(old(input_ids=input_ids).logits, new(input_ids=input_ids).logits)
    assert new.training is old.training is False
    assert new.lordba_quantization == old.lordba_quantization
    assert new.config.to_dict() == old.config.to_dict()
    assert new.generation_config.to_dict() == old.generation_config.to_dict()
    want, got = old.state_dict(), new.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert [p.requires_grad for p in new.parameters()] == [p.requires_grad for p in old.parameters()]
    tied = [getattr(m.lm_head, "weight", None) is m.model.embed_tokens.weight for m in (old, new)]
    assert tied[0] == tied[1]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("backend", "group"), [("q4", 32), ("hqq", 8)])
def test_a_cache_hit_loads_the_same_model_from_the_same_entry(tmp_path, monkeypatch, input_ids, backend, group, tied):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = saved(tmp_path / "model", tied)
    assert load_cached_base(folder, torch.float32, backend, 4, group) is None  # no entry yet
    today(folder, backend, group)
    entries = cache_entries()
    old = today(folder, backend, group)  # a hit
    new = load_cached_base(folder, torch.float32, backend, 4, group)
    assert new is not None and cache_entries() == entries  # the skeleton's key is the loaded model's
    assert_same(old, new, input_ids)


def test_a_sharded_checkpoint_is_read_by_its_index(tmp_path, monkeypatch, input_ids):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = saved(tmp_path / "model", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    today(folder, "q4", 32)
    old = today(folder, "q4", 32)
    new = load_cached_base(folder, torch.float32, "q4", 4, 32)
    assert new is not None
    assert_same(old, new, input_ids)


def test_an_adapter_on_the_loaded_base_gives_the_same_output(tmp_path, monkeypatch, input_ids):
    from lordba import LoRDBAConfig, get_lordba_model

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = saved(tmp_path / "model")
    outputs = []
    today(folder, "q4", 32)
    for base in (today(folder, "q4", 32, "fast"), load_cached_base(folder, torch.float32, "q4", 4, 32, compute="fast")):
        torch.manual_seed(3)
        lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"))
        lm.pack()
        with torch.no_grad():
            outputs.append(lm.eval()(input_ids=input_ids).logits)
    assert torch.equal(*outputs)


def test_what_it_does_not_build_as_from_pretrained_falls_back(tmp_path, monkeypatch):
    """A PyTorch ``.bin`` checkpoint, checkpoint keys transformers renames (``LayerNorm.gamma``: not the model's), a
    pre-quantized config: ``None`` (the caller loads the float model), never a model loaded otherwise."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = saved(tmp_path / "model")
    today(folder, "q4", 32)
    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.LayerNorm.gamma": torch.ones(1)}, folder / "model.safetensors", {"format": "pt"})
    assert load_cached_base(folder, torch.float32, "q4", 4, 32) is None
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert load_cached_base(folder, torch.float32, "q4", 4, 32) is None
    save_file(state, folder / "model.safetensors", {"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    assert load_cached_base(folder, torch.float32, "q4", 4, 32) is None
    assert load_cached_base(folder, torch.float32, "bnb", 4, 64) is None


def test_lordba_generate_and_serve_load_a_cache_hit_without_the_float_model(tmp_path, monkeypatch, capsys):
    from lordba.cli import main
    from lordba.serve.server import load_base
    from tiny_model import tiny_model_dir

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_dir(tmp_path / "model")
    argv = ["generate", "--model", str(folder), "--quant", "q4", "--group-size", "32", "--max-new-tokens", "4", "ab"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    served, _ = load_base(folder, quant="q4", group_size=32)

    def refused(*args, **kwargs):
        raise AssertionError("the float model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refused)
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    again, _ = load_base(folder, quant="q4", group_size=32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, again(input_ids=ids).logits)


_PEAK = """
import sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
import lordba.kernels, lordba.quant.cache, lordba.quant.q4, lordba.quant.skeleton, lordba.serve.server
def peak():  # bytes: the process's peak resident memory since the last reset
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
lordba.kernels.cpu_available()  # (the kernels' library: not the model's memory)
before = resident()
with open("/proc/self/clear_refs", "w") as f:  # the peak reset to the memory in use (the imports' own passed)
    f.write("5")
model, _ = lordba.serve.server.load_base(sys.argv[1], quant="q4", group_size=32)
assert model.base_model.lordba_quantization["backend"] == "q4"
print(peak() - before, resident() - before)
"""


@pytest.mark.long
def test_a_cache_hit_peaks_at_the_quantized_base_not_the_float_model(tmp_path, monkeypatch):
    """``load_base`` on a cache hit grew the process's peak memory by the whole float model and more: a 57M-parameter
    Llama saved in bfloat16 (as models are published), loaded in float32 (226 MB), grew it by 300 MB; now by the
    quantized base it reads. That base's 36 MB entry was then held twice at the peak, read whole and copied into the
    q4 weights' one buffer (81 MB above the memory in use before, 47 MB after); now once, read into that buffer (48
    MB)."""
    import lordba.quant.q4 as q4
    from tiny_model import char_tokenizer

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for p in model.parameters():  # values bfloat16 holds: the float32 model is the saved one, loaded
            p.copy_(p.to(torch.bfloat16))
    float_bytes = sum(p.nbytes for p in model.parameters())
    folder = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    model.float()
    fast = q4.Q4Linear.from_weight.__func__

    def unoptimised(cls, weight, bias=None, group_size=64, optimize=True, **kwargs):  # the entry, in seconds
        return fast(cls, weight, bias, group_size, False, **kwargs)

    monkeypatch.setattr(q4.Q4Linear, "from_weight", classmethod(unoptimised))
    quantize_model_cached(model, folder, "q4", 4, 32)
    del model
    assert len(cache_entries()) == 1
    env = {key: os.environ[key] for key in ("PATH", "LORDBA_CACHE", "LORDBA_KERNEL_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK), str(folder)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    grown, kept = (int(n) for n in run.stdout.split()[-2:])
    entry = cache_entries()[0][1]
    assert len(cache_entries()) == 1  # the entry was read, not written again
    assert grown < 0.5 * float_bytes, f"the peak grew {grown / 1e6:.0f} MB for a {float_bytes / 1e6:.0f} MB model"
    assert grown - kept < 0.25 * entry, f"the peak was {(grown - kept) / 1e6:.0f} MB above the model loaded"


def test_persistent_buffers_are_read_from_the_checkpoint(tmp_path, monkeypatch, input_ids):
    """Gemma 4's per-layer ``layer_scalar`` is a persistent buffer (the checkpoint holds it): the skeleton built it
    real, at its initial 1.0, and only meta tensors were read, so the model on a cache hit ran with every layer's
    scalar at 1 (logits 0.41 off in this tiny one)."""
    gemma4 = pytest.importorskip("transformers.models.gemma4")
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    config = gemma4.Gemma4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=0, vocab_size_per_layer_input=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = gemma4.Gemma4ForCausalLM(config)
    for layer in model.model.layers:
        layer.layer_scalar.fill_(0.25)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    today(folder, "q4", 32)
    old = today(folder, "q4", 32)
    new = load_cached_base(folder, torch.float32, "q4", 4, 32)
    assert new is not None
    assert [float(layer.layer_scalar) for layer in new.model.layers] == [0.25, 0.25]
    assert_same(old, new, input_ids.clamp(max=127))


def test_a_module_another_thread_builds_meanwhile_gets_real_parameters(tmp_path, monkeypatch, input_ids):
    """The skeleton was built with ``nn.Module.register_parameter`` patched for the whole process: a layer another
    thread built meanwhile (a server loading while a training thread builds layers) got its weight on the meta
    device."""
    import threading

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.nn.Module, "register_parameter", torch.nn.Module.register_parameter)  # (restored)
    folder = saved(tmp_path / "model")
    today(folder, "q4", 32)
    old = today(folder, "q4", 32)
    inside, built, other = threading.Event(), threading.Event(), {}
    from_config = AutoModelForCausalLM.from_config

    def meanwhile(*args, **kwargs):  # the skeleton being built, while the other thread builds its layer
        inside.set()
        assert built.wait(60)
        return from_config(*args, **kwargs)

    def build():
        assert inside.wait(60)
        other["layer"] = torch.nn.Linear(4, 4)
        built.set()

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", meanwhile)
    thread = threading.Thread(target=build)
    thread.start()
    new = load_cached_base(folder, torch.float32, "q4", 4, 32)
    thread.join()
    assert not other["layer"].weight.is_meta and not other["layer"].bias.is_meta
    assert new is not None
    assert_same(old, new, input_ids)


def test_two_skeletons_built_at_once_leave_modules_built_later_real(tmp_path, monkeypatch):
    """Two threads building skeletons at once, the first finishing first: the second restored the first one's patch,
    and every module the process built afterwards had meta parameters."""
    import threading

    import lordba.quant.skeleton as skeleton

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.nn.Module, "register_parameter", torch.nn.Module.register_parameter)  # (restored)
    folder = saved(tmp_path / "model")
    today(folder, "q4", 32)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    from_config, converted = AutoModelForCausalLM.from_config, skeleton._converted
    firsts, results = [], []

    def in_turn(*args, **kwargs):
        if not firsts:  # the first build waits inside for the second
            firsts.append(threading.get_ident())
            first_in.set()
            assert second_in.wait(60)
        else:  # the second leaves after the first
            second_in.set()
            assert first_out.wait(60)
        return from_config(*args, **kwargs)

    def out(model):
        if threading.get_ident() in firsts:
            first_out.set()
        return converted(model)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", in_turn)
    monkeypatch.setattr(skeleton, "_converted", out)

    def load():
        results.append(load_cached_base(folder, torch.float32, "q4", 4, 32))

    threads = [threading.Thread(target=load)]
    threads[0].start()
    assert first_in.wait(60)
    threads.append(threading.Thread(target=load))
    threads[1].start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(r is not None for r in results)
    assert not torch.nn.Linear(4, 4).weight.is_meta


def test_a_ctrl_c_anywhere_while_a_skeleton_is_built_leaves_later_modules_real(tmp_path):
    """Ctrl-C at each point where Python handles it in the skeleton's code while it builds one, its traceback kept (a
    notebook keeps the last one): a module this thread builds afterwards has real parameters (was: one in contextlib's
    ``__enter__`` as the meta-parameter block began, or at the start of its ``__exit__``, kept this thread counted as
    building while the traceback lived: every module it built meanwhile got meta parameters)."""
    import contextlib

    import lordba.quant.skeleton as skeleton
    from _interrupts import ctrl_c_at_each_check

    folder = saved(tmp_path / "model")
    files = {contextlib.__file__, skeleton.__file__}  # (not the model's build: the skeleton's code and its blocks')
    names = {"_skeleton", "_on_meta_while", "_parameters_on_meta", "<lambda>", "helper", "__enter__", "__exit__"}
    for attempt in ctrl_c_at_each_check(files, functions=names):
        with attempt:
            assert skeleton._skeleton(folder, torch.float32) is not None
            attempt.reached()
        assert not torch.nn.Linear(2, 2).weight.is_meta, attempt.n  # (attempt.error, its traceback, kept)
