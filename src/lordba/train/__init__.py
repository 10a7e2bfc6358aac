"""Training LoRDBA adapters (quantization-aware, straight-through) on a frozen quantized base.

* :mod:`.loop`: the shared training loop (checkpoints, exact resume, NaN guard, progress).
* :mod:`.modes`: the four modes of SPEC §3 (``ptq``, ``qat``, ``qat-from-lora``, ``scales-only``).
* :mod:`.lora`: the fp16 LoRA side (seeds and baselines, through PEFT).
* :mod:`.evaluate`: held-out loss and exact match.
* :mod:`.job`: one end-to-end run, as ``lordba train`` does it.

``transformers.Trainer`` also works unchanged on a :class:`~lordba.LoRDBAModel`.
"""

from .job import TrainJob, run_job
from .loop import TrainResult, TrainSettings, train_loop
from .modes import build_adapter, init_from_lora

__all__ = ["TrainJob", "TrainResult", "TrainSettings", "build_adapter", "init_from_lora", "run_job", "train_loop"]
