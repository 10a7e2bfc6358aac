"""The lab's cache of quantized bases: a second quantization of the same model folder loads the
cached layers, equal to the first, for the HQQ and q4 bases."""

import threading
from pathlib import Path

import pytest
import torch

from lordba.quant import quantize_model
from lordba.quant.cache import quantize_model_cached
from quant.test_q4_base import float_weights_held_while_copied

from conftest import tiny_llama


@pytest.mark.parametrize(("backend", "group"), [("hqq", 8), ("q4", 32)])
def test_cached_base_equals_the_fresh_one(tmp_path, monkeypatch, backend, group, input_ids):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    fresh = quantize_model_cached(tiny_llama(0), folder, backend=backend, bits=4, group_size=group)
    files = list((tmp_path / "cache" / "quantized").glob("*.safetensors"))
    assert len(files) == 1
    cached = quantize_model_cached(tiny_llama(0), folder, backend=backend, bits=4, group_size=group)
    assert cached.lordba_quantization == fresh.lordba_quantization
    assert cached.lordba_quantization["head_bits"] == (8 if backend == "q4" else 0)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, cached(input_ids=input_ids).logits)
    if backend == "q4":  # the loaded weights held in one buffer, as quantize_model holds them
        weights = [m.qweight for m in cached.modules() if hasattr(m, "qweight")]
        assert len({w.untyped_storage().data_ptr() for w in weights}) == 1


def test_a_cache_that_cannot_be_written_warns_and_keeps_the_quantized_model(tmp_path, monkeypatch, input_ids):
    """The cache is a shortcut: a folder that cannot be made (a read-only or full disk, a file in the way)
    was an exception after the whole quantization (``lordba generate`` an internal error). Now a warning,
    the quantized model returned, no temporary file left behind."""
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "afile" / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    with pytest.warns(UserWarning, match="could not be written"):
        model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    fresh = quantize_model(tiny_llama(0), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)

    def full_disk(state, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lordba.quant.cache.save_file", full_disk)
    with pytest.warns(UserWarning, match="could not be written"):
        quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    assert list((tmp_path / "cache" / "quantized").iterdir()) == []


def test_two_threads_writing_one_entry_both_succeed(tmp_path, monkeypatch):
    """Writers in one process shared one temporary name (per process id): the first rename took the other's
    file, whose own rename then raised FileNotFoundError after its quantization."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    import lordba.quant.cache as cache

    both_written = threading.Barrier(2, timeout=60)
    real_save = cache.save_file

    def save_together(*args, **kwargs):
        real_save(*args, **kwargs)
        both_written.wait()

    monkeypatch.setattr(cache, "save_file", save_together)
    errors = []

    def run():
        try:
            quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
        except Exception as err:  # collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.suffix for p in (tmp_path / "cache" / "quantized").iterdir()] == [".safetensors"]


@pytest.mark.parametrize("backend", ["q4", "hqq"])
def test_the_cache_is_keyed_by_the_weights_dtype(tmp_path, monkeypatch, input_ids, backend):
    """A base quantized from the bfloat16 copy of a model was served to its float32 copy (and the other way
    round): other codes and scales than quantize_model gives that model."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    group = 32 if backend == "q4" else 8

    def load(dtype):
        return LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    quantize_model_cached(load(torch.bfloat16), folder, backend=backend, bits=4, group_size=group)
    cached = quantize_model_cached(load(torch.float32), folder, backend=backend, bits=4, group_size=group)
    fresh = quantize_model(load(torch.float32), backend, 4, group)
    with torch.no_grad():
        assert torch.equal(cached(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2


def test_a_model_loaded_with_fewer_layers_gets_its_own_entry(tmp_path, monkeypatch, input_ids):
    """The key named the folder, its files, the settings and the dtypes, not the model's layers: a model loaded
    from the folder with another config (``num_hidden_layers=1``, a common quick test) shared the full model's
    entry. The full model then loaded the short one's entry, which the q4 base did not check against its layers:
    the second block's projections stayed float32, silently."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    short = LlamaForCausalLM.from_pretrained(folder, num_hidden_layers=1).eval()
    quantize_model_cached(short, folder, backend="q4", bits=4, group_size=32)
    cached = quantize_model_cached(LlamaForCausalLM.from_pretrained(folder).eval(), folder, "q4", 4, 32)
    assert not any(type(m) is torch.nn.Linear for m in cached.modules())
    fresh = quantize_model(LlamaForCausalLM.from_pretrained(folder).eval(), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(cached(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2


def test_a_q4_entry_missing_a_layer_is_quantized_again(tmp_path, monkeypatch, input_ids):
    """A q4 entry whose layers are not the model's (a damaged or foreign file under the key) is refused before any
    layer is replaced, as an HQQ entry is; it loaded and left the missing layers unquantized."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    (path,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    state = load_file(path)
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.1.")}, path)
    with pytest.warns(UserWarning, match="could not be read"):
        model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    fresh = quantize_model(tiny_llama(0), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_an_entry_with_a_damaged_byte_is_quantized_again_never_loaded(tmp_path, monkeypatch, input_ids):
    """A byte of a cached weight changed on disk (a bad sector, a crash that zeroed a page) kept the file valid
    safetensors: it loaded as the model's weights. The entry's sha256 is checked; it is quantized again."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    fresh = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    (path,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="could not be read.*checksum"):
        model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    assert path.read_bytes() != bytes(data)  # written again


@pytest.mark.parametrize("cut", [4, 40, 400])
def test_a_truncated_entry_is_quantized_again_never_loaded(tmp_path, monkeypatch, input_ids, cut):
    """An entry cut short (a full disk, a copy interrupted): in its header, or in its tensors' bytes."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    fresh = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    (path,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut < 100 else data[:-cut])
    with pytest.warns(UserWarning, match="could not be read"):
        model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    assert path.read_bytes() == data  # written again


def test_a_cache_hit_reads_the_q4_weights_into_the_buffer_they_are_held_in(tmp_path, monkeypatch, input_ids):
    """The entry's q4 weights are read straight into one buffer laid out as ``hold_weights_together`` lays them out,
    which leaves them there: no second copy of them (read whole, then copied, they were held twice at the peak)."""
    import lordba.quant.q4 as q4
    from lordba._util.arena import held_together

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    fresh = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    copied = []
    monkeypatch.setattr(q4, "empty_views", lambda *a, **k: copied.append(a) or pytest.fail("copied again"))
    model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    layers = [m for m in model.modules() if isinstance(m, q4.Q4Linear)]
    assert held_together([layer._buffers[n] for layer in layers for n in ("qweight", "scale", "minus")], align=64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


@pytest.mark.parametrize(("backend", "group"), [("hqq", 32), ("q4", 32)])
def test_a_gpt2_base_is_cached_with_its_conv1d_projections(tmp_path, monkeypatch, backend, group):
    """GPT-2's ``Conv1D`` projections are quantized (as the ``nn.Linear`` of their transposed weight) and cached; the
    cached base loads without a warning and equals the fresh one."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=101, n_positions=16)).eval()

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    gpt2().save_pretrained(folder)
    ids = torch.randint(0, 101, (1, 5))
    fresh = quantize_model_cached(gpt2(), folder, backend=backend, bits=4, group_size=group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = quantize_model_cached(gpt2(), folder, backend=backend, bits=4, group_size=group)
    assert type(cached.transformer.h[0].attn.c_attn).__name__ == {"q4": "Q4Linear", "hqq": "LordbaHQQLinear"}[backend]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_a_cached_q4_base_is_built_on_the_device_of_the_layers_it_replaces(tmp_path, monkeypatch):
    """``quantize_model`` builds each q4 layer on its weight's device (``Q4Linear.from_weight``), and a cached HQQ layer
    is built on its linear's device; a cached q4 layer was built on the CPU whatever the model's device (``lordba-lab
    train`` moves the model to its device before quantizing): a GPU run's second start, the first to hit the cache,
    mixed CPU layers into a CUDA model. ``meta`` stands in for the accelerator here."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    model = quantize_model_cached(tiny_llama(0).to("meta"), folder, backend="q4", bits=4, group_size=32)
    layers = [m for m in model.modules() if type(m).__name__ == "Q4Linear"]
    assert layers and not any(type(m) is torch.nn.Linear for m in model.modules())
    devices = {t.device.type for m in layers for t in (*m.buffers(), *m.parameters())}
    assert devices == {"meta"}


def test_a_model_folder_of_pytorch_bin_weights_is_keyed_by_them(tmp_path, monkeypatch, input_ids):
    """The key named the folder's ``.safetensors`` and ``.json`` files only: a model saved as ``pytorch_model.bin``
    (transformers loads those too) whose weights were replaced (another checkpoint of the same shape, the config
    untouched) got the old weights' cached base, silently."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(tiny_llama(0).state_dict(), folder / "pytorch_model.bin")
    quantize_model_cached(LlamaForCausalLM.from_pretrained(folder).eval(), folder, backend="q4", bits=4, group_size=32)
    torch.save(tiny_llama(1).state_dict(), folder / "pytorch_model.bin")
    cached = quantize_model_cached(LlamaForCausalLM.from_pretrained(folder).eval(), folder, "q4", 4, 32)
    fresh = quantize_model(tiny_llama(1), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(cached(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_a_cached_q4_base_whose_tied_head_stays_float_is_read_back(tmp_path, monkeypatch):
    # An encoder-decoder's tied head stays float32 (quantize_model); the entry's layers were checked against a list
    # holding the head, so every later load warned "could not be read" and quantized the whole model again.
    import warnings

    from transformers import UMT5Config, UMT5ForConditionalGeneration

    def umt5():
        torch.manual_seed(0)
        config = UMT5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
        return UMT5ForConditionalGeneration(config).eval()

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    umt5().save_pretrained(folder)
    fresh = quantize_model_cached(umt5(), folder, backend="q4", group_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = quantize_model_cached(umt5(), folder, backend="q4", group_size=64)
    assert cached.lordba_quantization == fresh.lordba_quantization


def test_a_model_whose_vocabulary_was_resized_gets_its_own_entry(tmp_path, monkeypatch, input_ids):
    """The key named the quantizable layers' shapes, not the output head's, which the q4 entry holds: a model whose
    vocabulary was resized after loading (``resize_token_embeddings`` for added special tokens) got the entry of the
    folder's 101-token head, and gave 101 logits instead of 120, silently."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)

    def resized():
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        torch.manual_seed(5)
        model.resize_token_embeddings(120, mean_resizing=False)
        return model

    quantize_model_cached(LlamaForCausalLM.from_pretrained(folder).eval(), folder, "q4", 4, 32)
    cached = quantize_model_cached(resized(), folder, "q4", 4, 32)
    fresh = quantize_model(resized(), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(cached(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2


def test_an_entry_failing_part_way_leaves_the_model_as_it_was(tmp_path, monkeypatch, input_ids):
    """An entry whose checksum holds but one of whose later layers cannot be built (a tensor missing) was refused
    after the layers before it were replaced: the tied ``lm_head``, first in name order, was already the cached q4
    layer, so quantizing again left it untied in fact but ``tie_word_embeddings`` set, and recorded ``head_bits`` 0.
    Every layer is built before any is replaced."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lordba.quant.cache import _digest

    from conftest import TINY

    def tied():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tied().save_pretrained(folder)
    quantize_model_cached(tied(), folder, backend="q4", bits=4, group_size=32)
    (path,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    state = load_file(path)
    del state["model.layers.1.self_attn.v_proj::scale"]
    save_file(state, path, metadata={"sha256": _digest(state)})
    with pytest.warns(UserWarning, match="could not be read"):
        model = quantize_model_cached(tied(), folder, backend="q4", bits=4, group_size=32)
    fresh = quantize_model(tied(), "q4", 4, 32)
    assert model.lordba_quantization == fresh.lordba_quantization
    assert model.config.tie_word_embeddings is fresh.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_a_damaged_entry_in_a_read_only_cache_is_not_fatal(tmp_path, monkeypatch, input_ids):
    """A damaged entry that cannot be removed (a cache on a read-only file system) raised the ``OSError`` of its
    removal after the "quantizing again" warning: ``quantize_model_cached`` failed instead of quantizing uncached."""
    import errno

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    (path,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-100])  # truncated

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.warns(UserWarning, match="could not be read"):
        model = quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    fresh = quantize_model(tiny_llama(0), "q4", 4, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_a_partly_quantized_model_reads_back_its_own_entry(tmp_path, monkeypatch, input_ids):
    """A model quantized alike in part before (``quantize_model`` with ``skip``) was keyed by the layers left to
    quantize, but its entry held every q4 layer of the model: the next run's load refused it ("could not be read")
    and quantized and wrote it again, on every run. The entry holds the layers the call quantizes."""
    import warnings

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)

    def partly():
        return quantize_model(tiny_llama(0), "q4", 4, 32, skip=("down_proj",))

    fresh = quantize_model_cached(partly(), folder, backend="q4", bits=4, group_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = quantize_model_cached(partly(), folder, backend="q4", bits=4, group_size=32)
    assert not any(type(m) is torch.nn.Linear for m in cached.modules())
    with torch.no_grad():
        assert torch.equal(cached(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)


def test_the_cache_lists_its_entries_and_clears_them(tmp_path, monkeypatch):
    """Nothing evicted entries and nothing showed or removed them (a new one per model file change, setting and
    lordba version, each the size of the quantized model): ``cache_entries`` lists them with their sizes,
    ``clear_cache`` removes them (never another file of the folder) and the next call quantizes again."""
    from lordba.quant.cache import cache_entries, clear_cache

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    assert cache_entries() == [] and clear_cache() == 0  # no cache folder yet
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    for group in (32, 64):
        quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=group)
    entries = cache_entries()
    assert len(entries) == 2 and all(size == path.stat().st_size > 0 for path, size in entries)
    other = tmp_path / "cache" / "quantized" / ".a-writers-temporary-file"
    other.write_bytes(b"x")
    assert clear_cache() == sum(size for _, size in entries)
    assert cache_entries() == [] and other.exists()
    quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    assert len(cache_entries()) == 1


def test_a_cached_base_is_read_back_without_holding_the_float_layers_it_replaces(tmp_path, monkeypatch):
    """A cache hit kept the model's float layers (and the tensors read) alive through the copy of the q4 weights
    into one buffer: the float model's size plus two q4 copies at the peak (``quantize_model``'s own, alike)."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    quantize_model_cached(tiny_llama(0), folder, backend="q4", bits=4, group_size=32)
    held = float_weights_held_while_copied(
        monkeypatch, tiny_llama(0), lambda m: quantize_model_cached(m, folder, backend="q4", bits=4, group_size=32)
    )
    assert held == 0
