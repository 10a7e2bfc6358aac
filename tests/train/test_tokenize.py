import copy
import json
import re

import pytest
import torch

from lordba import ConfigError, DataError
from lordba.train.records import Example, read_jsonl
from lordba.train.tokenize import Batcher, collate, encode_examples, prompt_ids
from lordba_lab.assets import load_model_and_tokenizer
from tiny_model import CHATML as CHATML_TEMPLATE
from tiny_model import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_model_and_tokenizer()[1]


def test_loss_is_on_the_completion_only(tok):
    ex = Example((("user", "What is 2+3?"),), "5", "5")
    (row,) = encode_examples(tok, [ex])
    completion = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tok.decode(completion).startswith("5") and "<|im_end|>" in tok.decode(completion)
    prompt = tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
    assert "What is 2+3?" in prompt and prompt.rstrip().endswith("assistant")


def test_plain_text_trains_on_everything_and_truncation(tok):
    (row,) = encode_examples(tok, [Example((), "hello world")])
    assert all(l != -100 for l in row["labels"])
    with pytest.raises(DataError, match="longer than max_length"):
        encode_examples(tok, [Example((("user", "word " * 50),), "x")], max_length=8)


def test_batches_depend_only_on_seed_and_index():
    rows = [{"input_ids": [i, i + 1, i + 2][: 1 + i % 3], "labels": [i, i + 1, i + 2][: 1 + i % 3]} for i in range(10)]
    a, b = Batcher(rows, 4, seed=3), Batcher(rows, 4, seed=3)
    for k in (0, 1, 2, 7):
        assert all(torch.equal(a.batch(k)[n], b.batch(k)[n]) for n in ("input_ids", "labels", "attention_mask"))
    assert not torch.equal(a.batch(0)["input_ids"], Batcher(rows, 4, seed=4).batch(0)["input_ids"])
    batch = collate(rows[:3], pad_id=0)
    assert batch["labels"][0, 1:].eq(-100).all() and batch["attention_mask"].sum() == 1 + 2 + 3


MULTI = Example((("user", "1+1?"), ("assistant", "2"), ("tool", "ok"), ("user", "and +1?")), "3", "3")


def trained_text(tok, row):
    return tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


def test_all_assistant_turns_trains_on_every_assistant_turn(tok):
    (last,) = encode_examples(tok, [MULTI])
    (every,) = encode_examples(tok, [MULTI], train_on="all-assistant-turns")
    assert every["input_ids"] == last["input_ids"]  # the same conversation, other labels
    assert trained_text(tok, last) == "3<|im_end|>\n"
    assert trained_text(tok, every) == "2<|im_end|>\n3<|im_end|>\n"
    with pytest.raises(ConfigError, match="train_on"):
        encode_examples(tok, [MULTI], train_on="every-turn")


def test_all_assistant_turns_without_a_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    (last,) = encode_examples(plain, [MULTI])
    (every,) = encode_examples(plain, [MULTI], train_on="all-assistant-turns")
    assert plain.decode(every["input_ids"]) == plain.decode(last["input_ids"])  # the same text
    assert trained_text(plain, every) == "2\n\n3" + plain.eos_token


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_example(tok):
    odd = copy.deepcopy(tok)
    # renders only the last two turns: earlier ones vanish as the conversation grows
    odd.chat_template = "{% for m in messages[-2:] %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"example 0: .*turn by turn"):
        encode_examples(odd, [MULTI], train_on="all-assistant-turns")


def test_a_template_that_does_not_answer_after_its_generation_prompt_is_refused(tok):
    """A reasoning model's template opens a ``<think>`` block in its generation prompt and drops it from
    answers: the answered conversation does not start with the prompt. The example was then encoded in the
    plain format ("2+3?\\n5<|im_end|>", no template at all), silently: an adapter trained on text the model
    never sees in chat. Now it is refused naming the example, as the all-assistant-turns path refuses a
    template it cannot split."""
    r1 = copy.deepcopy(tok)
    r1.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    ex = Example((("user", "2+3?"),), "5", "5")
    with pytest.raises(DataError, match=r"example 0: .*generation prompt .*'<think>\\n'"):
        encode_examples(r1, [ex])
    (row,) = encode_examples(tok, [ex])  # the model's own template renders the answer after its prompt
    assert trained_text(tok, row) == "5<|im_end|>\n"


def test_an_opening_assistant_turn_trains_its_content_not_the_template_around_it():
    """A conversation that opens with the assistant (a greeting), trained on every assistant turn: the first turn's
    piece was everything its rendering held (``before`` was ``""``), the ``<|im_start|>assistant`` header included
    and, with a template that adds a default system prompt, that whole system prompt: trained silently as if the
    assistant wrote it."""
    ctok = char_tokenizer()
    ex = Example((("assistant", "Hi"), ("user", "Q?")), "A", "A")
    (row,) = encode_examples(ctok, [ex], train_on="all-assistant-turns")
    assert trained_text(ctok, row) == "Hi<|im_end|>\nA<|im_end|>\n"
    (last,) = encode_examples(ctok, [ex])
    assert row["input_ids"] == last["input_ids"]


def test_an_opening_assistant_turn_with_a_default_system_prompt_is_not_trained_on_that_prompt(tok):
    ex = Example((("assistant", "Hi"), ("user", "Q?")), "A", "A")
    (row,) = encode_examples(tok, [ex], train_on="all-assistant-turns")
    assert trained_text(tok, row) == "Hi<|im_end|>\nA<|im_end|>\n"  # not SmolLM2's default system prompt
    (last,) = encode_examples(tok, [ex])
    assert row["input_ids"] == last["input_ids"]


def bos_tokenizer():
    """The character tokenizer with no chat template that puts ``<s>`` before any text (as Llama's, Mistral's or
    Gemma's base tokenizers do)."""
    from tokenizers.processors import TemplateProcessing

    btok = char_tokenizer()
    btok.chat_template = None
    btok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", btok.bos_token_id)]
    )
    assert btok("Q")["input_ids"] == [btok.bos_token_id, btok.convert_tokens_to_ids("Q")]
    return btok


@pytest.mark.parametrize("train_on", ["last-assistant-turn", "all-assistant-turns"])
def test_the_plain_format_starts_with_the_bos_that_serving_puts_before_a_prompt(train_on):
    """Without a chat template (and for text records) an example trained without the BOS token that `lordba serve`'s
    /v1/completions and `lordba generate` put before the same prompt (``tokenizer(prompt)``): the adapter learned on
    sequences the model is never given (a base model without its BOS is far off its distribution)."""
    btok = bos_tokenizer()
    ex = Example((("user", "Q?"),), "A", "A")
    (row,) = encode_examples(btok, [ex], train_on=train_on)
    assert row["input_ids"] == btok("Q?\nA")["input_ids"] + [btok.eos_token_id]  # once, not twice
    assert row["labels"][:4] == [-100] * 4 and trained_text(btok, row) == "A<|im_end|>"
    assert prompt_ids(btok, ex) == btok("Q?\n")["input_ids"]  # the evaluation's generation prompt too
    (text,) = encode_examples(btok, [Example((), "hi")], train_on=train_on)
    assert text["input_ids"] == btok("hi")["input_ids"] + [btok.eos_token_id]
    assert text["labels"][0] == -100 and trained_text(btok, text) == "hi<|im_end|>"  # "h" is now scored


@pytest.mark.parametrize("train_on", ["last-assistant-turn", "all-assistant-turns"])
def test_a_standard_prompt_completion_record_is_text_and_a_conversational_one_is_templated(train_on, tmp_path):
    """TRL applies the chat template to a prompt-completion record only when it is conversational (lists of
    messages); one of strings is text, prompt and completion joined as they are. Such records were chat-templated:
    the adapter learned '<|im_start|>user\nQ: 2+2? A:<|im_end|>...' for data meant as plain text."""
    btok = bos_tokenizer()
    btok.chat_template = CHATML_TEMPLATE
    data = tmp_path / "d.jsonl"
    user, answer = {"role": "user", "content": "Q: 2+2? A:"}, {"role": "assistant", "content": " 4"}
    records = [{"prompt": "Q: 2+2? A:", "completion": " 4"}, {"prompt": [user], "completion": [answer]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain, chat = read_jsonl(data)
    text, templated = encode_examples(btok, [plain, chat], train_on=train_on)
    assert text["input_ids"] == btok("Q: 2+2? A: 4")["input_ids"] + [btok.eos_token_id]
    assert trained_text(btok, text) == " 4<|im_end|>" and text["labels"].count(-100) == len(
        btok("Q: 2+2? A:")["input_ids"]
    )
    assert prompt_ids(btok, plain) == btok("Q: 2+2? A:")["input_ids"]  # what /v1/completions gives the model
    assert (
        "<|im_start|>user" in btok.decode(templated["input_ids"]) and trained_text(btok, templated) == " 4<|im_end|>\n"
    )


def test_a_template_that_writes_the_bos_gets_it_once():
    btok = bos_tokenizer()
    btok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    (row,) = encode_examples(btok, [Example((("user", "Q?"),), "A", "A")])
    assert row["input_ids"].count(btok.bos_token_id) == 1 and row["input_ids"][0] == btok.bos_token_id


def test_an_example_whose_only_trained_token_is_its_first_is_refused(tok):
    """A causal LM scores token t from the ones before it: a trained label at position 0 is never scored. A text
    record cut to ``max_length=1`` (or a conversation whose first kept token alone is trained) was kept with no
    scored token, silently: a batch of such rows has a loss of 0/0."""
    with pytest.raises(DataError, match=r"example 0: .*max_length=1"):
        encode_examples(tok, [Example((), "hello")], max_length=1)
    (row,) = encode_examples(tok, [Example((), "hello")], max_length=2)
    assert row["labels"][1] != -100


@pytest.mark.parametrize("seed", [1_733_500_000_000_000_000, 2**63, -5])
def test_a_large_seed_shuffles_as_any_other(seed):
    """`lordba train --seed N` takes any integer >= 0 (and TrainSettings any integer), which seeds torch, NumPy and
    random; the batcher multiplied it by 1_000_003 into torch's 64-bit seed: a seed above ~1.8e13 (a time in
    nanoseconds) failed the first batch with ValueError('Overflow when unpacking long long') after the model loaded.
    Seeds that fitted keep their order."""
    rows = [{"input_ids": [i, i], "labels": [i, i]} for i in range(6)]
    a = Batcher(rows, 2, seed=seed)
    first = [a.batch(k)["input_ids"][:, 0].tolist() for k in range(3)]
    assert sorted(i for batch in first for i in batch) == list(range(6))
    assert first == [Batcher(rows, 2, seed=seed).batch(k)["input_ids"][:, 0].tolist() for k in range(3)]


def test_the_order_of_a_small_seed_is_unchanged():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(5)]
    expected = torch.randperm(5, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1)).tolist()
    assert Batcher(rows, 5, seed=7).batch(1)["input_ids"][:, 0].tolist() == expected


def test_an_example_read_from_a_file_that_cannot_be_encoded_names_its_file_and_line(tok, tmp_path):
    """`lordba train --data FILE` with a record too long for --max-length (or one the chat template refuses) stopped
    with "example 1: the prompt alone is longer than max_length=64": no file, and an index among the non-blank records
    counted from 0, not the line an editor shows. Records read by read_jsonl are now named by file and line."""
    data = tmp_path / "d.jsonl"
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    long = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "x"}]}
    data.write_text(json.dumps(ok) + "\n\n" + json.dumps(long) + "\n")
    examples = read_jsonl(data)
    with pytest.raises(DataError, match=rf"^{re.escape(str(data))}:3 \(example 1\): the prompt alone is longer"):
        encode_examples(tok, examples, max_length=64)
    with pytest.raises(DataError, match=r"^example 1: the prompt alone"):  # built in memory: no file to name
        encode_examples(tok, [Example((("user", "Hi"),), "Yo"), Example((("user", "word " * 40),), "x")], max_length=64)


def test_a_trl_completion_of_several_messages_is_trained_whole(tok, tmp_path):
    """TRL's conversational prompt-completion record whose completion is a tool call, the tool's result and the final
    answer: TRL trains all of the completion; lordba read it as a conversation and trained its last message only
    ("It is sunny.<|im_end|>\\n"), silently: the tool call, what the adapter was to learn, had labels -100."""
    user, tool = {"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}
    call, final = {"role": "assistant", "content": "get_weather()"}, {"role": "assistant", "content": "It is sunny."}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": [user], "completion": [call, tool, final]}) + "\n")
    (ex,) = read_jsonl(data)
    (row,) = encode_examples(tok, [ex])
    assert trained_text(tok, row) == (
        "get_weather()<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\nIt is sunny.<|im_end|>\n"
    )
    assert tok.decode(prompt_ids(tok, ex)).endswith("weather?<|im_end|>\n<|im_start|>assistant\n")  # evaluation's
    (every,) = encode_examples(tok, [ex], train_on="all-assistant-turns")
    assert every["input_ids"] == row["input_ids"]
    assert trained_text(tok, every) == "get_weather()<|im_end|>\nIt is sunny.<|im_end|>\n"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    (row,) = encode_examples(plain, [ex])
    assert trained_text(plain, row) == "get_weather()\n\nsunny\n\nIt is sunny." + plain.eos_token
    assert plain.decode(prompt_ids(plain, ex)) == "weather?\n"
    data.write_text(json.dumps({"prompt": [user, call], "completion": [tool, final]}) + "\n")  # no generation prompt
    (row,) = encode_examples(tok, read_jsonl(data))  # to split at: its last message is trained, as before
    assert trained_text(tok, row) == "It is sunny.<|im_end|>\n"


@pytest.mark.parametrize("max_length", [-1, 0, 2.5, True])
def test_a_max_length_that_is_no_positive_integer_is_refused(tok, max_length):
    """``max_length=-1`` sliced every example to ``ids[:-1]``: each trained without its last token (the EOS that ends
    the answer), silently; 0 was refused as "only the first token ... is trained within max_length=0"."""
    with pytest.raises(ConfigError, match=r"max_length must be a positive integer"):
        encode_examples(tok, [Example((("user", "Q?"),), "A", "A")], max_length=max_length)
