"""Held-out evaluation: per-example losses (padding-independent), their token-weighted mean, and the
per-example record ``evaluate`` returns for paired intervals."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba.train.evaluate import evaluate, generate_answers, heldout_loss, heldout_losses
from lordba.train.records import Example
from lordba_lab.assets import load_model_and_tokenizer
from tiny_model import char_tokenizer

from conftest import TINY, tiny_llama


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((5, 2), (9, 4), (3, 1), (12, 6), (7, 7)):  # the last: no completion tokens
        ids = torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_per_row_losses_do_not_depend_on_the_batch_they_are_padded_into():
    model, rows = tiny_llama(0), _rows()
    alone = [heldout_losses(model, [r], batch_size=1)[0] for r in rows]
    batched = heldout_losses(model, rows, batch_size=4)
    assert [n for _, n in batched] == [n - p for n, p in ((5, 2), (9, 4), (3, 1), (12, 6), (7, 7))]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone], rel=1e-5)
    assert batched[-1] == (0.0, 0)
    mean = sum(s for s, _ in batched) / sum(n for _, n in batched)
    assert heldout_loss(model, rows, batch_size=2) == pytest.approx(mean, rel=1e-5)
    assert math.isnan(heldout_loss(model, rows[-1:]))


def _full_logits_reference(model, rows):
    out = []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(r["labels"][1:])
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
        out.append((float(loss), int((labels != -100).sum())))
    return out


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (the evaluation falls back to all positions)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_only_the_completion_positions_reach_the_head_and_the_losses_are_the_full_ones():
    model, rows = tiny_llama(0), _rows()
    reference = _full_logits_reference(model, rows)
    for m in (model, _NoLogitsToKeep(model)):
        got = heldout_losses(m, rows, batch_size=3)
        assert [n for _, n in got] == [n for _, n in reference]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in reference], rel=1e-5, abs=1e-6)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    heldout_losses(model, rows[:2], batch_size=2)  # prompts of 2 and 4 tokens: the head sees from position 1
    assert seen == [9 - 1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model_and_tokenizer()[1]


def test_evaluate_returns_one_record_per_example_matching_its_aggregates(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tokenizer)})).eval()
    examples = [Example((("user", f"Say {w}"),), w, w) for w in ("one", "two", "three")]
    scores = iter([True, False, True])
    out = evaluate(model, tokenizer, examples, lambda a, b: next(scores), 2, per_example=True, batch_size=2)
    d = out["per_example"]
    assert d["correct"] == [True, False, True] and out["metric"] == pytest.approx(2 / 3)
    assert len(d["loss_sum"]) == len(d["tokens"]) == 3 and all(n > 0 for n in d["tokens"])
    assert out["eval_loss"] == pytest.approx(sum(d["loss_sum"]) / sum(d["tokens"]))
    plain = evaluate(model, tokenizer, examples, None, 2)
    assert "per_example" not in plain and "metric" not in plain
    assert plain["eval_loss"] == pytest.approx(out["eval_loss"], rel=1e-5)


def _successor_model(tok, chain):
    """A Llama whose next token depends only on the current one: each token of ``chain`` is followed by the next."""
    torch.manual_seed(0)
    vocab = len(tok)
    config = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False, **config))
    ids = tok.convert_tokens_to_ids(chain)
    order = ids + [i for i in range(vocab) if i not in ids]
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = model.model.embed_tokens.weight
        normed = e / e.pow(2).mean(-1, keepdim=True).sqrt()
        for k, token in enumerate(order):
            model.lm_head.weight[order[(k + 1) % vocab]] = 10 * normed[token]
    return model.eval()


def test_generation_stops_at_the_end_of_turn_of_the_models_generation_config():
    """A chat model whose end of turn is not the tokenizer's eos (Gemma's <end_of_turn> beside <eos>, Phi-3's
    <|end|>) lists it in its generation config, where ``generate`` stops (and ``lordba serve``). The evaluation
    passed the tokenizer's eos alone, which replaced the config's: the answer ran on past the end of the turn
    ('4xyz' for '4'), and an exact-match scorer marked it wrong."""
    tok = char_tokenizer()
    tok.eos_token = "<s>"
    model = _successor_model(tok, ["\n", "4", "<|im_end|>", "x", "y", "z"])  # the prompt ends with "assistant\n"
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<s>", "<|im_end|>"])
    examples = [Example((("user", "2+2?"),), "4", "4")]
    assert generate_answers(model, tok, examples, max_new_tokens=5) == ["4"]
    assert evaluate(model, tok, examples, lambda a, b: a == b, 5)["metric"] == 1.0


@pytest.mark.parametrize("setting", [("no_repeat_ngram_size", 1), ("repetition_penalty", 100.0)])
def test_the_answers_are_greedy_as_served_whatever_the_generation_config_adds(setting):
    """The held-out answers applied the model's generation config beyond its stopping ids (a repetition penalty,
    n-gram blocking: Qwen2.5-Instruct's sets one), which ``lordba generate`` / ``serve`` never apply, so the metric
    scored other answers than users get: here the end of turn, already in the prompt, was blocked ('4xyz')."""
    tok = char_tokenizer()
    model = _successor_model(tok, ["\n", "4", "<|im_end|>", "x", "y", "z"])
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>"])
    setattr(model.generation_config, *setting)
    examples = [Example((("user", "2+2?"),), "4", "4")]
    assert generate_answers(model, tok, examples, max_new_tokens=5) == ["4"]
    assert getattr(model.generation_config, setting[0]) == setting[1]  # the model's own config, put back


def test_evaluate_on_no_examples_gives_nan_for_the_metric_as_for_the_loss():
    """An empty held-out set (a filter that kept nothing) raised ZeroDivisionError once a scorer was given,
    after its loss had come out NaN."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok)})).eval()
    out = evaluate(model, tok, [], lambda a, b: a == b, 2, per_example=True)
    assert math.isnan(out["eval_loss"]) and math.isnan(out["metric"])
    assert out["per_example"] == {"loss_sum": [], "tokens": [], "correct": []}
    assert math.isnan(evaluate(model, tok, [], None, 2)["eval_loss"])


def test_the_held_out_loss_is_taken_on_the_turns_the_training_takes_it_on():
    """A job trained on every assistant turn had its held-out loss taken on the last turn only: evaluate
    encoded the examples with encode_examples' default whatever the training's ``train_on``."""
    from lordba.train.tokenize import encode_examples

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok)})).eval()
    examples = [Example((("user", "1+1?"), ("assistant", "two"), ("user", "and +1?")), "3", "3")]
    last = evaluate(model, tok, examples, None, 2, per_example=True)["per_example"]["tokens"]
    every = evaluate(model, tok, examples, None, 2, per_example=True, train_on="all-assistant-turns")
    (row,) = encode_examples(tok, examples, train_on="all-assistant-turns")
    assert every["per_example"]["tokens"] == [sum(t != -100 for t in row["labels"][1:])]
    assert every["per_example"]["tokens"][0] == last[0] + 5  # and "two", "<|im_end|>", "\n" of the first answer


def test_an_evaluation_that_raises_puts_a_training_model_back_in_training_mode():
    """An evaluation that failed part way (out of memory, a bad example) left a model that was training in eval
    mode: dropout off, silently, for the rest of an interactive run. Both evaluations now restore the mode."""
    model = tiny_llama(0).train()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward = broken
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    with pytest.raises(RuntimeError, match="out of memory"):
        heldout_losses(model, rows)
    assert model.training
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_answers(model, char_tokenizer(), [Example((("user", "ab"),), "c")], 2)
    assert model.training
