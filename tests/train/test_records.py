import json

import pytest

from lordba import DataError
from lordba.train.records import Example, read_jsonl


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_every_record_kind(tmp_path):
    p = write(
        tmp_path,
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "S"},
                        {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"},
                    ]
                }
            ),
            json.dumps({"prompt": "P", "completion": "C"}),
            json.dumps({"instruction": "I", "input": "X", "output": "O"}),
            "",
            json.dumps({"text": "plain text"}),
        ],
    )
    rows = read_jsonl(p)
    assert rows == [
        Example((("system", "S"), ("user", "Q")), "A", "A"),
        Example((("user", "P"),), "C", "C", plain=True),  # text, as TRL's standard prompt-completion: no template
        Example((("user", "I\n\nX"),), "O", "O"),
        Example((), "plain text"),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object"),
        ('{"foo": 1}', "d.jsonl:2: unknown record"),
        ('{"prompt": "P", "completion": ""}', "d.jsonl:2:"),
        (
            '{"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}',
            "d.jsonl:2: messages\\[1\\]",
        ),
        ('{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}', "last message"),
        ('{"text": 3}', "d.jsonl:2:"),
    ],
)
def test_malformed_lines_report_their_number(tmp_path, line, match):
    p = write(tmp_path, [json.dumps({"prompt": "P", "completion": "C"}), line])
    with pytest.raises(DataError, match=match):
        read_jsonl(p)


def test_missing_empty_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_jsonl(tmp_path / "b.jsonl")


def test_trl_conversational_records_and_the_tool_role(tmp_path):
    user, tool = {"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}
    call = {"role": "assistant", "content": "get_weather()"}
    final = {"role": "assistant", "content": "It is sunny."}
    p = write(
        tmp_path,
        [
            json.dumps({"messages": [user, call, tool, final]}),
            json.dumps({"prompt": [user], "completion": [final]}),
            json.dumps({"prompt": [user, call, tool], "completion": [final]}),
        ],
    )
    turns = (("user", "weather?"), ("assistant", "get_weather()"), ("tool", "sunny"))
    assert read_jsonl(p) == [
        Example(turns, "It is sunny.", "It is sunny."),
        Example((("user", "weather?"),), "It is sunny.", "It is sunny."),
        Example(turns, "It is sunny.", "It is sunny."),
    ]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}, "must both be strings .* or both lists"),
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": []}, "'completion' must be a non-empty list"),
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]}, "last"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages\\[1\\] has 'tool_calls'",
        ),
        (  # OpenAI's form of a tool call: content null; it was told its content must be a str
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
                    {"role": "tool", "content": "R"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages\\[1\\] has 'tool_calls'",
        ),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}, "empty"),
    ],
)
def test_malformed_conversational_records(tmp_path, record, match):
    with pytest.raises(DataError, match=f"d.jsonl:1: .*{match}"):
        read_jsonl(write(tmp_path, [json.dumps(record)]))


@pytest.mark.parametrize(
    "record",
    [
        {"text": "cut emoji \ud83d"},
        {"prompt": "P", "completion": "x\udc00"},
        {"messages": [{"role": "user", "content": "\ud83d!"}, {"role": "assistant", "content": "ok"}]},
        {"instruction": "I", "input": "\ud800", "output": "O"},
    ],
)
def test_a_lone_surrogate_escape_is_refused_naming_the_line(tmp_path, record):
    """JSON may escape half a UTF-16 surrogate pair ("\\ud83d", an emoji cut by a JavaScript scraper); json.loads
    returns it in a str that is no text: the record was accepted and the tokenizer then failed the whole run with
    "TypeError: TextEncodeInput must be Union[...]", naming nothing. Now refused as the non-UTF-8 bytes are."""
    p = write(tmp_path, [json.dumps({"text": "fine"}), json.dumps(record)])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*surrogate"):
        read_jsonl(p)


@pytest.mark.parametrize("extra", [42, ["a", "b"], {"x": 1}])
def test_an_instruction_input_that_is_not_a_string_is_refused(tmp_path, extra):
    """An instruction record's ``input`` that was not a string (a number, a list) was dropped without a word: the
    example trained on the instruction alone, its input missing from the prompt."""
    p = write(tmp_path, [json.dumps({"instruction": "Add one to", "input": extra, "output": "43"})])
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*'input'"):
        read_jsonl(p)
    p = write(tmp_path, [json.dumps({"instruction": "Say hi", "input": None, "output": "hi"})])  # null: no input
    assert read_jsonl(p)[0].messages == (("user", "Say hi"),)


def test_a_record_with_tools_is_refused_naming_its_line(tmp_path):
    """TRL's records may carry ``tools`` (function schemas), which TRL gives the chat template to render into the
    prompt (Qwen's, Llama 3.1's). read_jsonl dropped them without a word: the adapter learned to call tools whose
    definitions its training prompts never held. Refused as an assistant's 'tool_calls' are; empty ones are fine."""
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "get_weather()"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    p = write(
        tmp_path,
        [json.dumps({"messages": msgs}), json.dumps({"prompt": msgs[:1], "completion": msgs[1:], "tools": tools})],
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*'tools'"):
        read_jsonl(p)
    p = write(tmp_path, [json.dumps({"messages": msgs, "tools": []}), json.dumps({"messages": msgs, "tools": None})])
    assert len(read_jsonl(p)) == 2
