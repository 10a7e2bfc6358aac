"""The commands' scale-format defaults follow the measurements (docs/format.md): int8 for
``lordba convert`` and ``lordba train`` (and the lab's TrainJob); int4 is accepted by both."""

import argparse

import pytest


def _parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_convert_defaults_to_int8_and_accepts_int4():
    from lordba.cli import convert_cmd

    assert _parse(convert_cmd, ["in", "out"]).scale_dtype == "int8"
    assert _parse(convert_cmd, ["in", "out", "--scale-dtype", "int4"]).scale_dtype == "int4"


def test_train_defaults_to_int8_and_accepts_int4():
    pytest.importorskip("lordba_lab")
    from lordba_lab.cli import train_cmd
    from lordba_lab.train_job import TrainJob

    assert _parse(train_cmd, ["--out", "x"]).scale_dtype == "int8"
    assert _parse(train_cmd, ["--out", "x", "--scale-dtype", "int4"]).scale_dtype == "int4"
    assert TrainJob.__dataclass_fields__["scale_dtype"].default == "int8"
