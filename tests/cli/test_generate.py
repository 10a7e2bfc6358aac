"""``lordba generate`` and ``lordba chat``: the streamed text is the model's own greedy output, with
and without an adapter; timing goes to stderr; bad input exits 3."""

import io
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lordba import LoRDBAConfig, get_lordba_model
from lordba.cli import main
from tiny_model import tiny_model_dir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def greedy(model, tok, text, n, special=True):
    ids = tok(text, return_tensors="pt", add_special_tokens=special).input_ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_greedy_completion(folder, capsys):
    tok = AutoTokenizer.from_pretrained(folder)
    want = greedy(AutoModelForCausalLM.from_pretrained(folder).eval(), tok, "ab", 6)
    assert main(["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "6", "ab"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n"
    assert "time to first token" in err and "tokens/s" in err


def test_one_generated_token_gives_no_rate_rather_than_nan(folder, capsys):
    """A single generated token (max 1, or an end of sequence first) printed "nan tokens/s"."""
    assert main(["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "1", "ab"]) == 0
    err = capsys.readouterr().err
    assert "[1 tokens;" in err and "nan" not in err and "no decode rate" in err


@pytest.mark.long
def test_generate_with_an_adapter_on_a_q4_base(folder, tmp_path, capsys, monkeypatch):
    from lordba.quant import quantize_model

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))  # the quantized base is cached there
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(1)
    base = quantize_model(AutoModelForCausalLM.from_pretrained(folder).eval(), backend="q4", group_size=64)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"))
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.scale_out.mul_(300)  # an adapter that changes the greedy text
    lm.save_pretrained(tmp_path / "adapter")
    want = greedy(lm.eval(), tok, "ab", 6)
    argv = ["generate", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "6", "ab"]
    assert main(argv) == 0
    assert capsys.readouterr().out == want + "\n"
    import lordba.quant

    calls = []
    real = lordba.quant.set_compute
    monkeypatch.setattr(lordba.quant, "set_compute", lambda m, c: calls.append(c) or real(m, c))
    assert main([*argv[:-1], "--q4-compute", "exact", "ab"]) == 0
    assert calls == ["exact"] and capsys.readouterr().out == want + "\n"
    from lordba import kernels

    real_with = kernels.with_branch_compute
    monkeypatch.setattr(kernels, "with_branch_compute", lambda c: calls.append(c) or real_with(c))
    monkeypatch.delenv(kernels.BRANCH_COMPUTE_ENV, raising=False)
    before = kernels.branch_compute()
    assert main([*argv[:-1], "--branch-compute", "exact", "ab"]) == 0
    assert main(argv) == 0  # the runtime's default
    monkeypatch.setenv(kernels.BRANCH_COMPUTE_ENV, "exact")
    assert main(argv) == 0
    assert calls == ["exact", "exact", "fast", "exact"] and capsys.readouterr().out == (want + "\n") * 3
    assert kernels.branch_compute() == before  # the command's setting does not outlive it
    monkeypatch.setenv(kernels.BRANCH_COMPUTE_ENV, "bf16")
    assert main(argv) == 3 and "LORDBA_BRANCH_COMPUTE='bf16'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    assert main([*argv[:-1], "--aot", "ab"]) == 0  # ahead-of-time compiled decode step: the same text
    captured = capsys.readouterr()
    assert captured.out == want + "\n" and "compiled in" in captured.err and "exported in" in captured.err
    assert list((tmp_path / "cache" / "aot").glob("step-*.pt2"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: 1 / 0)  # a failing loader
    assert main([*argv[:-1], "--aot", "ab"]) == 0  # decodes eagerly instead
    captured = capsys.readouterr()
    assert captured.out == want + "\n" and "ZeroDivisionError" in captured.err


def test_generate_compile_streams_the_eager_text_and_falls_back_when_compiling_fails(
    folder, tmp_path, capsys, monkeypatch
):
    """--compile (static cache + inductor) prints the eager greedy text; with a broken compiler it says
    so on stderr and still prints the same text, decoded eagerly."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()
    argv = ["generate", "--model", str(folder), "--max-new-tokens", "8", "ab"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == want and "decode step compiled in" in err
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    torch._dynamo.reset()
    assert main([*argv, "--compile"]) == 0
    out, err = capsys.readouterr()
    said = "[compiled decoding failed (RuntimeError: no compiler); decoding eagerly instead]"
    assert out == want and err.count(said) == 1 and err.count("decoding eagerly") == 1  # said once, not twice
    torch._dynamo.reset()


def test_a_compiled_generate_failing_before_any_text_is_rerun_eagerly(folder, capsys, monkeypatch):
    """If compiled generation fails after a successful warm-up (e.g. a recompile), before any text
    was written, the answer is generated again eagerly; the thread's error never hangs the stream."""
    from lordba.nn.decode import FastDecode

    argv = ["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "6", "ab"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    monkeypatch.setattr(FastDecode, "prepare", lambda self, tokens: True)  # "compiled" without compiling
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("recompile failed")))
    torch._dynamo.reset()
    assert main([*argv, "--compile"]) == 0
    out, err = capsys.readouterr()
    said = "[compiled decoding failed (RuntimeError: recompile failed); decoding eagerly instead]"
    assert out == want and err.count(said) == 1 and err.count("decoding eagerly") == 1


def test_chat_answers_each_turn_with_the_template(folder, monkeypatch, capsys):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    want = greedy(model, tok, text, 5, special=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", "--model", str(folder), "--quant", "none", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_chat_reads_a_crlf_line_as_the_line(folder, monkeypatch, capsys):
    """stdin keeps a file's CRLF line ends on Linux: ``lordba chat < turns.txt`` sent each turn ending in "\r"."""
    from lordba.cli import chat_cmd

    sent = []
    fit = chat_cmd.fit_conversation
    monkeypatch.setattr(
        chat_cmd,
        "fit_conversation",
        lambda loaded, messages, *a: sent.append(messages[-1]) or fit(loaded, messages, *a),
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\r\n/exit\r\n"))
    assert main(["chat", "--model", str(folder), "--quant", "none", "--max-new-tokens", "5"]) == 0
    assert sent == [{"role": "user", "content": "hi"}]


def test_bad_model_or_adapter_exits_3(folder, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 3
    assert main(["generate", "--model", str(folder), "--quant", "none", "--adapter", str(tmp_path), "x"]) == 3
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
    ],
)
def test_bad_sampling_options_are_usage_errors(folder, option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(folder), option, value, "x"])
    assert info.value.code == 2 and option in capsys.readouterr().err


def test_the_largest_seed_torch_takes_samples_and_one_more_is_refused_before_loading(folder, capsys):
    """``--seed 18446744073709551616`` (2**64) passed argparse, loaded the model and then overflowed in
    ``torch.manual_seed``: an internal error (exit 1). The largest seed torch takes samples; one more is a usage
    error."""
    argv = ["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "2", "--temperature", "0.7"]
    assert main([*argv, "--seed", str(2**64 - 1), "ab"]) == 0
    assert "internal error" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*argv, "--seed", str(2**64), "ab"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--seed" in err and str(2**64 - 1) in err


def test_a_temperature_below_float32s_range_samples_greedily_rather_than_failing(folder, capsys):
    """``--temperature 1e-40`` (any number > 0 is taken, as lordba serve takes it) made ``generate``'s warper divide
    the float32 logits into inf and the sampling fail: an internal error (exit 1). It samples the greedy text, as the
    server does for such a temperature."""
    argv = ["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "6", "ab"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    for temperature in ("1e-40", "1e-38"):
        assert main([*argv[:-1], "--temperature", temperature, "--top-p", "0.9", "ab"]) == 0
        out, err = capsys.readouterr()
        assert out == want and "internal error" not in err, temperature


def test_a_folder_that_is_no_model_exits_3(tmp_path, capsys):
    """A folder without a transformers model (empty, or holding something else) is invalid input, not an
    internal error."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "other"):
        assert main(["generate", "--model", str(bad), "--quant", "none", "x"]) == 3
        err = capsys.readouterr().err
        assert str(bad) in err and "config.json" in err and "internal error" not in err


def test_chat_templates_missing_or_refusing_the_messages_exit_3(folder, tmp_path, capsys, monkeypatch):
    """``generate --chat-template`` on a tokenizer without a template, and a template that raises on the
    conversation (``chat --system`` where it has no system role), are invalid input naming the model."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    assert main(["generate", "--model", str(plain), "--quant", "none", "--chat-template", "ab"]) == 3
    err = capsys.readouterr().err
    assert "no chat template" in err and str(plain) in err and "internal error" not in err
    strict = tmp_path / "strict"
    shutil.copytree(folder, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(strict), "--quant", "none", "--system", "be brief"]) == 3
    err = capsys.readouterr().err
    assert "no system role" in err and "internal error" not in err


def test_chat_on_a_tokenizer_without_a_template_is_refused_before_the_model_loads(folder, tmp_path, capsys):
    """``lordba chat`` checked for a chat template only after loading the whole base (Gemma-3-270m: about 30 s
    before the error); the tokenizer is checked first. The folder's weights are gone here, so a check after the
    model's load would fail on them ("cannot load") instead of naming the template."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    for weights in plain.glob("*.safetensors"):
        weights.unlink()
    assert main(["chat", "--model", str(plain), "--quant", "none"]) == 3
    err = capsys.readouterr().err
    assert "no chat template" in err and str(plain) in err and "internal error" not in err


def test_an_empty_prompt_exits_3(folder, capsys):
    assert main(["generate", "--model", str(folder), "--quant", "none", ""]) == 3
    err = capsys.readouterr().err
    assert "PROMPT has no tokens" in err and "internal error" not in err


def test_text_that_is_not_utf8_exits_3(folder, capsys, monkeypatch):
    """Bytes that are not UTF-8 reach Python as lone surrogates (sys.argv, a stdin read with
    surrogateescape) or as a UnicodeDecodeError (a strict stdin): a clear error either way."""
    assert main(["generate", "--model", str(folder), "--quant", "none", "a\udcffb"]) == 3
    err = capsys.readouterr().err
    assert "PROMPT is not UTF-8 text" in err and "internal error" not in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\udcff\n"))
    assert main(["chat", "--model", str(folder), "--quant", "none"]) == 3
    err = capsys.readouterr().err
    assert "stdin is not UTF-8 text" in err and "internal error" not in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\xff\n"), encoding="utf-8", errors="strict"))
    assert main(["chat", "--model", str(folder), "--quant", "none"]) == 3
    err = capsys.readouterr().err
    assert "stdin is not UTF-8 text" in err and "internal error" not in err


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 of 32 positions (learned positions: one past the context is an index error)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_model import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32, **ids)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generation_stays_within_the_models_context(gpt2_folder, capsys):
    """The default number of new tokens is capped by what the context leaves (said on stderr); an explicit
    number that does not fit, or a prompt that fills the context, is refused before generating (as
    ``lordba serve`` refuses such a request)."""
    tok = AutoTokenizer.from_pretrained(gpt2_folder)
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    base = ["generate", "--model", str(gpt2_folder), "--quant", "none"]
    assert main([*base, "abcd"]) == 0  # the default, 128 new tokens: 28 fit
    out, err = capsys.readouterr()
    assert out == greedy(model, tok, "abcd", 28) + "\n" and "at most 28 new tokens" in err
    assert main([*base, "--max-new-tokens", "28", "abcd"]) == 0
    assert capsys.readouterr().out == out
    assert main([*base, "--max-new-tokens", "29", "abcd"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and "--max-new-tokens 29 does not fit" in err and "internal error" not in err
    assert main([*base, "x" * 32]) == 3
    out, err = capsys.readouterr()
    assert out == "" and "context is 32 tokens" in err and "internal error" not in err


def test_a_long_chat_drops_its_oldest_turns_and_a_message_that_cannot_fit_is_skipped(folder, monkeypatch, capsys):
    """The conversation grows with each turn: once it no longer leaves room for the answer in the model's context
    (128 positions here), its oldest turns are dropped (said on stderr) and the chat goes on; a message that does
    not fit even alone is refused with a message naming the context, and the chat goes on without it, its earlier
    turns kept."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    users = [f"q{i} " * 10 for i in range(4)]  # 38 tokens each in the template: two turns fit with 10 new, not three
    lines = [users[0], users[1], "x" * 130, users[2], users[3], "/exit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", "--model", str(folder), "--quant", "none", "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    want, kept = [], []
    for user in users:  # each answer sees the turn before it and its own message
        kept = [*kept[-2:], {"role": "user", "content": user}]
        text = tok.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
        want.append(greedy(model, tok, text, 10, special=False))
        kept.append({"role": "assistant", "content": want[-1]})
    assert out == "".join(w + "\n" for w in want)
    assert err.count("[dropped the 1 oldest turn of the conversation: the model's context is 128 tokens]") == 2
    assert "this message does not fit" in err and "149 tokens" in err and "--max-new-tokens 10" in err
    assert "internal error" not in err


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: the ▁ metaspace, byte fallback, one leading space stripped where decoding starts."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁▁", "▁▁▁▁", "x", ":", "▁x", "▁=", "▁1", "▁caf"]
    pieces += ["<0x0A>", "<0xC3>", "<0xA9>"]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tk.decoder = decoders.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def sentencepiece_model(folder, monkeypatch, pieces):
    """A tiny Llama with :func:`sentencepiece_tokenizer` saved in ``folder``, whose ``generate`` "generates"
    ``pieces``; returns the tokenizer and the ids of ``pieces``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = sentencepiece_tokenizer()
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=1, **heads)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    answer = tok.convert_tokens_to_ids(pieces)

    def fake_generate(self, input_ids, streamer, **kwargs):
        streamer.put(input_ids)
        for token in answer:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return torch.cat([input_ids, torch.tensor([answer])], 1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", fake_generate)
    return tok, answer


def test_streamed_text_is_the_decoded_text_with_a_sentencepiece_tokenizer(tmp_path, capsys, monkeypatch):
    """What ``lordba generate`` prints is the tokenizer's decoding of the new tokens: with a SentencePiece tokenizer
    (which strips one leading space where decoding starts) an indented line after a newline keeps all its spaces,
    and a character of two byte tokens is printed whole."""
    pieces = ["x", ":", "<0x0A>", "▁▁▁▁", "▁x", "▁=", "▁1", "<0x0A>", "▁▁", "▁caf", "<0xC3>", "<0xA9>", "<0x0A>", "x"]
    tok, answer = sentencepiece_model(tmp_path, monkeypatch, pieces)
    assert main(["generate", "--model", str(tmp_path), "--quant", "none", "x"]) == 0
    want = tok.decode(answer, skip_special_tokens=True)
    assert want == "x:\n     x = 1\n   café\nx"
    assert capsys.readouterr().out == want + "\n"


def test_the_first_word_keeps_its_space_after_the_prompt_with_a_sentencepiece_tokenizer(tmp_path, capsys, monkeypatch):
    """The new tokens were decoded without the prompt, so a SentencePiece tokenizer stripped the leading space of the
    first generated word: ``lordba generate x`` printed "x = 1" where ``lordba serve`` gives " x = 1" (the text the
    tokens add after the prompt, tests/serve/test_engine.py), and ``x`` + the answer read "xx = 1"."""
    tok, answer = sentencepiece_model(tmp_path, monkeypatch, ["▁x", "▁=", "▁1"])
    prompt = tok("x").input_ids
    assert main(["generate", "--model", str(tmp_path), "--quant", "none", "x"]) == 0
    want = tok.decode(prompt + answer, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)) :]
    assert want == " x = 1"
    assert capsys.readouterr().out == want + "\n"


class _ClosingOutput(io.StringIO):
    """A stdout whose reader goes away (or whose user presses Ctrl-C) after a few pieces of text."""

    def __init__(self, error: type[BaseException], after: int = 3) -> None:
        super().__init__()
        self.error, self.left = error, after

    def write(self, text: str) -> int:
        self.left -= 1
        if self.left < 0:
            raise self.error()
        return super().write(text)


@pytest.mark.parametrize("error, code", [(BrokenPipeError, 141), (KeyboardInterrupt, 130)])
def test_generation_stops_with_the_output_it_streams_to(folder, monkeypatch, capsys, error, code):
    """``lordba generate ... | head -c 3`` (a broken pipe) or Ctrl-C while tokens stream: the generating thread
    stops before the command returns its exit code (141, 130), rather than going on decoding while the interpreter
    exits under it (``terminate called without an active exception``, exit 134)."""
    import threading
    import time

    from transformers import LlamaForCausalLM

    state = {"tokens": 0, "running": False}

    def slow_generate(self, input_ids, streamer, max_new_tokens, **kwargs):  # ~2 s of tokens
        state["running"] = True
        try:
            streamer.put(input_ids)
            for _ in range(max_new_tokens):
                time.sleep(0.02)
                state["tokens"] += 1
                streamer.put(torch.tensor([40]))
            streamer.end()
            return torch.cat([input_ids, torch.full((1, max_new_tokens), 40)], 1)
        finally:
            state["running"] = False

    monkeypatch.setattr(LlamaForCausalLM, "generate", slow_generate)
    monkeypatch.setattr(sys, "stdout", _ClosingOutput(error))
    threads = set(threading.enumerate())  # (a thread of an earlier test may end meanwhile: compare the sets)
    assert main(["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "100", "ab"]) == code
    running, tokens = state["running"], state["tokens"]
    for _ in range(300):  # (without the fix: let the thread finish before the next test)
        if not state["running"]:
            break
        time.sleep(0.02)
    assert not running and tokens < 10 and not set(threading.enumerate()) - threads


def test_generate_piped_into_head_exits_141_quietly(folder):
    """The real ``lordba generate ... | head -c 3``: exit 141 and nothing on stderr but the loading's lines (it
    aborted with exit 134 and ``terminate called without an active exception``)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "lordba", "generate", "--model", str(folder), "--quant", "none"]
    proc = subprocess.Popen(
        [*argv, "--max-new-tokens", "120", "ab"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert len(proc.stdout.read(3)) == 3
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "terminate called" not in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_second_adapter_is_a_usage_error_not_silently_dropped(folder, tmp_path, capsys, command):
    """``--adapter A --adapter B`` ran B alone (argparse keeps the last), as if both were applied: one adapter per
    run, so a second is refused (exit 2) before anything loads."""
    adapters = ["--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as info:
        main([command, "--model", str(folder), *adapters, *(["x"] if command == "generate" else [])])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--adapter" in err and "one adapter" in err


def test_a_chat_keeps_the_turns_that_fit_when_its_latest_message_leaves_less_than_the_default_room(
    folder, monkeypatch, capsys
):
    """Without --max-new-tokens the conversation leaves room for 128 new tokens where its latest message alone
    leaves that many, else for at least one (fit_conversation's documented rule): in a 128-position context every
    message leaves less than 128, so the earlier turns that fit are kept (they were all dropped, each turn)."""
    from transformers import LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    answer = [*tok("ok", add_special_tokens=False).input_ids, tok.eos_token_id]
    prompts = []

    def short_generate(self, input_ids, streamer, **kwargs):  # the model answers "ok" and ends its turn
        prompts.append(tok.decode(input_ids[0]))
        streamer.put(input_ids)
        for token in answer:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return torch.cat([input_ids, torch.tensor([answer])], 1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", short_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n" + "x" * 80 + "\n"))
    assert main(["chat", "--model", str(folder), "--quant", "none"]) == 0
    out, err = capsys.readouterr()
    assert out == "ok\nok\n" and "dropped" not in err
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    kept = tok.apply_chat_template(
        [*history, {"role": "user", "content": "x" * 80}], tokenize=False, add_generation_prompt=True
    )
    assert prompts[1] == kept


def test_generation_stops_at_the_tokenizers_end_of_sequence_as_the_server_does(folder, tmp_path, capsys):
    """``lordba generate`` / ``chat`` stopped only at the generation config's eos ids, where ``lordba serve`` also stops
    at the tokenizer's: on a chat model whose end of turn is the tokenizer's eos but not in its generation config,
    chat ran past the end of the turn and made up the next one."""
    import shutil

    from transformers import GenerationConfig

    model_dir = shutil.copytree(folder, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("ab", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():  # eight tokens, stopping at none (bos is never generated here)
        new = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=tok.bos_token_id
        )[0, ids.shape[1] :].tolist()
    stop = next((t for t in new[1:] if t != new[0]), None)
    assert stop is not None, "the tiny model repeats one token: pick another prompt"
    GenerationConfig(eos_token_id=tok.bos_token_id, bos_token_id=tok.bos_token_id).save_pretrained(model_dir)
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    tok.save_pretrained(model_dir)
    assert main(["generate", "--model", str(model_dir), "--quant", "none", "--max-new-tokens", "8", "ab"]) == 0
    assert capsys.readouterr().out == tok.decode(new[: new.index(stop)]) + "\n"


def test_the_token_is_chosen_by_temperature_and_top_p_alone_as_the_server_chooses_it(folder, tmp_path, capsys):
    """``lordba serve`` samples from ``temperature`` and ``top_p`` alone (no top-k, no repetition penalty), where
    ``lordba generate`` / ``chat`` let ``generate`` add the model's generation config's (or transformers' top-k 50):
    the same temperature and top-p gave other distributions (here the config's top-k 1 made sampling greedy, and its
    repetition penalty changed the greedy answer)."""
    import shutil

    from transformers import GenerationConfig

    model_dir = shutil.copytree(folder, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("ab", return_tensors="pt").input_ids
    config = {"do_sample": True, "top_k": 1, "repetition_penalty": 0.2}  # (Qwen2.5's: top-k 20, penalty 1.05)
    GenerationConfig(**config, eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    argv = ["generate", "--model", str(model_dir), "--quant", "none", "--max-new-tokens", "8", "ab"]

    def reference(seed, **settings):
        return _sampled(model, tok, ids, seed, **settings)

    sampled = {"do_sample": True, "temperature": 1.5, "top_p": 1.0}
    want = reference(7, **sampled, top_k=0, repetition_penalty=1.0)
    assert want != reference(7, **sampled, top_k=1, repetition_penalty=0.2)  # what the config would make of it
    assert main([*argv, "--temperature", "1.5", "--seed", "7"]) == 0
    assert capsys.readouterr().out == want + "\n"
    want = reference(0, do_sample=False, repetition_penalty=1.0)
    assert want != reference(0, do_sample=False, repetition_penalty=0.2)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and "do_sample" not in err


def test_no_setting_of_the_generation_config_chooses_the_token(folder, tmp_path, capsys):
    """Past top-k and the repetition penalty, generate / chat still let ``generate`` apply the rest of the model's
    generation config (min-p, typical-p, n-gram blocking, a least length, ...), which lordba serve never applies:
    the same --temperature / --top-p sampled another distribution, and even the greedy text changed."""
    import shutil

    from transformers import GenerationConfig

    model_dir = shutil.copytree(folder, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("ab", return_tensors="pt").input_ids
    first = int(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)[0, -1])
    config = {"do_sample": True, "min_p": 0.9, "typical_p": 0.2, "no_repeat_ngram_size": 1, "suppress_tokens": [first]}
    GenerationConfig(**config, eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    argv = ["generate", "--model", str(model_dir), "--quant", "none", "--max-new-tokens", "8", "ab"]

    def reference(seed, **settings):
        return _sampled(model, tok, ids, seed, **{"top_k": 0, "repetition_penalty": 1.0, **settings})

    want = reference(7, do_sample=True, temperature=1.5, top_p=1.0)
    assert want != reference(7, **{**config, "temperature": 1.5, "top_p": 1.0})  # what the config would make of it
    assert main([*argv, "--temperature", "1.5", "--seed", "7"]) == 0
    assert capsys.readouterr().out == want + "\n"
    want = reference(0, do_sample=False)
    assert want != reference(0, do_sample=False, suppress_tokens=[first])
    assert main(argv) == 0
    assert capsys.readouterr().out == want + "\n"


@pytest.fixture(scope="module")
def plain_adapter(folder, tmp_path_factory):
    """An adapter made on the unquantized base: its config records no base quantization."""
    lm = get_lordba_model(AutoModelForCausalLM.from_pretrained(folder).eval(), LoRDBAConfig(r=4, init="random"))
    out = tmp_path_factory.mktemp("plain") / "adapter"
    lm.save_pretrained(out)
    return out


def test_quant_auto_takes_the_adapters_record_and_bits_and_group_size_reach_the_quantizer(
    folder, plain_adapter, tmp_path, monkeypatch, capsys
):
    """The base was q4 with bits=4, group_size=64 whatever the adapter was trained on (an adapter trained on another
    base gave other text than it was trained for); --bits and --group-size did not exist. --quant auto (the default)
    takes the --adapter's record, unquantized where it records none; without --adapter, q4 as before."""
    import shutil

    import lordba.quant.cache

    from conftest import set_config

    calls = []
    monkeypatch.setattr(
        lordba.quant.cache,
        "quantize_model_cached",
        lambda model, source, backend, bits, group_size, compute=None: (
            calls.append((backend, bits, group_size)) or model
        ),
    )
    hqq = tmp_path / "hqq"
    shutil.copytree(plain_adapter, hqq)
    set_config(hqq, base_quantization={"backend": "hqq", "bits": 2, "group_size": 16})
    base = ["generate", "--model", str(folder), "--max-new-tokens", "1", "ab"]
    cases = [
        ([], ("q4", 4, 64), "[base: q4 (4-bit, groups of 64): no adapter"),
        (["--group-size", "32"], ("q4", 4, 32), "[base: q4 (4-bit, groups of 32)"),
        (["--adapter", str(hqq)], ("hqq", 2, 16), f"[base: hqq (2-bit, groups of 16): the base adapter '{hqq}' was"),
        (["--adapter", str(hqq), "--group-size", "8"], ("hqq", 2, 8), "hqq (2-bit, groups of 8)"),
        (["--adapter", str(plain_adapter)], ("none", 4, 64), "[base: unquantized: adapter"),
        (["--adapter", str(plain_adapter), "--quant", "q4"], ("q4", 4, 64), "[base: q4 (4-bit, groups of 64): --quant"),
    ]
    for extra, want, said in cases:
        calls.clear()
        assert main([*base[:-1], *extra, base[-1]]) == 0
        assert calls == [want] and said in capsys.readouterr().err, extra


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_aot_with_compile_is_a_usage_error_before_the_model_loads(folder, command, capsys, monkeypatch):
    """``--aot --compile`` (two ways to compile the decode step) loaded the base model, then exited 3 as if a file
    were bad: a usage error (exit 2), said before anything loads."""
    import lordba.quant.pretrained

    monkeypatch.setattr(lordba.quant.pretrained, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as info:
        main([command, "--model", str(folder), "--aot", "--compile", *(["x"] if command == "generate" else [])])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--aot" in err and "--compile" in err and "not allowed with" in err, err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "given, needs",
    [(["--kv-dtype", "bfloat16"], "--aot"), (["--compile-mode", "max-autotune-no-cudagraphs"], "--compile")],
)
def test_a_decode_option_without_its_way_of_decoding_is_a_usage_error(
    folder, command, given, needs, capsys, monkeypatch
):
    """``--kv-dtype`` without ``--aot`` and ``--compile-mode`` without ``--compile`` were ignored silently (the eager
    decode keeps the model's dtype and compiles nothing): exit 2 before the model loads, as ``--q4-compute`` with
    another base."""
    import lordba.quant.pretrained

    monkeypatch.setattr(lordba.quant.pretrained, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    assert (
        main([command, "--model", str(folder), "--quant", "none", *given, *(["x"] if command == "generate" else [])])
        == 2
    )
    err = capsys.readouterr().err
    assert f"lordba {command}: error: {given[0]}" in err and f"give {needs}" in err, err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("quant", ["auto", "q4"])
def test_an_adapter_that_cannot_be_loaded_is_refused_before_the_model_loads(
    folder, plain_adapter, tmp_path, command, quant, capsys, monkeypatch
):
    """A mistyped ``--adapter`` folder, one missing its weights file or a PEFT LoRA given as the adapter was refused
    only once the base had loaded (and been quantized; with ``--quant auto`` after a line saying the adapter
    "records no base quantization"): it is read as the loader reads it before the base loads, with the loader's
    error (exit 3)."""
    import shutil

    import lordba.quant.pretrained

    monkeypatch.setattr(lordba.quant.pretrained, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(plain_adapter, no_weights)
    (no_weights / "lordba_model.safetensors").unlink()
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    for adapter, said in (
        (tmp_path / "typo", "typo: not a directory"),
        (no_weights, "lordba_model.safetensors: missing"),
        (peft, "peft_type is 'LORA'"),
    ):
        argv = [command, "--model", str(folder), "--adapter", str(adapter), "--quant", quant]
        assert main([*argv, *(["x"] if command == "generate" else [])]) == 3
        err = capsys.readouterr().err
        assert said in err and "records no base quantization" not in err, err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_q4_compute_or_bits_with_a_base_they_do_not_apply_to_is_a_usage_error(folder, plain_adapter, command, capsys):
    """--q4-compute with another base than q4 was ignored silently: exit 2, before the model loads."""
    prompt = ["ab"] if command == "generate" else []
    for extra in (
        ["--quant", "none", "--q4-compute", "exact"],
        ["--quant", "hqq", "--q4-compute", "fast"],
        ["--adapter", str(plain_adapter), "--q4-compute", "exact"],  # auto: the unquantized base it was made on
        ["--quant", "none", "--bits", "4"],
    ):
        assert main([command, "--model", str(folder), *extra, *prompt]) == 2
        err = capsys.readouterr().err
        assert f"lordba {command}: error:" in err and extra[-2] in err and "--quant" in err, err


def _sampled(model, tok, ids, seed, **settings):
    """The 8 tokens transformers' ``generate`` makes from ``ids`` after ``torch.manual_seed(seed)``, decoded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, **settings,
        )  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
