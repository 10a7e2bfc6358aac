"""Training checkpoints without pickle: trainable tensors, optimizer state and RNG in safetensors,
the rest in JSON, written as one directory atomically (a killed write leaves the previous one).

Each checkpoint records the sha256 of its files in ``checksums.json`` (as an adapter's config
records its weights' digest). Resuming reads and verifies a checkpoint completely before touching
the model: a truncated, bit-flipped or incomplete checkpoint is skipped with a warning naming it
and the reason, and the newest intact one is used; if every checkpoint is damaged, resuming
raises :class:`~lordba.errors.TrainingError` (never a fresh start that would discard them silently).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors

from lordba._util.jsonio import decode_nonfinite, encode_nonfinite, parse_json
from lordba.errors import LoRDBAError, TrainingError
from lordba.format.atomic import TMP_MARK, atomic_directory, remove_killed_temporaries
from lordba.format.tensorfile import to_bytes

PREFIX = "step-"
MANIFEST = "checksums.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
_MAX_MANIFEST_BYTES = 1 << 16


@dataclass
class Checkpoint:
    """A checkpoint read and verified in memory: its tensors and ``state.json``."""

    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Every parameter of ``optimizer`` by name: the model's trainable ones and any frozen ones built in too (no state
    unless they trained before; theirs is kept by name as well).

    Raises:
        TrainingError: the optimizer holds a parameter that is not ``model``'s.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise TrainingError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one of the model's: "
                    "build it over the model's parameters"
                )
    return names


def _flatten_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Optimizer state as ``(tensors, json-able structure)``; parameters identified by name."""
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, idx in zip(group["params"], sd_group["params"]):
            index_to_name[idx] = names[id(p)]
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"{index_to_name[idx]}::{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, GROUP_NAMES: [names[id(p)] for p in group["params"]]}
        for group, g in zip(optimizer.param_groups, sd["param_groups"])
    ]
    return tensors, {"groups": groups, "scalars": scalars}


GROUP_NAMES = "param_names"  # a saved parameter group's parameters, by name


def _matched_groups(optimizer: torch.optim.Optimizer, names: dict[int, str], saved: list, path: Path) -> list[dict]:
    """The saved parameter group of each of ``optimizer``'s groups (its hyper-parameters), matched by the names of
    their parameters (the groups of a checkpoint of an earlier version, which records no names, by position).

    Raises:
        TrainingError: the groups do not match (another number of them, or a group of other parameters).
    """
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    if all(isinstance(g, dict) and isinstance(g.get(GROUP_NAMES), list) for g in saved):
        by_names = {frozenset(g[GROUP_NAMES]): g for g in saved}
        unmatched = [sorted(group)[:3] for group in current if frozenset(group) not in by_names]
        if not unmatched and len(saved) == len(current):
            return [{k: v for k, v in by_names[frozenset(group)].items() if k != GROUP_NAMES} for group in current]
        raise TrainingError(
            f"{path}: the optimizer's {len(current)} parameter group(s) are not the checkpoint's {len(saved)} by "
            f"parameter name (unmatched: a group of {unmatched[0] if unmatched else current[-1][:3]}...): build the "
            "optimizer's groups over the parameters the run that saved it grouped"
        )
    if len(saved) != len(current):
        raise TrainingError(
            f"{path}: the optimizer has {len(current)} parameter group(s), the checkpoint {len(saved)}: build the "
            "optimizer's groups as the run that saved it did"
        )
    return saved


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, structure: dict, groups: list[dict]
) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, idx in zip(group["params"], sd_group["params"]):
            prefix = names[id(p)] + "::"
            entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            entry.update({k[len(prefix) :]: v for k, v in structure["scalars"].items() if k.startswith(prefix)})
            if entry:
                state[idx] = entry
    for sd_group, saved in zip(sd["param_groups"], groups):
        sd_group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _rng_states() -> dict[str, torch.Tensor]:
    """The torch generators' states: the CPU's (``torch``) and, on a CUDA machine, each GPU's
    (``cuda.<index>``: dropout on the GPU draws from it, so an exact resume needs it)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s.cpu() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _restore_cuda_rng(rng: dict[str, torch.Tensor], path: Path) -> None:
    """Restore the GPUs' generators a checkpoint holds; a warning (and the seeded state) when this
    machine has no CUDA or another number of GPUs."""
    saved = [rng[f"cuda.{i}"] for i in range(len(rng)) if f"cuda.{i}" in rng]
    if not saved:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count != len(saved):
        warnings.warn(
            f"{path}: holds {len(saved)} CUDA generator states, this machine has {count} GPU(s); they are not "
            "restored, so random draws on the GPU (dropout) differ from an uninterrupted run",
            stacklevel=3,
        )
        return
    torch.cuda.set_rng_state_all(saved)


def save_checkpoint(
    directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write ``directory/step-<step>`` atomically, with the sha256 of each file in ``checksums.json``,
    and keep only the newest ``keep`` checkpoints up to this one (newer ones, left by a run resumed from an
    older one past them, are not counted). Returns the checkpoint's path."""
    params = _trainable(model)
    opt_tensors, opt_structure = _flatten_optimizer(optimizer, _param_names(model, optimizer))
    np_state = np.random.get_state()
    meta = {
        "step": step,
        "extra": extra,
        "optimizer": opt_structure,
        "python_random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_random": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    files = {
        "trainable.safetensors": to_bytes({n: p.detach().cpu() for n, p in params.items()}),
        "optimizer.safetensors": to_bytes(opt_tensors),
        "rng.safetensors": to_bytes(_rng_states()),
        "state.json": json.dumps(encode_nonfinite(meta), allow_nan=False).encode(),
    }
    manifest = {"sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    out = directory / f"{PREFIX}{step:08d}"
    with atomic_directory(out, overwrite=True) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    # the newest ``keep`` up to this one: a newer one (damaged, skipped by the resume that led here) must not
    # take a place, or the checkpoint just written would be removed at once; it is replaced when its step comes
    for old in sorted(p for p in directory.glob(f"{PREFIX}*") if p.name <= out.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_killed_saves(directory)
    return out


def _remove_killed_saves(directory: Path) -> None:
    """Remove the temporary folders (``.step-*.lordba-tmp.PID.*``) of saves whose process is gone: a save killed by a
    signal it cannot catch (SIGKILL, the out-of-memory killer) left its half-written checkpoint there, which only a
    later save of the same step removed."""
    remove_killed_temporaries(directory, f".{PREFIX}*{TMP_MARK}*")


def clear_checkpoints(directory: Path) -> int:
    """Remove the checkpoints in ``directory`` (a run started over: its own are then the only ones, so that
    neither pruning nor a later resume takes an earlier run's newer steps for its own), and the half-written ones
    of killed saves; returns how many checkpoints. Raises ``OSError`` if one cannot be removed."""
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir()] if directory.is_dir() else []
    for path in found:
        shutil.rmtree(path)
    _remove_killed_saves(directory)
    return len(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (temporary, half-written ones never qualify;
    its content is not verified: :func:`resume_checkpoint` does that)."""
    found = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TrainingError(f"{path}: missing") from None
    except OSError as err:
        raise TrainingError(f"{path}: cannot read ({err.strerror})") from None


def _json(data: bytes, where: Path) -> dict[str, Any]:
    try:
        value = parse_json(data, str(where))
    except LoRDBAError as err:
        raise TrainingError(str(err)) from None
    if not isinstance(value, dict):
        raise TrainingError(f"{where}: expected a JSON object")
    return value


def _verified_files(path: Path) -> dict[str, bytes]:
    """The checkpoint's files, each checked against the sha256 recorded in ``checksums.json``."""
    raw = _read_bytes(path / MANIFEST)
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise TrainingError(f"{path / MANIFEST}: larger than {_MAX_MANIFEST_BYTES} bytes")
    digests = _json(raw, path / MANIFEST).get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(FILES):
        raise TrainingError(f"{path / MANIFEST}: expected the sha256 of {list(FILES)}")
    files = {}
    for name in FILES:
        files[name] = _read_bytes(path / name)
        if hashlib.sha256(files[name]).hexdigest() != digests[name]:
            raise TrainingError(f"{path / name}: checksum mismatch (truncated or corrupted)")
    return files


def _tensors(data: bytes, where: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError, not an OSError
        raise TrainingError(f"{where}: not a readable safetensors file ({err})") from None


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify the checkpoint at ``path`` without touching any model.

    Raises:
        TrainingError: naming the file and what is wrong (missing, checksum mismatch, unreadable).
    """
    path = Path(path)
    files = _verified_files(path)
    meta = decode_nonfinite(_json(files["state.json"], path / "state.json"))
    kinds = {"step": int, "optimizer": dict, "extra": dict, "python_random": list, "numpy_random": list}
    wrong = [key for key, kind in kinds.items() if not isinstance(meta.get(key), kind)]
    if wrong or "torch" not in (rng := _tensors(files["rng.safetensors"], path / "rng.safetensors")):
        raise TrainingError(f"{path}: incomplete training state (missing or malformed {wrong or ['torch RNG']})")
    return Checkpoint(
        path,
        _tensors(files["trainable.safetensors"], path / "trainable.safetensors"),
        _tensors(files["optimizer.safetensors"], path / "optimizer.safetensors"),
        rng,
        meta,
    )


def apply_checkpoint(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable tensors, optimizer state and RNG from a read checkpoint; returns its state.json.

    Raises:
        TrainingError: the checkpoint holds other tensors or shapes than ``model``'s trainable ones.
    """
    params, path, saved = _trainable(model), ckpt.path, ckpt.trainable
    if set(saved) != set(params):
        raise TrainingError(
            f"{path}: checkpoint holds other trainable tensors than this model "
            f"(missing {sorted(set(params) - set(saved))[:3]}, extra {sorted(set(saved) - set(params))[:3]})"
        )
    for n, p in params.items():
        if saved[n].shape != p.shape:
            raise TrainingError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model {tuple(p.shape)}")
    names = _param_names(model, optimizer)  # (checked before anything is restored)
    meta = ckpt.meta
    saved_groups, scalars = meta["optimizer"].get("groups", []), meta["optimizer"].get("scalars")
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
        raise TrainingError(f"{path / 'state.json'}: malformed optimizer.groups (expected a list of objects)")
    if not isinstance(scalars, dict) or not all(v is None or isinstance(v, (int, float)) for v in scalars.values()):
        raise TrainingError(f"{path / 'state.json'}: malformed optimizer.scalars (expected an object of numbers)")
    groups = _matched_groups(optimizer, names, saved_groups, path)
    py, nps = _random_states(ckpt)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    _restore_optimizer(optimizer, names, ckpt.optimizer, meta["optimizer"], groups)
    torch.set_rng_state(ckpt.rng["torch"])
    _restore_cuda_rng(ckpt.rng, path)
    random.setstate(py)
    np.random.set_state(nps)
    return meta


def _random_states(ckpt: Checkpoint) -> tuple[tuple, tuple]:
    """The Python and NumPy generator states of a checkpoint, each tried on a generator of its own (and its torch
    generator's state too) before anything is restored.

    Raises:
        TrainingError: naming the field a generator refuses (``python_random``, ``numpy_random``, the torch RNG).
    """
    field = "python_random"
    try:
        py = ckpt.meta[field]
        py = (py[0], tuple(py[1]), py[2])
        random.Random().setstate(py)
        field = "numpy_random"
        nps = ckpt.meta[field]
        nps = (nps[0], np.array(nps[1], dtype=np.uint32), nps[2], nps[3], nps[4])
        np.random.RandomState().set_state(nps)
    except Exception as err:  # TypeError, ValueError, IndexError, OverflowError: whatever the generator says
        raise TrainingError(f"{ckpt.path / 'state.json'}: malformed {field} ({err})") from None
    try:
        torch.Generator().set_state(ckpt.rng["torch"])
    except Exception as err:  # RuntimeError (size), TypeError (dtype)
        raise TrainingError(f"{ckpt.path / 'rng.safetensors'}: malformed torch generator state ({err})") from None
    return py, nps


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Verify the checkpoint at ``path`` and restore it into ``model`` and ``optimizer``; returns its
    state.json. Raises :class:`TrainingError` if it is damaged or does not fit the model."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer)


def resume_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    check: Callable[[Checkpoint], None] | None = None,
) -> dict | None:
    """Restore the newest intact checkpoint of ``directory``; None if there is none at all.

    Damaged checkpoints are skipped, each with a warning naming it and why. ``check`` is called with the
    intact one before anything is restored (it raises to refuse it: a checkpoint of another run).

    Raises:
        TrainingError: every checkpoint is damaged (listed with the reasons), or the intact one
            does not fit the model.
    """
    skipped = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*"), reverse=True):
        try:
            ckpt = read_checkpoint(path)
        except TrainingError as err:
            skipped.append(f"{path.name}: {err}")
            warnings.warn(f"skipping damaged training checkpoint {path}: {err}", stacklevel=2)
            continue
        if skipped:
            warnings.warn(f"resuming from {path} (skipped {len(skipped)} damaged newer checkpoint(s))", stacklevel=2)
        if check is not None:
            check(ckpt)
        return apply_checkpoint(ckpt, model, optimizer)
    if skipped:
        raise TrainingError(
            f"{directory}: every training checkpoint is damaged ({'; '.join(skipped)}); "
            "delete them or start over without resuming (resume=False, `lordba train --no-resume`)"
        )
    return None
