"""Training LoRDBA adapters (quantization-aware, straight-through) on a frozen quantized base.

* :mod:`.loop`: the shared training loop (checkpoints, exact resume, NaN guard, progress).
* :mod:`.modes`: the four modes of SPEC §3 (``ptq``, ``qat``, ``qat-from-lora``, ``scales-only``).
* :mod:`.lora`: the fp16 LoRA side (seeds and baselines, through PEFT).
* :mod:`.evaluate`: held-out loss and exact match.
* :mod:`.records` / :mod:`.tokenize`: training records (JSONL) and chat-template tokenisation.

``transformers.Trainer`` also works unchanged on a :class:`~lordba.LoRDBAModel`.
"""

from lordba.train.loop import TrainResult, TrainSettings, train_loop
from lordba.train.modes import build_adapter, init_from_lora

__all__ = ["TrainResult", "TrainSettings", "build_adapter", "init_from_lora", "train_loop"]
