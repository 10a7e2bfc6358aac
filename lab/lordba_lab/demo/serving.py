"""Many adapters on one base: load, hot-swap, mixed batches, and memory per adapter.

Measures, on a model that already carries the adapters to compare (saved LoRDBA directories):

* load time per adapter and hot-swap time (``hotswap_adapter``: weights replaced in place);
* bytes each loaded adapter adds to the model's memory (packed signs + scales + the inference
  caches, counted after the adapters have run) next to the fp16 LoRA of the same rank, and how
  many adapters of each kind fit in 1 GiB;
* one mixed batch whose rows are routed to all the adapters, checked row by row against running
  each adapter alone (no cross-talk).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lordba.nn.adapter import held_nbytes
from lordba.nn.model import LoRDBAModel

GIB = 2**30


def measure_serving(base_model: torch.nn.Module, tokenizer, adapters: dict[str, Path], prompts: list[str]) -> dict:  # noqa: ANN001
    """Load ``adapters`` (name → directory) onto ``base_model`` and measure; see the module docstring."""
    lm = LoRDBAModel(base_model)
    load_s = {}
    for name, directory in adapters.items():
        t0 = time.perf_counter()
        lm.load_adapter(directory, name)
        load_s[name] = time.perf_counter() - t0
    names = list(adapters)
    lm.set_adapter(names[0])
    fp16_lora = {
        name: sum(2 * a.r * (a.in_features + a.out_features) for a in lm.adapter_modules(name).values())
        for name in names
    }
    # hot-swap: replace the weights of one loaded adapter in place, cycling through the others' files
    swaps = []
    first_dims = {p: a.r for p, a in lm.adapter_modules(names[0]).items()}
    compatible = [n for n in names if {p: a.r for p, a in lm.adapter_modules(n).items()} == first_dims]
    for _ in range(2):
        for name in compatible:
            t0 = time.perf_counter()
            lm.hotswap_adapter(adapters[name], names[0])
            swaps.append(time.perf_counter() - t0)
    lm.hotswap_adapter(adapters[names[0]], names[0])
    # one mixed batch routed to every adapter, checked against each adapter alone
    rows = [prompts[i % len(prompts)] for i in range(len(names))]
    batch = tokenizer(rows, return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = lm(**batch, adapter_names=names).logits
        worst = 0.0
        for i, name in enumerate(names):
            lm.set_adapter(name)
            alone = lm(
                input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
            ).logits
            worst = max(worst, float((mixed[i : i + 1] - alone).abs().max()))
    memory = {name: held_nbytes(list(lm.adapter_modules(name).values())) for name in names}  # after use: caches too
    lm.unload()
    mean_mem = statistics.mean(memory.values())
    mean_lora = statistics.mean(fp16_lora.values())
    return {
        "adapters": names,
        "load_s": load_s,
        "hotswap_s_median": statistics.median(swaps) if swaps else None,
        "hotswaps": len(swaps),
        "memory_bytes": memory,
        "fp16_lora_memory_bytes": fp16_lora,
        "adapters_per_gib": GIB // max(1, int(mean_mem)),
        "fp16_lora_adapters_per_gib": GIB // max(1, int(mean_lora)),
        "mixed_batch_max_abs_diff": worst,
    }
