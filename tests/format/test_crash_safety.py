"""Crash safety: a save or an export killed at any point leaves the old result or the new one.

Every file-system step of a save is a kill point (:mod:`lordba_lab.fuzz.crash`): the child is killed
just before each step in turn, then the directory is loaded and compared with the old and the new
adapter. Random-time kills of a child saving in a loop catch what falls between steps (a partly
written temp file). The writers run in forked children with precomputed bytes (fast); the slow
tests drive the real ``save_pretrained`` and ``lordba export-lora`` in subprocesses.
"""

import hashlib
import shutil
import sys
import textwrap
import time
import warnings

import pytest
import torch

from lordba import LoRDBAError
from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba.format.adapter import _pair_consistent, read_adapter, serialize
from lordba.format.atomic import atomic_directory
from lordba.format.commit import commit_files
from lordba_lab.fuzz.corpus import random_state
from lordba_lab.fuzz.crash import count_steps, kill_test, random_kill_test

SIGNATURE = "lordba_model.safetensors"


def files_of(seed):
    import random

    state = random_state(random.Random(seed), "float16")
    weights, config = serialize(state.config, state.modules)
    return {WEIGHTS_NAME: weights, CONFIG_NAME: config}


OLD, NEW, NEWER = files_of(1), files_of(2), files_of(3)
LABELS = {
    hashlib.sha256(f[WEIGHTS_NAME]).hexdigest(): name for name, f in (("old", OLD), ("new", NEW), ("newer", NEWER))
}


def commit(directory, files):
    commit_files(directory, files, _pair_consistent)


def loaded_label(directory):
    """Which adapter ``directory`` loads as; 'absent' when there is no adapter config at all."""
    if not (directory / CONFIG_NAME).exists():
        return "absent"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adapter = read_adapter(directory)
        except LoRDBAError as err:
            return f"unloadable: {err}"
    return LABELS.get(adapter.sha256, "unknown")


def classify_then_save_again(directory, files_next):
    """The label of what was left, after checking that the next normal save cleans up."""
    label = loaded_label(directory)
    probe = directory.parent / "next"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(directory, probe) if directory.exists() else probe.mkdir()
    commit(probe, files_next)
    assert sorted(p.name for p in probe.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert loaded_label(probe) == LABELS[hashlib.sha256(files_next[WEIGHTS_NAME]).hexdigest()]
    return label


def interrupted_state(directory):
    """What a save of NEW over OLD killed between its two renames leaves."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f".{WEIGHTS_NAME}.lordba-prev").write_bytes(OLD[WEIGHTS_NAME])
    (directory / f".{CONFIG_NAME}.lordba-prev").write_bytes(OLD[CONFIG_NAME])
    (directory / WEIGHTS_NAME).write_bytes(NEW[WEIGHTS_NAME])
    (directory / CONFIG_NAME).write_bytes(OLD[CONFIG_NAME])


def reset(directory, content):
    shutil.rmtree(directory, ignore_errors=True)
    if content == "interrupted":
        interrupted_state(directory)
    elif content is not None:
        directory.mkdir(parents=True)
        for name, data in content.items():
            (directory / name).write_bytes(data)


@pytest.mark.parametrize(
    "before, allowed",
    [
        (OLD, {"old", "new"}),
        (None, {"absent", "new"}),  # first save: no adapter, or the complete new one
        ("interrupted", {"old", "new"}),  # the save first restores OLD from the backups
    ],
    ids=["over-an-adapter", "first-save", "after-an-interrupted-save"],
)
def test_save_killed_before_each_step_leaves_old_or_new(tmp_path, before, allowed):
    target = tmp_path / "adapter"
    outcomes = kill_test(
        lambda: commit(target, NEW),
        under=tmp_path,
        prepare=lambda: reset(target, before),
        classify=lambda: classify_then_save_again(target, NEWER),
        allowed=allowed,
    )
    assert len(outcomes) >= 8 and outcomes[-1].state == "new"
    states = {o.state for o in outcomes}
    assert states == allowed  # both ends are reached: the kill points span the whole save


def test_save_killed_at_random_times_in_a_loop(tmp_path):
    target = tmp_path / "adapter"

    def save_forever():
        while True:
            commit(target, NEW)
            commit(target, OLD)

    reset(target, OLD)
    start = time.perf_counter()
    commit(target, NEW)
    commit(target, OLD)
    cycle = time.perf_counter() - start  # kills spread over a few cycles however busy the machine is
    outcomes = random_kill_test(
        save_forever,
        prepare=lambda: reset(target, OLD),
        classify=lambda: classify_then_save_again(target, NEWER),
        allowed={"old", "new"},
        iterations=60,
        max_delay=max(0.02, 4 * cycle),
    )
    assert {o.state for o in outcomes} == {"old", "new"}


def export_files(seed):
    import random
    import tempfile
    from pathlib import Path

    from lordba.convert.export import export_lora
    from lordba_lab.fuzz.corpus import random_state as rs

    with tempfile.TemporaryDirectory() as tmp:
        out = export_lora(rs(random.Random(seed), "float32"), Path(tmp) / "x")
        return {p.name: p.read_bytes() for p in out.iterdir()}


def export_label(out, exports):
    if not out.exists():
        return "absent"
    content = {p.name: p.read_bytes() for p in out.iterdir()}
    return next((name for name, files in exports.items() if files == content), f"broken: {sorted(content)}")


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new-directory"])
def test_export_directory_killed_before_each_step(tmp_path, existing):
    exports = {"old": export_files(1), "new": export_files(2)}
    out = tmp_path / "lora"

    def write_export():
        with atomic_directory(out, overwrite=True) as tmp:
            for name, data in exports["new"].items():
                (tmp / name).write_bytes(data)

    def prepare():
        for p in tmp_path.iterdir():
            shutil.rmtree(p)
        if existing:
            out.mkdir()
            for name, data in exports["old"].items():
                (out / name).write_bytes(data)

    def classify():
        label = export_label(out, exports)
        write_export()  # the next export cleans up what the killed one left
        assert [p.name for p in tmp_path.iterdir()] == ["lora"] and export_label(out, exports) == "new"
        return label

    outcomes = kill_test(
        write_export, tmp_path, prepare, classify, allowed={"old", "new"} if existing else {"absent", "new"}
    )
    assert outcomes[-1].state == "new" and len(outcomes) >= 4


def test_restoring_backups_of_three_files_killed_before_each_step(tmp_path):
    """commit_files is generic (a checkpoint may hold more than two files): a save killed while
    it restores the backups of an earlier interrupted save still leaves a consistent set."""
    names = ["a", "b", "c"]
    target = tmp_path / "set"

    def consistent(paths):
        return len({paths[n].read_bytes() for n in names}) == 1

    def prepare():  # a save of Y over X killed after two of its three renames
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for name, data in zip(names, (b"Y", b"Y", b"X")):
            (target / name).write_bytes(data)
            (target / f".{name}.lordba-prev").write_bytes(b"X")

    def classify():
        from lordba.format.commit import consistent_files

        found = consistent_files(target, names, consistent)
        return "broken" if found is None else found["a"].read_bytes().decode()

    child = lambda: commit_files(target, {n: b"Z" for n in names}, consistent)  # noqa: E731
    outcomes = kill_test(child, tmp_path, prepare, classify, allowed={"X", "Z"})
    assert {o.state for o in outcomes} == {"X", "Z"}


def test_step_counting_sees_every_rename_and_fsync(tmp_path):
    target = tmp_path / "adapter"
    reset(target, OLD)
    steps = count_steps(lambda: commit(target, NEW), under=tmp_path)
    kinds = [s.split()[0] for s in steps]
    assert kinds.count("replace") == 2 and kinds.count("link") == 2 and "fsync" in kinds
    assert any(s.endswith(WEIGHTS_NAME) for s in steps if s.startswith("replace"))


CHILD_SAVE_LOOP = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from lordba import LoRDBAConfig, get_lordba_model
    models = []
    for seed in (1, 2):
        base = tiny_llama(0)  # seeds torch itself
        torch.manual_seed(seed)
        models.append(get_lordba_model(base, LoRDBAConfig(r=8, init="random")))
    print("ready", flush=True)
    i = 0
    while True:
        models[i % 2].save_pretrained({target!r})
        i += 1
    """
)


@pytest.mark.parametrize("iterations", [pytest.param(40, marks=pytest.mark.slow, id="long")])
def test_real_save_pretrained_killed_at_random_times(tmp_path, iterations):
    """End to end: a child process saves two adapters of a model in turn, SIGKILLed at random
    times; what is left always loads onto a fresh model as one of the two, bit for bit."""
    from pathlib import Path

    from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model

    from conftest import tiny_llama

    target = tmp_path / "adapter"
    refs = {}
    for name, seed in (("first", 1), ("second", 2)):
        base = tiny_llama(0)  # seeds torch itself
        torch.manual_seed(seed)
        get_lordba_model(base, LoRDBAConfig(r=8, init="random")).save_pretrained(tmp_path / name)
        refs[name] = read_adapter(tmp_path / name).sha256
    assert refs["first"] != refs["second"]
    ids = torch.arange(12).reshape(2, 6)

    def classify():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = read_adapter(target)
            loaded = LoRDBAModel.from_pretrained(tiny_llama(0), target)
        label = next(k for k, v in refs.items() if v == adapter.sha256)
        reference = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / label)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
        return label

    code = CHILD_SAVE_LOOP.format(tests=str(Path(__file__).parent), target=str(target))
    outcomes = random_kill_test(
        ["-c", code],
        prepare=lambda: shutil.copytree(tmp_path / "first", target, dirs_exist_ok=True),
        classify=classify,
        allowed={"first", "second"},
        iterations=iterations,
        max_delay=0.3,
        env={"PYTHONPATH": ":".join(sys.path)},
    )
    assert len(outcomes) == iterations


ATOMIC_WRITE = textwrap.dedent(
    """
    import os, sys
    target = sys.argv[1]
    with open(target + ".tmp", "w") as f:
        f.write("new")
        f.flush()
        os.fsync(f.fileno())
    os.replace(target + ".tmp", target)
    """
)


def test_command_line_children_are_killed_before_each_step(tmp_path):
    """The command-line mode (for lordba convert, training scripts): python -m lordba_lab.fuzz.crash
    runs the command with the step hooks and kills it at the requested step."""
    target = tmp_path / "file"

    def prepare():
        for p in tmp_path.iterdir():
            p.unlink()
        target.write_text("old")

    outcomes = kill_test(
        ["-c", ATOMIC_WRITE, str(target)],
        tmp_path,
        prepare,
        classify=lambda: target.read_text(),
        allowed={"old", "new"},
        env={"PYTHONPATH": ":".join(sys.path)},
    )
    assert [o.where.split(": ")[-1] for o in outcomes[:-1]] == ["open file.tmp", "fsync file.tmp", "replace file"]
    assert [o.state for o in outcomes] == ["old", "old", "old", "new"]


@pytest.mark.slow
def test_lordba_export_lora_command_killed_before_each_step(tmp_path):
    """End to end through the CLI: `lordba export-lora --overwrite` killed before each step leaves
    the previous export or the new one (one process start per step: slow)."""
    from lordba.convert.export import export_lora

    src = tmp_path / "adapter"
    torch.manual_seed(0)
    reset(src, NEW)
    out = tmp_path / "lora"
    refs = {}
    for name, files in (("old", OLD), ("new", NEW)):
        reset(tmp_path / f"src-{name}", files)
        export_lora(tmp_path / f"src-{name}", tmp_path / f"ref-{name}")
        refs[name] = {p.name: p.read_bytes() for p in (tmp_path / f"ref-{name}").iterdir()}

    def prepare():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp_path / "ref-old", out)

    outcomes = kill_test(
        ["-m", "lordba", "export-lora", str(src), str(out), "--overwrite"],
        out.parent,
        prepare,
        classify=lambda: export_label(out, refs),
        allowed={"old", "new"},
        env={"PYTHONPATH": ":".join(sys.path)},
    )
    assert {o.state for o in outcomes} == {"old", "new"}
