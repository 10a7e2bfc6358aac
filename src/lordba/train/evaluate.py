"""Held-out evaluation: mean loss on the completions, and exact match by greedy generation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lordba._util.modules import end_of_sequence_ids, eval_mode, generation_stopping_only
from lordba.train.records import Example
from lordba.train.tokenize import collate, encode_examples, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's first parameter lives (inputs go there)."""
    return next(model.parameters()).device


def _completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions: transformers' ``logits_to_keep`` spares the output head
    the prompt positions (a 262k-token head made them most of the evaluation); models without it are
    run in full and sliced."""
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    except TypeError:  # a forward without logits_to_keep
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -keep:]


@torch.no_grad()
def heldout_losses(
    model: torch.nn.Module, rows: list[dict], batch_size: int = 16, pad_id: int = 0
) -> list[tuple[float, int]]:
    """Per row of ``rows`` (encoded examples): ``(summed cross-entropy over its completion tokens, number
    of those tokens)``, in the rows' order."""
    with eval_mode(model):
        return _heldout_losses(model, rows, batch_size, pad_id)


def _heldout_losses(model: torch.nn.Module, rows: list[dict], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    device = _device(model)
    out: list[tuple[float, int]] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        labels = batch["labels"]
        length = labels.shape[1]
        labelled = (labels[:, 1:] != -100).any(0).nonzero()
        if len(labelled) == 0:  # nothing to score in this batch
            out += [(0.0, 0)] * labels.shape[0]
            continue
        keep = length - int(labelled[0])  # logits from the position before the first scored token on
        logits = _completion_logits(model, batch, keep)
        scored = labels[:, length - keep + 1 :]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), scored, reduction="none", ignore_index=-100
        )
        counts = (scored != -100).sum(1)
        out += [(float(x), int(n)) for x, n in zip(losses.sum(1).tolist(), counts.tolist())]
    return out


def heldout_loss(model: torch.nn.Module, rows: list[dict], batch_size: int = 16, pad_id: int = 0) -> float:
    """Token-weighted mean cross-entropy over the completion tokens of ``rows`` (NaN if they have none)."""
    per_row = heldout_losses(model, rows, batch_size, pad_id)
    count = sum(n for _, n in per_row)
    return sum(s for s, _ in per_row) / count if count else math.nan


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions (left-padded batches, stopping at end of turn), as ``lordba generate`` / ``serve`` make
    them: none of the model's generation config but its stopping ids (no repetition penalty, n-gram blocking)."""
    with eval_mode(model), generation_stopping_only(model):
        return _generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)


def _generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, ex) for ex in examples[i : i + batch_size]]
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, n - len(p) :] = torch.tensor(p)
            mask[j, n - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(_device(model)),
            attention_mask=mask.to(_device(model)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(end_of_sequence_ids(model, tokenizer)) or None,  # as lordba serve stops
        )
        outputs += tokenizer.batch_decode(gen[:, n:].cpu(), skip_special_tokens=True)
    return outputs


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    score: Callable[[str, str], bool] | None,
    max_new_tokens: int,
    max_length: int = 256,
    per_example: bool = False,
    batch_size: int = 16,
    train_on: str = "last-assistant-turn",
) -> dict:
    """``{"eval_loss", "metric"}`` on held-out examples (``metric`` only when a scorer is given; both NaN
    without examples). ``train_on``: the turns the loss is taken on, as in
    :func:`~lordba.train.tokenize.encode_examples` (the training's, for a held-out loss of the same tokens).

    ``per_example``: also ``"per_example": {"loss_sum", "tokens"[, "correct"]}``, one entry per
    example in order (completion cross-entropy summed over its tokens, their number, whether the greedy
    answer scored), for paired comparisons and confidence intervals. ``batch_size``: examples per
    forward pass (and per generation batch)."""
    pad = tokenizer.pad_token_id or 0
    rows = heldout_losses(model, encode_examples(tokenizer, examples, max_length, train_on), batch_size, pad)
    count = sum(n for _, n in rows)
    result: dict = {"eval_loss": sum(s for s, _ in rows) / count if count else math.nan}
    details: dict[str, list] = {"loss_sum": [s for s, _ in rows], "tokens": [n for _, n in rows]}
    if score is not None:
        answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)
        correct = [bool(score(a, ex.answer)) for a, ex in zip(answers, examples)]
        result["metric"] = sum(correct) / len(examples) if examples else math.nan  # as eval_loss: nothing scored
        details["correct"] = correct
    if per_example:
        result["per_example"] = details
    return result
