"""Next-token choice and text assembly: greedy, temperature with a seed, top-p, stop strings."""

from __future__ import annotations

import pytest
import torch

from lordba.errors import ConfigError
from lordba.serve.sampling import IncrementalDecoder, SamplingParams, TextAssembler, sample

from .serve_helpers import sentencepiece_like_tokenizer

LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, 0.0])


def test_greedy_is_the_argmax():
    assert sample(LOGITS, SamplingParams(4, temperature=0.0), None) == 1


def test_seeded_sampling_repeats_and_top_p_keeps_the_nucleus():
    params = SamplingParams(4, temperature=1.0, seed=5)
    draws = [sample(LOGITS, params, params.generator()) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    many = SamplingParams(4, temperature=2.0, seed=0)
    g = many.generator()
    assert len({sample(LOGITS, many, g) for _ in range(200)}) == 5  # every token can come at T=2
    nucleus = SamplingParams(4, temperature=2.0, top_p=0.5, seed=0)
    g = nucleus.generator()
    # softmax(LOGITS / 2): tokens 1 and 2 hold 0.39 and 0.37; 0.5 is reached with both, never a third
    assert {sample(LOGITS, nucleus, g) for _ in range(200)} == {1, 2}
    tiny = SamplingParams(4, temperature=1.0, top_p=1e-6)
    g = tiny.generator()
    assert {sample(LOGITS, tiny, g) for _ in range(50)} == {1}


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_a_failure(temperature):
    """The request's own 400 allows any temperature in [0, 2]; dividing float32 logits by one this
    small gave infinities, softmax NaNs and ``torch.multinomial`` a RuntimeError (the step's 500)."""
    params = SamplingParams(4, temperature=temperature, seed=0)
    g = params.generator()
    assert {sample(LOGITS, params, g) for _ in range(20)} == {1}


@pytest.mark.parametrize("top_p", [1e-6, 1e-40, 1e-50, 1e-300])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    """``top_p`` below float32's range rounded to 0 against the float32 cumulative mass, which then
    dropped the first token too: an all-zero distribution and a RuntimeError."""
    params = SamplingParams(4, temperature=1.0, top_p=top_p, seed=0)
    g = params.generator()
    assert {sample(LOGITS, params, g) for _ in range(20)} == {1}


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(temperature=-0.1),
        dict(temperature=3.0),
        dict(top_p=0.0),
        dict(stop=("",)),
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(seed=1.5),
        dict(max_tokens=2.5),
        dict(stop=("a", "b", "c", "d", "e")),
        dict(stop=(1,)),
    ],
)
def test_invalid_parameters_are_refused(bad):
    kw = {"max_tokens": 4, **bad}
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "edge",
    [
        dict(max_tokens=1),
        dict(temperature=0.0),
        dict(temperature=2.0),
        dict(top_p=1.0),
        dict(seed=2**64 - 1),
        dict(seed=-(2**63)),
        dict(stop=("a", "b", "c", "d")),
    ],
)
def test_parameters_at_the_edges_of_their_ranges_are_accepted(edge):
    kw = {"max_tokens": 4, **edge}
    assert SamplingParams(**kw).max_tokens == kw["max_tokens"]


def test_the_seed_fixes_the_whole_sequence_of_draws():
    params = SamplingParams(4, temperature=2.0, seed=7)
    a, b = params.generator(), params.generator()
    first = [sample(LOGITS, params, a) for _ in range(40)]
    assert first == [sample(LOGITS, params, b) for _ in range(40)]
    other = SamplingParams(4, temperature=2.0, seed=8).generator()
    assert first != [sample(LOGITS, params, other) for _ in range(40)]


def test_a_small_positive_temperature_still_samples_among_tied_top_tokens():
    """Only temperature 0 is greedy (the argmax, the first of a tie); 1e-7 draws either of two equal top logits."""
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    params = SamplingParams(4, temperature=1e-7, seed=0)
    g = params.generator()
    assert {sample(logits, params, g) for _ in range(60)} == {1, 2}
    assert sample(logits, SamplingParams(4, temperature=0.0), None) == 1


def test_a_tiny_temperature_with_large_logits_is_greedy():
    """Logits of a few hundred divided by a temperature near float32's smallest normal overflow to inf (inf - inf:
    NaN) unless the top logit is moved to 0 first."""
    params = SamplingParams(4, temperature=1e-37, seed=0)
    g = params.generator()
    assert {sample(LOGITS * 100, params, g) for _ in range(20)} == {1}


def test_top_p_reached_exactly_by_the_tokens_above_drops_the_rest():
    """Probabilities 0.5, 0.25, 0.25 and top_p 0.5: the first token alone reaches it (the smallest set)."""
    logits = torch.tensor([0.0, -0.6931471805599453, -0.6931471805599453])
    params = SamplingParams(4, temperature=1.0, top_p=0.5, seed=0)
    g = params.generator()
    assert {sample(logits, params, g) for _ in range(60)} == {0}


def test_text_is_cut_at_the_first_stop_and_a_possible_stop_is_held_back():
    text = TextAssembler(("END", "##"))
    assert not text.update("hello E")
    assert text.take_delta() == "hello "  # "E" may start "END": held back
    assert not text.update("hello EN")
    assert text.take_delta() == ""
    assert not text.update("hello ENX #")
    assert text.take_delta() == "ENX "
    assert text.update("hello ENX ## and more")
    assert text.text == "hello ENX " and text.take_delta(final=True) == ""


def test_a_huge_stop_string_costs_no_quadratic_time_per_token():
    """A stream's hold-back tried every tail length up to the longest stop string, copying and comparing each tail:
    a client's stop of a million characters cost the engine's thread, at every token of its request, time
    quadratic in the text generated (0.09 s a token at 30,000 characters, over 10 s at 600,000), which every other
    request in the batch waited for. What is held back is unchanged."""
    import time

    text = TextAssembler(("y" * 1_000_000, "x" * 999_999 + "z"))
    body = "ab" * 300_000
    text.update(body)
    assert text.take_delta() == body
    text.update(body + "cxx")
    started = time.perf_counter()
    assert text.take_delta() == "c"  # "xx" may start the second stop: held back
    assert time.perf_counter() - started < 3.0  # (the quadratic hold-back: 12.6 s here)
    text.update(body + "cxxq")
    assert text.take_delta() == "xxq"


def test_text_is_cut_at_the_earliest_stop_even_at_the_start():
    text = TextAssembler(("END", "##"))
    assert text.update("a ## b END c") and text.text == "a "
    text = TextAssembler(("END", "##"))
    assert text.update("ENDabc") and text.text == "" and text.take_delta(final=True) == ""


@pytest.mark.parametrize(
    ("stops", "update", "shown"),
    [
        (("aab",), "xaa", "x"),  # the longest tail that may start a stop waits ("a" alone could too)
        (("aab",), "aaa", "a"),  # "aa" waits, and only it
        (("END",), "hello N", "hello N"),  # "N" is inside "END" but does not start it
    ],
)
def test_exactly_the_tail_that_could_start_a_stop_is_held_back(stops, update, shown):
    text = TextAssembler(stops)
    assert not text.update(update)
    assert text.take_delta() == shown


def test_an_incomplete_character_waits_for_the_next_token():
    text = TextAssembler()
    text.update("caf\ufffd")
    assert text.take_delta() == "caf"
    text.update("café")
    assert text.take_delta() == "é"


def byte_level_tokenizer():
    """A small byte-level BPE (as GPT-2 / SmolLM2 use), trained here: multi-byte characters span
    several tokens, so a prefix of the ids can end inside a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld, naïve café — ça va? 日本語 テキスト 🙂 emoji", "plain ascii words and more words"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_incremental_decoding_equals_decoding_everything():
    tok = byte_level_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = ["héllo wörld 日本語 🙂 café", "🙂🙂 テキスト naïve"]
    sequences = [tok(t)["input_ids"] for t in texts]
    sequences += [torch.randint(0, len(tok), (40,), generator=g).tolist() for _ in range(3)]
    for ids in sequences:
        decoder = IncrementalDecoder(tok)
        for n in range(1, len(ids) + 1):
            text = decoder.update(ids[:n])
            full = tok.decode(ids[:n], skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                assert text == full, (ids[:n], text, full)


def test_incremental_text_ending_inside_a_character_is_what_decoding_everything_gives():
    """A completion cut by max_tokens inside a character ends with its U+FFFD, as decoding all its ids gives."""
    tok = byte_level_tokenizer()
    ids = tok("日本語 🙂 café")["input_ids"]
    decoder, inside = IncrementalDecoder(tok), 0
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n], skip_special_tokens=True)
        assert decoder.update(ids[:n]) == full
        inside += full.endswith("\ufffd")
    assert inside > 0


def test_a_completion_keeps_the_leading_space_a_sentencepiece_tokenizer_strips_where_decoding_starts():
    """Llama 2's and Mistral's tokenizers strip the one leading space where decoding starts: the generated ids
    were decoded alone, so a completion whose first token is ``▁world`` after the prompt ``Hello`` read ``world``
    (prompt + completion: ``Helloworld``), where decoding the prompt and the completion together gives
    ``Hello world``. With the prompt as context the text is what the new tokens add after it."""
    tok = sentencepiece_like_tokenizer()
    prompt = [1, *tok.convert_tokens_to_ids(["\u2581H", "\u2581i"])]
    generated = tok.convert_tokens_to_ids(["\u2581a", "\u2581b", "</s>", "\u2581c"])
    after = len(tok.decode(prompt, skip_special_tokens=True))
    decoder = IncrementalDecoder(tok, prompt)
    for n in range(1, len(generated) + 1):
        want = tok.decode(prompt + generated[:n], skip_special_tokens=True)[after:]
        assert decoder.update(generated[:n]) == want == " a b c"[: len(want)]
    assert IncrementalDecoder(tok).update(generated) == "a b c"  # no context: decode(generated) (lordba generate)


def test_a_prompt_ending_inside_a_character_is_no_context_for_the_completion():
    tok = byte_level_tokenizer()
    ids = tok("日本語 café")["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    decoder = IncrementalDecoder(tok, ids[:cut])
    for n in range(1, len(ids) - cut + 1):
        text = decoder.update(ids[cut : cut + n])
        full = tok.decode(ids[cut : cut + n])
        if not full.endswith("\ufffd"):
            assert text == full


def byte_fallback_tokenizer():
    """Llama 2's and Mistral's decoding: word pieces ``▁...`` and byte tokens ``<0xNN>`` for what has no piece;
    the bytes of an incomplete character decode to one U+FFFD each."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["\u2581Hello", "\u2581world", "\u2581"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_stream_of_byte_tokens_shows_each_character_once_it_is_whole():
    """Byte-fallback tokens decode each byte of an incomplete character to its own U+FFFD: a stream held back
    only the last one, so the first went out and the character, once whole, was never shown
    ("Hello \ufffd🙂 world" streamed for "Hello 日🙂 world")."""
    tok = byte_fallback_tokenizer()
    pieces = ["\u2581Hello", "\u2581", *[f"<0x{b:02X}>" for b in "日🙂".encode()], "\u2581world"]
    pieces += [f"<0x{b:02X}>" for b in "é!".encode()]
    ids = tok.convert_tokens_to_ids(pieces)
    decoder, text, shown = IncrementalDecoder(tok, [1]), TextAssembler(("STOP",)), ""
    for n in range(1, len(ids) + 1):
        text.update(decoder.update(ids[:n]))
        shown += text.take_delta()
    shown += text.take_delta(final=True)
    assert shown == text.text == tok.decode(ids) == "Hello 日🙂 worldé!"
