"""Tokenisation for causal-LM fine-tuning: chat template, loss on the completion only, batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lordba.errors import DataError
from lordba.train.records import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _render(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, str]:
    """``(prompt text, completion text)`` using the tokenizer's chat template when it has one."""
    if not example.messages:
        return "", example.completion + (tokenizer.eos_token or "")
    msgs = [{"role": r, "content": c} for r, c in example.messages]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*msgs, {"role": "assistant", "content": example.completion}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    prompt = "\n\n".join(c for _, c in example.messages) + "\n"
    return prompt, example.completion + (tokenizer.eos_token or "")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of the prompt (for generation)."""
    return tokenizer(_render(tokenizer, example)[0], add_special_tokens=False)["input_ids"]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int = 256
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` (−100 on the prompt) per example, truncated to ``max_length``.

    Examples whose completion would be cut away entirely are refused (:class:`DataError`).
    """
    out = []
    for i, ex in enumerate(examples):
        prompt, completion = _render(tokenizer, ex)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        if all(t == -100 for t in labels):
            raise DataError(f"example {i}: the prompt alone is longer than max_length={max_length}")
        out.append({"input_ids": ids, "labels": labels})
    return out


@dataclass
class Batcher:
    """Deterministic shuffled batches: batch ``k`` of a run depends only on (seed, k), so a resumed
    run sees exactly the batches the interrupted one would have seen."""

    rows: list[dict[str, list[int]]]
    batch_size: int
    seed: int = 0
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.rows:
            raise DataError("no training examples")
        self.batch_size = min(self.batch_size, len(self.rows))

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch number ``k`` (any ``k >= 0``; epochs reshuffle), collated by :func:`collate`."""
        per_epoch = len(self.rows) // self.batch_size
        epoch, pos = divmod(k, per_epoch)
        idx = self._order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return collate([self.rows[i] for i in idx], self.pad_id)


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
