"""Conversion cost on an adapter shaped like a 7B Llama's: seconds and peak memory.

A PEFT LoRA directory (``adapter_model.safetensors`` in fp16, r = 16, q/k/v/o/gate/up/down of 32
layers with 4096/11008 dimensions: 224 layers, 40M parameters) is written with random factors of a
realistic decaying spectrum (``A`` Kaiming-uniform as PEFT initialises it, ``B`` Gaussian columns
scaled by ``σ_k ∝ k^-0.8``). Each configuration is converted and saved in a fresh subprocess, which
reports its wall time, its CPU time (user + system, all threads: less sensitive than wall time to
other processes sharing the cores) and its peak resident memory above the baseline after imports
(so the numbers include reading the LoRA and writing the LoRDBA adapter). ``--quick`` uses 2
layers. Target: under 60 s and under 2 GiB on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lordba_lab.bench import hardware
from lordba_lab.outputs import write_text

SUITE = "convert"
HELP = "PTQ conversion of a 7B-Llama-shaped LoRA (224 layers, r=16): seconds and peak memory"
DEFAULT = False

SHAPES = {  # module: (in, out)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 11008),
    "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}
CONFIGS = {  # name: convert_lora keyword arguments
    "default (svd gauge, 20 ADMM + BCD)": {},
    "BCD only": {"method": "bcd"},
    "closed form only (Eq. 7)": {"method": "init"},
}


def write_lora(directory: Path, layers: int, r: int = 16, seed: int = 0) -> int:
    """A PEFT LoRA directory shaped like Llama-7B's; returns the number of LoRA parameters."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sigma = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.8)
    tensors, params = {}, 0
    for i in range(layers):
        for name, (inn, out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            bound = 1 / math.sqrt(inn)
            A = (torch.rand(r, inn, generator=g) * 2 - 1) * bound
            B = torch.randn(out, r, generator=g) / math.sqrt(out) * sigma * 0.05
            tensors[f"{prefix}.lora_A.weight"] = A.half()
            tensors[f"{prefix}.lora_B.weight"] = B.half()
            params += r * (inn + out)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted(n.split(".")[-1] for n in SHAPES),
        "base_model_name_or_path": "llama-7b-shaped (synthetic)",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return params


_MEASURE = """
import json, resource, sys, time
import torch
from lordba.convert import convert_lora, save_converted

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

def cpu_s():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime

base = rss_mib()
c0 = cpu_s()
t0 = time.perf_counter()
state, report = convert_lora(sys.argv[1], progress=False, **json.loads(sys.argv[3]))
t1 = time.perf_counter()
save_converted(state, report, sys.argv[2])
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cpu = cpu_s() - c0
print(json.dumps({"convert_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0, "cpu_s": cpu, "rss_base_mib": base,
                  "peak_rss_mib": peak, "peak_delta_mib": peak - base, "rel_error": report.total_rel_error,
                  "mean_iterations": sum(l.iterations for l in report.layers) / len(report.layers),
                  "bpw_lora": report.bpw_lora, "file_bytes": report.size.file_bytes,
                  "lora_fp16_file_bytes": report.lora_fp16_file_bytes, "threads": torch.get_num_threads()}))
"""


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba._util.tables import markdown_table, print_table

    layers = 2 if quick else 32
    rows, results = [], {}
    # Idle OpenMP threads sleep instead of spinning: on cores shared with other processes, spinning
    # makes 2-thread elementwise kernels 20-50x slower (measured); an unshared machine is unaffected.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp) / "lora"
        params = write_lora(lora_dir, layers)
        for i, (name, kwargs) in enumerate(CONFIGS.items()):
            proc = subprocess.run(
                [sys.executable, "-c", _MEASURE, str(lora_dir), str(Path(tmp) / f"out{i}"), json.dumps(kwargs)],
                capture_output=True,
                text=True,
                check=False,
                env=env,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"conversion benchmark failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name] = res
            rows.append(
                (
                    name,
                    res["total_s"],
                    res["cpu_s"],
                    res["peak_delta_mib"],
                    res["peak_rss_mib"],
                    res["rel_error"],
                    res["mean_iterations"],
                    res["bpw_lora"],
                )
            )
    columns = ["config", "seconds", "CPU s", "peak RSS Δ MiB", "peak RSS MiB", "rel err", "iters", "BPW"]
    title = f"convert: {layers * len(SHAPES)} layers (Llama-7B shapes), {params / 1e6:.1f}M LoRA params, r=16"
    print_table(title, columns, rows)
    data = {
        "suite": SUITE,
        "quick": quick,
        "layers": layers * len(SHAPES),
        "lora_params": params,
        "hardware": hardware(),
        "omp_wait_policy": env["OMP_WAIT_POLICY"],
        "targets": {"seconds": 60, "peak_delta_mib": 2048},
        "results": results,
    }
    json_path = out_dir / "convert.json"
    md_path = out_dir / "convert.md"
    write_text(json_path, json.dumps(data, indent=2) + "\n")
    write_text(md_path, f"# {title}\n\n{markdown_table(columns, rows)}\nHardware: {data['hardware']}\n")
    return [json_path, md_path]
