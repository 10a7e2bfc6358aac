"""Training checkpoints without pickle: trainable tensors, optimizer state and RNG in safetensors,
the rest in JSON, written as one directory atomically (a killed write leaves the previous one)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lordba.errors import TrainingError
from lordba.format.atomic import atomic_directory
from lordba.format.tensorfile import to_bytes

PREFIX = "step-"


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


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
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, structure: dict) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, idx in zip(group["params"], sd_group["params"]):
            prefix = names[id(p)] + "::"
            entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            entry.update({k[len(prefix) :]: v for k, v in structure["scalars"].items() if k.startswith(prefix)})
            if entry:
                state[idx] = entry
    for sd_group, saved in zip(sd["param_groups"], structure["groups"]):
        sd_group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_checkpoint(
    directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write ``directory/step-<step>`` atomically and keep only the newest ``keep`` checkpoints."""
    params = _trainable(model)
    names = {id(p): n for n, p in params.items()}
    opt_tensors, opt_structure = _flatten_optimizer(optimizer, names)
    rng = {"torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    meta = {
        "step": step,
        "extra": extra,
        "optimizer": opt_structure,
        "python_random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_random": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    out = directory / f"{PREFIX}{step:08d}"
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "trainable.safetensors").write_bytes(to_bytes({n: p.detach().cpu() for n, p in params.items()}))
        (tmp / "optimizer.safetensors").write_bytes(to_bytes(opt_tensors))
        (tmp / "rng.safetensors").write_bytes(to_bytes(rng))
        (tmp / "state.json").write_text(json.dumps(meta))
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (temporary, half-written ones never qualify)."""
    found = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable tensors, optimizer state and RNG from ``path``; returns its state.json."""
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise TrainingError(
            f"{path}: checkpoint holds other trainable tensors than this model "
            f"(missing {sorted(set(params) - set(saved))[:3]}, extra {sorted(set(saved) - set(params))[:3]})"
        )
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise TrainingError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(saved[n])
    meta = json.loads((path / "state.json").read_text())
    names = {id(p): n for n, p in params.items()}
    _restore_optimizer(optimizer, names, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    py = meta["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = meta["numpy_random"]
    np.random.set_state((nps[0], np.array(nps[1], dtype=np.uint32), nps[2], nps[3], nps[4]))
    return meta
