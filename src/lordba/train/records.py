"""The training record and the JSONL reader for users' own data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lordba.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One training/evaluation record.

    ``messages`` is the conversation before the final answer as ``(role, content)`` turns (earlier
    assistant and tool turns included) and ``completion`` the final assistant answer; or, for plain
    language-model data, ``messages`` is empty and ``completion`` is the whole text. The loss is on
    the final answer, or on every assistant turn (``train_on="all-assistant-turns"`` in
    :func:`~lordba.train.tokenize.encode_examples`). ``answer`` is the reference for exact-match metrics.
    ``prompt_turns``: for TRL's conversational prompt-completion record whose completion has several messages, how
    many of ``messages`` are its prompt: the loss is then on all of the completion (the rest of ``messages`` and
    ``completion``, as TRL trains it), not on its last message only.
    ``plain``: a standard (not conversational) prompt-completion record, its prompt the one user turn of
    ``messages``: prompt and completion are text, joined as they are and not chat-templated (as TRL trains them).
    ``meta["where"]``: the ``file:line`` of a record read by :func:`read_jsonl` (errors name it).
    """

    messages: tuple[tuple[str, str], ...]
    completion: str
    answer: str | None = None
    prompt_turns: int | None = None
    plain: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _turns(msgs: Any, where: str, name: str) -> list[tuple[str, str]]:
    """``(role, content)`` turns of a list of chat messages (OpenAI / TRL conversational form)."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {name!r} must be a non-empty list of messages")
    turns = []
    for i, m in enumerate(msgs):
        if isinstance(m, dict) and m.get("tool_calls"):  # before 'content', which OpenAI's form leaves null there
            raise DataError(
                f"{where}: {name}[{i}] has 'tool_calls', which lordba does not render; "
                "put the call in the assistant's 'content' as the model should write it"
            )
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {name}[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
        turns.append((m["role"], m["content"]))
    return turns


def _conversation(turns: list[tuple[str, str]], where: str, prompt_turns: int | None = None) -> Example:
    if len(turns) < 2:
        raise DataError(f"{where}: a conversation needs at least two turns (a prompt and the answer)")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    if not turns[-1][1].strip():
        raise DataError(f"{where}: the assistant's final answer is empty")
    prompt_turns = prompt_turns if prompt_turns is not None and prompt_turns < len(turns) - 1 else None
    return Example(tuple(turns[:-1]), turns[-1][1], turns[-1][1], prompt_turns)


def _pair(obj: dict[str, Any], where: str) -> tuple[tuple[str, str], Any, Any] | None:
    """The ``(field names, prompt, completion)`` of a prompt-completion or instruction record (an instruction's
    ``input``, a string or null, joins its prompt)."""
    if "prompt" in obj and "completion" in obj:
        return ("prompt", "completion"), obj["prompt"], obj["completion"]
    if "instruction" in obj and "output" in obj:
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string or null, got {type(extra).__name__}")
        suffix = f"\n\n{extra}" if isinstance(extra, str) and extra else ""
        instruction = obj["instruction"]
        return ("instruction", "output"), instruction + suffix if isinstance(instruction, str) else None, obj["output"]
    return None


def _record_to_example(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("tools"):  # TRL passes them to the chat template, which renders them into the prompt
        raise DataError(
            f"{where}: the record has 'tools', which lordba does not render (nor does lordba serve take them); "
            "describe the tools in a system message as the model should see them"
        )
    if "messages" in obj:
        return _conversation(_turns(obj["messages"], where, "messages"), where)
    pair = _pair(obj, where)
    if pair is None and "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example((), obj["text"])
    if pair is None:
        raise DataError(
            f"{where}: unknown record; expected 'messages', 'prompt'+'completion', 'instruction'+'output' or 'text'"
        )
    fields, prompt, completion = pair
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        asked = _turns(prompt, where, "prompt")
        # a prompt ending on the assistant's turn has no generation prompt to split at (TRL continues that turn)
        split = len(asked) if asked[-1][0] != "assistant" else None
        return _conversation(asked + _turns(completion, where, "completion"), where, split)
    if not (isinstance(prompt, str) and isinstance(completion, str)) or not completion.strip():
        raise DataError(
            f"{where}: {fields[0]!r} and {fields[1]!r} must both be strings (the answer non-empty) "
            "or both lists of messages"
        )
    return Example((("user", prompt),), completion, completion, plain=fields[0] == "prompt")


def _check_text(example: Example, where: str) -> Example:
    """``example`` if all its strings are text; JSON escapes half a UTF-16 surrogate pair (``"\\ud83d"``, an emoji
    cut by a JavaScript scraper) into a str that is not, which the tokenizer fails on naming nothing."""
    for text in (*(c for _, c in example.messages), example.completion):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                f"{where}: a lone UTF-16 surrogate escape ({text[err.start]!r} at character {err.start}) is not "
                "text; remove it or restore its pair"
            ) from None
    return example


def read_jsonl(path: str | Path, max_bytes: int = 2 << 30) -> list[Example]:
    """Read a JSONL file of records; a malformed line raises :class:`DataError` with its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.stat().st_size > max_bytes:
        raise DataError(f"{path}: larger than {max_bytes} bytes")
    examples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                example = _check_text(_record_to_example(obj, where), where)
                example.meta["where"] = where  # named by encode_examples' errors
                examples.append(example)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 ({err})") from None
    if not examples:
        raise DataError(f"{path}: no records")
    return examples
