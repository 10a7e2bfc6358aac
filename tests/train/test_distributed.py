"""Multi-process training on CPU (gloo): DDP and FSDP2 with torchrun on a LoRDBA ``qat`` model.

What a distributed run needs from the module: float trainable parameters only, integer state in
buffers, no per-process global state in autograd, deterministic saving. The worker
(``ddp_worker.py``) trains two ranks on different data; here we check that the replicas stay
bit-identical, that each rank learns the other's data (gradients are averaged, not just
broadcast), that both ranks would save the same bytes, and that FSDP2 gives the same result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import lordba

from conftest import load_weights

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 8


def launch(out: Path) -> None:
    src = str(Path(lordba.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out), str(STEPS)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_ddp_and_fsdp2_on_two_cpu_ranks(tmp_path):
    launch(tmp_path)
    reports = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    initial = [load_file(str(tmp_path / f"rank{k}_initial.safetensors")) for k in (0, 1)]
    final = [load_file(str(tmp_path / f"rank{k}.safetensors")) for k in (0, 1)]

    # the module: float trainable parameters only; packed signs are uint8 buffers
    assert reports[0]["trainable_dtypes"] == ["torch.float32"]
    assert "torch.uint8" in reports[0]["packed_buffer_dtypes"]
    assert set(final[0]) and all(".lordba_adapters.default." in k for k in final[0])

    # the ranks started apart (different seeds) and DDP made them one replica, bit for bit
    assert any(not torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
    assert set(final[0]) == set(final[1])
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k
    assert any(not torch.equal(final[0][k], initial[0][k]) for k in final[0])

    # the loss falls on each rank's own data, and on the other rank's data (averaged gradients)
    for rep in reports:
        losses = rep["losses"]
        assert len(losses) == STEPS and sum(losses[-2:]) / 2 < losses[0] - 0.15, losses
        assert rep["other_rank_data_after"] < rep["other_rank_data_before"] - 0.1, rep

    # save_pretrained writes the same bytes on both ranks (rank 0 is the one a user keeps)
    dirs = [tmp_path / f"rank{k}_adapter" for k in (0, 1)]
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == sorted(p.name for p in dirs[1].iterdir()) and "lordba_model.safetensors" in names
    tensors = [load_weights(d)[0] for d in dirs]
    signs = [k for k in tensors[0] if k.endswith(("sign_A", "sign_B"))]
    assert signs and all(
        tensors[0][k].dtype == torch.uint8 and torch.equal(tensors[0][k], tensors[1][k]) for k in signs
    )
    for name in names:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name

    # scales-only on the packed adapter under DDP: replicas stay identical, signs untouched
    packed = [load_file(str(tmp_path / f"rank{k}_packed.safetensors")) for k in (0, 1)]
    assert set(packed[0]) == set(packed[1]) and any(k.endswith("sign_A") for k in packed[0])
    for k in packed[0]:
        assert torch.equal(packed[0][k], packed[1][k]), k
    for k, v in packed[0].items():
        if k.endswith(("sign_A", "sign_B")):
            stored = k.removeprefix("base_model.").replace(".lordba_adapters.default", "")
            assert torch.equal(v, tensors[0][stored]), k

    # FSDP2 (fully_shard on a CPU mesh) from rank 0's start on the same data: the same training
    for k in (0, 1):
        fsdp = json.loads((tmp_path / f"fsdp2_rank{k}.json").read_text())
        assert fsdp["sharded"] == "DTensor"
        torch.testing.assert_close(fsdp["losses"], reports[k]["losses"], rtol=1e-5, atol=0)
    gathered = load_file(str(tmp_path / "fsdp2.safetensors"))
    assert set(gathered) == set(final[0])
    for k in gathered:
        torch.testing.assert_close(gathered[k], final[0][k], rtol=1e-5, atol=1e-7)
    assert load_weights(tmp_path / "fsdp2_adapter")[0].keys() == tensors[0].keys()
