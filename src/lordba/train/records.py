"""The training record and the JSONL reader for users' own data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lordba.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training/evaluation record.

    ``messages`` is the prompt as chat turns (ending with a user turn) and ``completion`` the
    assistant answer the loss is taken on; or, for plain language-model data, ``messages`` is empty
    and ``completion`` is the whole text. ``answer`` is the reference for exact-match metrics.
    """

    messages: tuple[tuple[str, str], ...]
    completion: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _record_to_example(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two turns")
        turns = []
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            if not ok:
                raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return Example(tuple(turns[:-1]), turns[-1][1], turns[-1][1])
    if "prompt" in obj and "completion" in obj:
        fields = ("prompt", "completion")
        prompt, completion = obj["prompt"], obj["completion"]
    elif "instruction" in obj and "output" in obj:
        fields = ("instruction", "output")
        prompt = obj["instruction"] + (
            f"\n\n{obj['input']}" if isinstance(obj.get("input"), str) and obj["input"] else ""
        )
        completion = obj["output"]
    elif "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example((), obj["text"])
    else:
        raise DataError(
            f"{where}: unknown record; expected 'messages', 'prompt'+'completion', 'instruction'+'output' or 'text'"
        )
    if not (isinstance(prompt, str) and isinstance(completion, str)) or not completion.strip():
        raise DataError(f"{where}: {fields[0]!r} and {fields[1]!r} must be strings, the answer non-empty")
    return Example((("user", prompt),), completion, completion)


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
                examples.append(_record_to_example(obj, where))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 ({err})") from None
    if not examples:
        raise DataError(f"{path}: no records")
    return examples
