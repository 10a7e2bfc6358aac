"""The series of ``lordba reproduce``, by name, and how the issue's targets group them."""

from __future__ import annotations

LORDBA_PTQ, LORDBA_QAT, TRUNCATED = "LoRDBA ptq", "LoRDBA qat", "fp16 LoRA (SVD-truncated)"
LORDBA_PTQ_FP16 = "LoRDBA ptq (float16 scales)"
LORDBA_PTQ_INT4, LORDBA_QAT_INT4 = "LoRDBA ptq (int4 scales)", "LoRDBA qat (int4 scales)"
LORDBA_SCALES_INT4 = "LoRDBA scales-only (int4 scales)"
LORA, LORA_SMALL = "fp16 LoRA", "fp16 LoRA (trained at matched bytes)"
LORDBA_SCALES = "LoRDBA scales-only"
LORDBA_ALLOCATED = "LoRDBA ptq (allocated ranks)"
LORDBA_CALIBRATED = "LoRDBA ptq (calibrated)"
LORDBA_ALLOCATED_CAL = "LoRDBA ptq (allocated ranks, calibrated)"
RTN, LORAQUANT, BITDELTA = "RTN", "LoRAQuant-style", "BitDelta-style"
# the variants judged against the uniform ptq rank at the same file size (allocation_vs_uniform)
AGAINST_UNIFORM = {
    LORDBA_ALLOCATED: "per-layer ranks, ΔW error",
    LORDBA_CALIBRATED: "uniform rank, activation-weighted",
    LORDBA_ALLOCATED_CAL: "per-layer ranks, output error (activation-weighted)",
}
# the targets: training-free LoRDBA against the training-free baselines, trained LoRDBA
# against the fp16 LoRA r=16
TRAINING_FREE_LORDBA = (
    LORDBA_PTQ,
    LORDBA_PTQ_FP16,
    LORDBA_PTQ_INT4,
    LORDBA_ALLOCATED,
    LORDBA_CALIBRATED,
    LORDBA_ALLOCATED_CAL,
)
TRAINING_FREE_BASELINES = (LORAQUANT, RTN, BITDELTA, TRUNCATED)
TRAINED_LORDBA = (LORDBA_QAT, LORDBA_QAT_INT4, LORDBA_SCALES, LORDBA_SCALES_INT4)
BPW_RANGE = (0.75, 2.5)  # the sizes the training-free target covers
TRAINED_MAX_BPW = 1.5  # the trained target's size
