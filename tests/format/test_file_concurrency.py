"""Adapter directories shared between processes: a reader while a writer saves, and two writers.

A server that hot-swaps an adapter directory a trainer keeps saving into must read the old or
the new adapter, never the config of one with the tensors of the other."""

import hashlib
import threading
import time
import warnings

import torch

from lordba import LoRDBAConfig, LoRDBAError
from lordba.core.packing import pack_signs
from lordba.format.adapter import AdapterState, ModuleRecord, read_adapter


def state(alpha, seed):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(4):
        path = f"model.layers.{i}.mlp.up_proj"
        tensors = {
            "sign_A": pack_signs(torch.randn(8, 64, generator=g)),
            "sign_B": pack_signs(torch.randn(64, 8, generator=g)),
            "scale_in": torch.randn(64, generator=g).half(),
            "scale_mid": torch.randn(8, generator=g).half(),
            "scale_out": torch.randn(64, generator=g).half(),
        }
        modules[path] = ModuleRecord(path, 64, 64, 8, tensors)
    return AdapterState(LoRDBAConfig(r=8, alpha=alpha), modules)


def fingerprint(adapter):
    h = hashlib.sha256()
    for path in sorted(adapter.modules):
        for _, t in sorted(adapter.modules[path].tensors.items()):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return adapter.config.alpha, h.hexdigest()


def run_for(seconds, *targets):
    stop = threading.Event()
    threads = [threading.Thread(target=t, args=(stop,)) for t in targets]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()


def test_reading_while_another_thread_saves_never_mixes_two_adapters(tmp_path):
    """Was: the config was parsed before the checksum check and the header and tensors read by
    path afterwards, so a save in between gave one adapter's alpha with the other's tensors."""
    x, y = state(8.0, 1), state(16.0, 2)
    allowed = set()
    for s in (x, y):
        s.save_pretrained(tmp_path)
        allowed.add(fingerprint(read_adapter(tmp_path)))
    seen, problems = [], []

    def writer(stop):
        i = 0
        while not stop.is_set():
            (x if i % 2 else y).save_pretrained(tmp_path)
            i += 1

    def reader(stop):
        while not stop.is_set():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = fingerprint(read_adapter(tmp_path))
            except LoRDBAError as err:
                problems.append(f"refused: {err}")
                continue
            seen.append(got)
            if got not in allowed:
                problems.append(f"mixed adapter {got}")

    run_for(3.0, writer, reader)
    assert not problems, problems[:3]
    assert len(seen) > 20 and set(seen) == allowed


def test_two_threads_saving_into_one_directory(tmp_path):
    """Was: the second save's recovery deleted the first one's temp files and backups
    (FileNotFoundError, FileExistsError). Saves into one directory are now serialised."""
    x, y = state(8.0, 1), state(16.0, 2)
    x.save_pretrained(tmp_path)
    errors = []

    def saver(s):
        def run(stop):
            while not stop.is_set():
                try:
                    s.save_pretrained(tmp_path)
                except Exception as err:
                    errors.append(repr(err))

        return run

    run_for(2.0, saver(x), saver(y))
    assert not errors, errors[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "lordba_model.safetensors"]
    assert fingerprint(read_adapter(tmp_path)) in {fingerprint(x), fingerprint(y)}


def test_a_read_between_a_running_saves_renames_waits_for_it_instead_of_warning_of_an_interrupted_save(tmp_path):
    """A reader that found the new weights beside the old config (a save between its two renames, its backups
    still there) read the backups and warned that an interrupted save had left the adapter inconsistent.
    While the save still holds the directory's lock, the reader now waits for it and reads what it wrote."""
    import os
    import shutil

    from lordba._util.locks import locked
    from lordba.config import CONFIG_NAME, WEIGHTS_NAME
    from lordba.format.commit import backup_path

    old, new = tmp_path / "old", tmp_path / "new"
    state(1.0, 1).save_pretrained(old)
    state(2.0, 2).save_pretrained(new)
    directory = tmp_path / "adapter"
    shutil.copytree(old, directory)
    want = fingerprint(read_adapter(new))
    got, caught = [], []

    def read() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got.append(fingerprint(read_adapter(directory)))
        caught.extend(str(w.message) for w in seen)

    with locked(directory):  # the save, as commit_files runs it: backups, then the weights, (then the config)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.link(directory / name, backup_path(directory / name))
        os.replace(new / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)
        assert not got  # waiting for the save
        os.replace(new / CONFIG_NAME, directory / CONFIG_NAME)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            backup_path(directory / name).unlink()
    reader.join(30)
    assert got == [want] and not caught
