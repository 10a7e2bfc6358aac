"""Helper for test_loop.py: a slow training run that the test kills with SIGKILL."""

import os
import time

import torch
from test_loop import model, rows

from lordba.train import TrainSettings, train_loop
from lordba.train.tokenize import Batcher

SETTINGS = TrainSettings(steps=40, lr=3e-3, checkpoint_every=4)


def build():
    return model()


class SlowBatcher(Batcher):
    def batch(self, k):
        time.sleep(0.05)
        return super().batch(k)


def run(out):
    train_loop(build(), SlowBatcher(rows(), 4), SETTINGS, __import__("pathlib").Path(out), progress=False)


def numeric_state() -> dict:
    """The process-wide settings that change float results (threads, matmul precision, flushed denormals, ...) and
    the environment that sets them: told when the SIGKILL test's resumed run differs from the fresh one."""
    denormal = torch.tensor([1e-38]) * torch.tensor([1e-2])
    return {
        "threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "fp32_precision": str(getattr(torch.backends, "fp32_precision", None)),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "denormals_flushed": bool(denormal.item() == 0.0),
        "autocast_cpu": torch.is_autocast_enabled("cpu") and str(torch.get_autocast_dtype("cpu")),
        "grad": torch.is_grad_enabled(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("LORDBA", "OMP", "MKL", "KMP", "TORCH"))},
    }
