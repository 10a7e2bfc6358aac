"""The main job: ``lordba demo`` (LoRDBA vs fp16 LoRA and low-bit baselines on a real model) and
``lordba reproduce`` (the longer sweep of the paper's comparisons)."""

from lordba_lab.demo.run import FULL, QUICK, DemoSettings, run_demo

__all__ = ["FULL", "QUICK", "DemoSettings", "run_demo"]
