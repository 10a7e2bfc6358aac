"""Huge declared sizes: nothing is allocated for a size before it is checked against the config
and the file length. The loader runs in a subprocess under an address-space cap
(``RLIMIT_AS`` = what it maps at start + 256 MiB); the files declare tensors of up to 2^62 bytes
with consistent dims, shapes and byte ranges, so that only the file length can tell."""

import json
import subprocess
import sys
import textwrap

from lordba_lab.fuzz.corpus import encode_case, fix_checksum, seed_cases
from lordba_lab.fuzz.mutate_base import join_weights, split_weights

ITEM = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}


def inflate(case, in_f, out_f, r=None):
    """Declare the first module as ``in_f × out_f`` (rank ``r``, default the file's), everything consistent."""
    header, data = split_weights(case["lordba_model.safetensors"])
    meta = header["__metadata__"]
    dims = json.loads(meta["modules"])
    path = sorted(dims)[0]
    r = r or dims[path][2]
    dims[path] = [in_f, out_f, r]
    sizes = {"sign_A": (r * in_f + 7) // 8, "sign_B": (out_f * r + 7) // 8}
    counts = {"scale_in": in_f, "scale_mid": r, "scale_out": out_f}
    others = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__" and not k.startswith(path + ".")),
        key=lambda kv: kv[1]["data_offsets"],
    )
    out, kept, offset = {}, [], 0
    for k, v in others:  # the other tensors, packed together with their bytes
        start, stop = v["data_offsets"]
        out[k] = {**v, "data_offsets": [offset, offset + stop - start]}
        kept.append(data[start:stop])
        offset += stop - start
    data = b"".join(kept)
    for kind in ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"):
        dtype = header[f"{path}.{kind}"]["dtype"]
        n = sizes[kind] if kind in sizes else counts[kind] * ITEM[dtype]
        shape = [n] if kind in sizes else [counts[kind]]
        out[f"{path}.{kind}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    out["__metadata__"] = {**meta, "modules": json.dumps(dims, separators=(",", ":"), sort_keys=True)}
    new = {**case, "lordba_model.safetensors": join_weights(out, data)}
    if r != json.loads(case["adapter_config.json"])["r"]:
        config = json.loads(case["adapter_config.json"])
        new["adapter_config.json"] = json.dumps({**config, "r": r, "rank_pattern": {}}).encode()
    return fix_checksum(new)


CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile
    from pathlib import Path
    from lordba_lab.fuzz.corpus import decode_case
    from lordba_lab.fuzz.oracle import run_case
    from lordba_lab.fuzz.worker import cap_memory
    cases = [decode_case(bytes.fromhex(h)) for h in json.load(sys.stdin)]
    cap_memory(256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            r = run_case(case, Path(tmp))
            out.append([r.outcome, r.detail[-300:]])
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"results": out, "growth_mb": growth}))
    """
)


def test_huge_declared_sizes_are_refused_without_allocating():
    seeds = [c for c in seed_cases() if ".adapter_config.json.lordba-prev" not in c][:8]
    cases = []
    for i, seed in enumerate(seeds):
        cases.append(inflate(seed, 2**30, 2**30))  # 2^27·r bytes of signs claimed
        cases.append(inflate(seed, 2**31 - 1, 2**31 - 1, r=2**31 - 1 if i % 2 else None))  # up to 2^59 bytes
        cases.append(inflate(seed, 1, 2**31 - 1))
    payload = json.dumps([encode_case(c).hex() for c in cases])
    proc = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for outcome, detail in report["results"]:
        assert outcome == "refused", detail
        assert "data bytes but its header describes" in detail or "has rank" in detail, detail
    assert report["growth_mb"] < 64, report["growth_mb"]
