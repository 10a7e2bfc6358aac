"""One rank of the distributed training test (run by torchrun from test_distributed.py, gloo on CPU).

``python ddp_worker.py OUT_DIR STEPS`` runs, in one process group:

1. **DDP**: a tiny Llama with a LoRDBA ``qat`` adapter wrapped in ``DistributedDataParallel``; each
   rank starts from different latents (DDP must broadcast rank 0's) and trains on its own data.
   Writes ``OUT_DIR/rank<k>.json`` (losses), ``rank<k>.safetensors`` (the trainable tensors),
   ``rank<k>_initial.safetensors`` and ``rank<k>_adapter/`` (``save_pretrained`` on every rank).
   Then the adapter is packed (uint8 sign buffers) and its scales alone train 3 more steps under
   a new DDP wrapper (the ``scales-only`` situation): ``rank<k>_packed.safetensors``.
2. **FSDP2**: the same model, started from rank 0's latents, sharded with ``fully_shard`` per
   decoder layer and at the root, trained on the same data; the full state dict is gathered and
   rank 0 saves the adapter from an unsharded copy (the recipe of docs/training.md):
   ``fsdp2_rank<k>.json``, ``fsdp2.safetensors``, ``fsdp2_adapter/``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

from lordba import LoRDBAConfig, get_lordba_model

from conftest import TINY, tiny_llama

CONFIG = LoRDBAConfig(r=4, alpha=8.0, mode="qat")


def batches(rank: int, steps: int, batch_size: int = 4, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Rank ``k`` learns its own two sequences (patterns 2k and 2k+1 of a shared pool)."""
    pool = torch.randint(0, TINY["vocab_size"], (4, length), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps + 1):  # the last one is held out
        ids = pool[2 * rank + torch.randint(0, 2, (batch_size,), generator=g)]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


@torch.no_grad()
def loss_on(model: torch.nn.Module, batch: dict) -> float:
    return float(model(**batch).loss)


def train(model: torch.nn.Module, trainable: list[torch.nn.Parameter], data: list[dict], steps: int) -> list[float]:
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for step in range(steps):
        loss = model(**data[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def run_ddp(out: Path, rank: int, world: int, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = tiny_llama(0)  # seeds the generator itself
    torch.manual_seed(100 + rank)  # then different initial latents per rank
    lm = get_lordba_model(base, CONFIG)
    initial = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    ddp = DistributedDataParallel(lm)
    mine, other = batches(rank, steps), batches((rank + 1) % world, steps)
    before_other = loss_on(ddp, other[-1])
    losses = train(ddp, [p for p in lm.parameters() if p.requires_grad], mine, steps)
    trainable = {n: p.detach().contiguous() for n, p in lm.named_parameters() if p.requires_grad}
    save_file(trainable, str(out / f"rank{rank}.safetensors"))
    save_file(initial, str(out / f"rank{rank}_initial.safetensors"))
    lm.save_pretrained(out / f"rank{rank}_adapter", format_version=1)  # the test reads per-module tensors
    report = {
        "losses": losses,
        "held_out_own": loss_on(lm, mine[-1]),
        "other_rank_data_before": before_other,
        "other_rank_data_after": loss_on(lm, other[-1]),
        "trainable_dtypes": sorted({str(p.dtype) for p in lm.parameters() if p.requires_grad}),
        "buffer_dtypes": sorted({str(b.dtype) for b in lm.buffers()}),
    }
    # then scales-only on the packed adapter: uint8 sign buffers, only a, m, b train
    lm.pack()
    lm.set_trainable("default", signs=False, scales=True)
    packed = DistributedDataParallel(lm)
    report["packed_losses"] = train(packed, [p for p in lm.parameters() if p.requires_grad], mine, 3)
    report["packed_buffer_dtypes"] = sorted({str(b.dtype) for b in lm.buffers()})
    state = {n: t.detach().contiguous() for n, t in lm.state_dict().items()}
    save_file(state, str(out / f"rank{rank}_packed.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def run_fsdp2(out: Path, rank: int, world: int, steps: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    base = tiny_llama(0)
    torch.manual_seed(100)  # no broadcast under FSDP2: every rank starts from rank 0's DDP latents
    lm = get_lordba_model(base, CONFIG)
    for layer in lm.base_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    losses = train(lm, [p for p in lm.parameters() if p.requires_grad], batches(rank, steps), steps)
    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    report = {"losses": losses, "sharded": type(next(lm.parameters())).__name__}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "fsdp2.safetensors"))
        plain = get_lordba_model(tiny_llama(0), CONFIG)
        plain.load_state_dict(full)  # the adapters' tensors only (LoRDBAModel.state_dict)
        plain.save_pretrained(out / "fsdp2_adapter", format_version=1)
        report["state_dict_keys"] = len(full)
    (out / f"fsdp2_rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    """Both runs, then an exit that skips the interpreter's teardown. ``DistributedDataParallel`` keeps references
    to the process group that nothing gives back (torch 2.13, measured: not even once the wrapper is freed), so
    ``destroy_process_group`` leaves gloo's two worker threads and its socket thread running, connected to the other
    rank, and each rank then finalized Python with them alive while the other rank exited: the likely place where
    rank 1 once aborted in a loaded full-suite run with ``terminate called without an active exception`` (a gloo
    process group alive at interpreter exit: PyTorch issues #65231, #190489). Everything the test reads is written
    and closed by then; an error still exits non-zero with its traceback."""
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for runner in (run_ddp, run_fsdp2):
            runner(out, dist.get_rank(), dist.get_world_size(), steps)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
