"""Tokenisation for causal-LM fine-tuning: chat template, loss on the completion only, batching."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lordba.errors import ConfigError, DataError
from lordba.train.records import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


TRAIN_ON = ("last-assistant-turn", "all-assistant-turns")


def _template(tokenizer: PreTrainedTokenizerBase, msgs: list[tuple[str, str]], generation: bool) -> str:
    """The chat template applied to ``msgs``; :class:`DataError` if the template refuses them."""
    try:
        return tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in msgs], add_generation_prompt=generation, tokenize=False
        )
    except Exception as err:  # jinja2's TemplateError and the templates' own raise_exception
        roles = [r for r, _ in msgs]
        raise DataError(f"the tokenizer's chat template refuses a conversation with roles {roles}: {err}") from None


def _render(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, str]:
    """``(prompt text, completion text)`` using the tokenizer's chat template when it has one.

    Raises:
        DataError: the template does not render the answer after its generation prompt (a reasoning model's
            that opens a ``<think>`` block there but drops it from answers): no split of the conversation
            into prompt and answer is the template's own, and the plain format would train the adapter on
            text the model never sees in chat.
    """
    if not example.messages:
        return "", example.completion + (tokenizer.eos_token or "")
    if example.plain:  # a standard prompt-completion record: text, as TRL joins it (no template, no separator)
        return example.messages[0][1], example.completion + (tokenizer.eos_token or "")
    msgs = list(example.messages)
    asked = msgs[: example.prompt_turns]  # a prompt-completion record's prompt: all of its completion is trained
    if getattr(tokenizer, "chat_template", None):
        prompt = _template(tokenizer, asked, generation=True)
        full = _template(tokenizer, [*msgs, ("assistant", example.completion)], generation=False)
        if not full.startswith(prompt):
            at = next(i for i, (a, b) in enumerate(zip(prompt, full + "\0")) if a != b)
            raise DataError(
                "the tokenizer's chat template does not render the assistant's answer after its generation prompt "
                f"(the prompt goes on with {prompt[at : at + 30]!r}, the answered conversation with "
                f"{full[at : at + 30]!r}); give the tokenizer a template that does, or remove its chat_template "
                "to train on the plain format"
            )
        return prompt, full[len(prompt) :]
    answer = [c for _, c in msgs[len(asked) :]] + [example.completion]
    return "\n\n".join(c for _, c in asked) + "\n", "\n\n".join(answer) + (tokenizer.eos_token or "")


def _opening(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template renders before the content of a conversation's opening assistant turn (its header, a
    default system prompt): not the assistant's words, so not trained. Found by rendering a marker as that turn
    (a template renders no conversation without messages)."""
    mark = "\ue000lordba\ue000"
    text = _template(tokenizer, [("assistant", mark)], generation=False)
    if mark not in text:
        raise DataError(
            "the tokenizer's chat template does not render an opening assistant turn's content as given; "
            "train on the last assistant turn only"
        )
    return text[: text.index(mark)]


def _pieces_all_turns(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of the whole conversation, trained on every assistant turn: the
    chat template is applied turn by turn and each assistant turn is what its rendering adds."""
    turns = [*example.messages, ("assistant", example.completion)]
    if not getattr(tokenizer, "chat_template", None):
        texts = [c + "\n\n" for _, c in turns[:-2]] + [turns[-2][1] + "\n", turns[-1][1] + (tokenizer.eos_token or "")]
        return [(t, role == "assistant") for t, (role, _) in zip(texts, turns)]
    pieces, covered = [], ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _template(tokenizer, turns[:i], generation=True) if i else _opening(tokenizer)
        after = _template(tokenizer, turns[: i + 1], generation=False)
        if not (before.startswith(covered) and after.startswith(before)):
            raise DataError(
                "the tokenizer's chat template does not render this conversation turn by turn (it rewrites "
                "earlier turns); train on the last assistant turn only"
            )
        pieces += [(before[len(covered) :], False), (after[len(before) :], True)]
        covered = after
    return pieces


def _pieces(tokenizer: PreTrainedTokenizerBase, example: Example, train_on: str) -> list[tuple[str, bool]]:
    if train_on == "all-assistant-turns" and example.messages and not example.plain:
        return _pieces_all_turns(tokenizer, example)
    prompt, completion = _render(tokenizer, example)
    return [(prompt, False), (completion, True)]


def _plain_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before plain text (a BOS token): ``tokenizer(prompt)`` gives them to a prompt of
    `lordba serve`'s /v1/completions and of `lordba generate`."""
    bare, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    return next((full[:k] for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), [])


def _text_prefix(tokenizer: PreTrainedTokenizerBase, example: Example, plain: list[int] | None = None) -> list[int]:
    """:func:`_plain_prefix` (``plain``, where the caller has it) where ``example`` is in the plain format (text, a
    standard prompt-completion record, or no chat template); none for a chat template, which writes its own (the
    rendered text is tokenized without special tokens)."""
    if example.messages and not example.plain and getattr(tokenizer, "chat_template", None):
        return []
    return list(plain if plain is not None else _plain_prefix(tokenizer))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of the prompt (for generation)."""
    return (
        _text_prefix(tokenizer, example)
        + tokenizer(_render(tokenizer, example)[0], add_special_tokens=False)["input_ids"]
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_length: int = 256,
    train_on: str = "last-assistant-turn",
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` (−100 where no loss is taken) per example, truncated to ``max_length``.

    ``train_on`` (one of :data:`TRAIN_ON`) takes the loss on the final assistant answer only, or on
    every assistant turn of a multi-turn conversation.

    Raises:
        DataError: an example whose trained tokens would be cut away entirely (its first token counts for none:
            a causal LM never predicts it), or a conversation the chat template refuses (naming the example's
            index, and the ``file:line`` of one :func:`~lordba.train.records.read_jsonl` read).
        ConfigError: an unknown ``train_on``, or a ``max_length`` that is not a positive integer.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:  # -1 cut off the EOS
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    out, plain = [], _plain_prefix(tokenizer)  # the tokenizer's, once for all examples
    for i, ex in enumerate(examples):
        name = f"{ex.meta['where']} (example {i})" if "where" in ex.meta else f"example {i}"
        ids = _text_prefix(tokenizer, ex, plain)
        labels = [-100] * len(ids)
        try:
            pieces = _pieces(tokenizer, ex, train_on)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        for text, trained in pieces:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += tokens
            labels += tokens if trained else [-100] * len(tokens)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == -100 for t in labels[1:]):  # the first token is never scored: nothing comes before it
            why = (
                "the prompt alone is longer than"
                if labels[:1] == [-100]
                else "only the first token, which a causal LM never predicts, is trained within"
            )
            raise DataError(f"{name}: {why} max_length={max_length}")
        out.append({"input_ids": ids, "labels": labels})
    return out


@dataclass
class Batcher:
    """Deterministic shuffled batches: batch ``k`` of a run depends only on (seed, k), so a resumed
    run sees exactly the batches the interrupted one would have seen. ``seed`` None (the default): the run's,
    ``TrainSettings.seed`` within :func:`~lordba.train.train_loop` and :func:`~lordba.train.build_adapter`
    (:meth:`run_seed`), 0 outside a run."""

    rows: list[dict[str, list[int]]]
    batch_size: int
    seed: int | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.rows:
            raise DataError("no training examples")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"Batcher: batch_size must be a positive integer, got {self.batch_size!r}")
        self.batch_size = min(self.batch_size, len(self.rows))
        self._run_seed: int | None = None

    @property
    def shuffle_seed(self) -> int:
        """The seed the batches are shuffled with: ``seed``, else the run's (:meth:`run_seed`), else 0."""
        if self.seed is not None:
            return self.seed
        return getattr(self, "_run_seed", None) or 0

    @contextlib.contextmanager
    def run_seed(self, seed: int) -> Iterator[Batcher]:
        """Within the block, a batcher built without a ``seed`` shuffles with ``seed`` (the run's)."""
        earlier, self._run_seed = getattr(self, "_run_seed", None), seed
        try:
            yield self
        finally:
            self._run_seed = earlier

    def _order(self, epoch: int) -> list[int]:
        # modulo torch's 64-bit seed: a large seed (a time in nanoseconds) overflowed it; the seeds that fitted keep
        # their order (torch takes a negative seed modulo 2**64 too)
        g = torch.Generator().manual_seed((self.shuffle_seed * 1_000_003 + epoch) % 2**64)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch number ``k`` (any ``k >= 0``; epochs reshuffle), collated by :func:`collate`."""
        per_epoch = len(self.rows) // self.batch_size
        epoch, pos = divmod(k, per_epoch)
        idx = self._order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return collate([self.rows[i] for i in idx], self.pad_id)

    def digest(self) -> str:
        """The sha256 of what the batches are made of (the rows' tokens and labels, in order, the batch size, the
        shuffle seed and the padding id): two batchers with the same digest give the same batch ``k``. A checkpoint
        records it, so that a resume on other data is refused rather than continued."""
        h = hashlib.sha256(f"{len(self.rows)} {self.batch_size} {self.shuffle_seed} {self.pad_id}\n".encode())
        for row in self.rows:
            for key in ("input_ids", "labels"):
                values = np.asarray(row[key], dtype=np.int64)
                h.update(len(values).to_bytes(8, "little") + values.tobytes())
        return h.hexdigest()


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` (−100 on padding)."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def following_run_seed(batcher: object, seed: int) -> contextlib.AbstractContextManager:
    """``batcher.run_seed(seed)`` (:meth:`Batcher.run_seed`), or nothing for a batcher that has none."""
    run_seed = getattr(batcher, "run_seed", None)
    return run_seed(seed) if callable(run_seed) else contextlib.nullcontext()
