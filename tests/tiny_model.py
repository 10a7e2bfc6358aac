"""A tiny transformers model folder with a character-level tokenizer and a ChatML chat template:
what `lordba train --model DIR` reads, built in milliseconds and offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<s>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline, ChatML specials, a chat template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<s>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama (hidden 40) and the character tokenizer into ``path``."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=40,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chat_jsonl(path: Path, n: int = 16, offset: int = 0) -> Path:
    """``n`` one-turn chat records (sums of small numbers) as JSONL."""
    lines = []
    for i in range(offset, offset + n):
        a, b = i % 7, (3 * i) % 5
        messages = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def save_peft_lora(base: torch.nn.Module, out: Path, seed: int, modules_to_save: list[str] | None = None) -> Path:
    """A real PEFT LoRA (r = 8 on q, v and up projections) on ``base`` whose update changes its greedy tokens (B drawn
    N(0, 1); its ``modules_to_save`` perturbed too), saved to ``out``; returns ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=modules_to_save
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(out)
    return out
