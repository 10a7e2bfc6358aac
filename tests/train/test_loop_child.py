"""Helper for test_loop.py: a slow training run that the test kills with SIGKILL."""

import time

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
