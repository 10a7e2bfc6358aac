"""The ``e2e`` suite's targets (issue 18), its Markdown report and its bar chart."""

from __future__ import annotations

from pathlib import Path

from lordba._util.tables import markdown_table, print_table
from lordba_lab.bench._e2e_models import AOT, COMPILED
from lordba_lab.outputs import save_figure

FOUR_BIT = ("q4", "hqq")


def _target(name: str, row: dict, key: str, limit: float, strict: bool = False) -> dict:
    """One target's verdict on the median; an adapter's overhead also carries its 95% interval (``ci``)."""
    value = row[key]
    found = {"target": name, "variant": row["variant"], "measured": value, "limit": limit,
             "met": bool(value < limit if strict else value <= limit)}  # fmt: skip
    ci = row.get(key.replace("_overhead_paired", "_overhead_ci")) if key.endswith("_overhead_paired") else None
    return found if ci is None else {**found, "ci": ci}


def _measured(t: dict) -> str:
    return f"{t['measured']:.3f}" + (f" [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]" if "ci" in t else "")


def targets(rows: list[dict]) -> list[dict]:
    """Issue 18's targets, each ``{target, variant, measured, limit, met}``, for the rows present:
    4-bit decode ≤ 0.6× fp32; LoRDBA overhead over its own base ≤ 1.05× (paired, decode and
    prefill); 4-bit base + LoRDBA decode ≤ llama.cpp + LoRA; the 4-bit base's decode within 1.5× of
    llama.cpp's base; prefill ahead of llama.cpp (base and with the adapter). Compiled variants: the
    decode targets (their prefill is the eager model's)."""
    by = {x["variant"]: x for x in rows}
    out = []
    done = [(b, sfx) for sfx in (AOT, COMPILED) for b in FOUR_BIT if f"{b}+LoRDBA{sfx}" in by and f"{b}{sfx}" in by]
    for base, sfx in done:
        plain, ours = by[f"{base}{sfx}"], by[f"{base}+LoRDBA{sfx}"]
        if "decode_vs_fp32" in plain:
            out.append(_target("4-bit base decode <= 0.6x fp32 base", plain, "decode_vs_fp32", 0.6))
        out.append(_target("LoRDBA decode overhead <= 1.05x its base (paired)", ours, "decode_overhead_paired", 1.05))
        if "decode_vs_llama" in plain:
            out += [
                _target("base + LoRDBA decode <= llama.cpp + LoRA", ours, "decode_vs_llama_lora", 1.0),
                _target("base decode <= 1.5x llama.cpp base", plain, "decode_vs_llama", 1.5),
            ]
    for base in (b for b in ("fp32", *FOUR_BIT) if f"{b}+LoRDBA" in by):
        plain, ours = by[base], by[f"{base}+LoRDBA"]
        if base != "fp32" and "decode_vs_fp32" in plain:
            out.append(_target("4-bit base decode <= 0.6x fp32 base", plain, "decode_vs_fp32", 0.6))
        for case in ("decode", "prefill"):
            out.append(
                _target(f"LoRDBA {case} overhead <= 1.05x its base (paired)", ours, f"{case}_overhead_paired", 1.05)
            )
        if f"{base}+LoRDBA fast" in by:  # the branch compute `fast`: prompts only (one token is float32 either way)
            fast = by[f"{base}+LoRDBA fast"]
            out.append(
                _target("LoRDBA prefill overhead <= 1.05x its base (paired)", fast, "prefill_overhead_paired", 1.05)
            )
        if base == "fp32" or "decode_vs_llama" not in plain:
            continue
        out += [
            _target("base + LoRDBA decode <= llama.cpp + LoRA", ours, "decode_vs_llama_lora", 1.0),
            _target("base decode <= 1.5x llama.cpp base", plain, "decode_vs_llama", 1.5),
            _target("base prefill ahead of llama.cpp base", plain, "prefill_vs_llama", 1.0, strict=True),
            _target("base + LoRDBA prefill ahead of llama.cpp + LoRA", ours, "prefill_vs_llama_lora", 1.0, strict=True),
        ]  # fmt: skip
    return out


COLUMNS = ["variant", "prefill ms", "IQR %", "decode ms/token", "IQR %", "decode / fp32", "decode / llama.cpp",
           "decode / llama.cpp+LoRA", "prefill / llama.cpp", "adapter ovh decode", "adapter ovh prefill",
           "compiled / eager decode", "decode in runs ms/token", "runs / llama.cpp", "runs / llama.cpp+LoRA",
           "adapter ovh runs"]  # fmt: skip


def _fmt(x: dict, key: str) -> str:
    return f"{x[key]:.3f}" if key in x else "—"


def _ms(x: dict, case: str) -> list:
    """``[ms, IQR %]`` of ``case``, or dashes where the variant has no such case (compiled: no prefill)."""
    if f"{case}_s" not in x:
        return ["—", "—"]
    return [1e3 * x[f"{case}_s"], 100 * x[f"{case}_iqr_s"] / x[f"{case}_s"]]


def _table(rows: list[dict]) -> list[list]:
    return [
        [x["variant"], *_ms(x, "prefill"), *_ms(x, "decode"), _fmt(x, "decode_vs_fp32"), _fmt(x, "decode_vs_llama"),
         _fmt(x, "decode_vs_llama_lora"), _fmt(x, "prefill_vs_llama"), _fmt(x, "decode_overhead_paired"),
         _fmt(x, "prefill_overhead_paired"), _fmt(x, "decode_vs_eager_paired"), _ms(x, "decode_run")[0],
         _fmt(x, "decode_run_vs_llama"), _fmt(x, "decode_run_vs_llama_lora"), _fmt(x, "decode_run_overhead_paired")]
        for x in rows
    ]  # fmt: skip


def _limits(hw: dict) -> str:
    """The instruction-set limits a run was made under (``hardware()['isa_limits']``), as a sentence, or ``""``."""
    limits = hw.get("isa_limits") or {}
    if not limits:
        return ""
    return " Instruction sets limited by " + ", ".join(f"`{k}={v}`" for k, v in limits.items()) + "."


def report(result: dict) -> str:
    """``bench.md`` for the ``bench.json`` content ``result`` (also prints the tables)."""
    rows, s, hw = result["rows"], result["settings"], result["hardware"]
    print_table("e2e: prefill and decode", COLUMNS, _table(rows))
    tgt = [[t["target"], t["variant"], _measured(t), t["limit"], "met" if t["met"] else "MISSED"]
           for t in result["targets"]]  # fmt: skip
    if tgt:
        print_table("e2e: issue 18 targets", ["target", "variant", "measured", "limit", "met"], tgt)
    lines = [
        "# End to end: lordba on its 4-bit bases beside llama.cpp\n\n",
        f"CPU: {hw['cpu']} ({hw['cores']} cores), {s['threads']} threads for torch and llama.cpp, torch {hw['torch']}, "
        f"llama-cpp-python {s['llama_cpp_python']}, kernels {result['kernels']}. Prompt {s['prompt_tokens']} tokens "
        f"(prefill: from an empty cache, last position's logits only; decode: one token after the prompt); "
        f"adapters r={s['r']} on the seven projections (LoRDBA int8 scales, packed; LoRA = its `lordba export-lora` "
        f"copy, f16 GGUF for llama.cpp); q4 compute {s.get('q4_compute')}, branch compute {s.get('branch_compute')} "
        f"(tile unit: {s.get('tile_unit')}); quick={s['quick']}.{_limits(hw)} Load average before/after: "
        f"{result['load_avg_before'][0]:.2f} / {result['load_avg_after'][0]:.2f}.\n\n",
        f"{result['llama_cpp']}\n\n",
        "Medians of interleaved rounds; `IQR %`: interquartile range relative to the median; ratios: of the medians; "
        "`adapter ovh`: median of the round-by-round ratios (base + adapter) / base, from a second run of each base "
        "alternated only with its own adapters (in the targets, with its 95% interval: the binomial order-statistic "
        "interval of that median over the rounds). `... compiled`: the decode step "
        "`torch.compile`d (inductor, default mode) on a static KV cache of prompt + 8 positions, as `lordba generate "
        "--compile` runs it (prefill stays eager); `compiled / eager decode`: paired ratio against the same variant "
        "eager; compile times and compiled-vs-eager logits under `checks.compiled`. `decode in runs`: decode as "
        "generation runs it, each variant making several steps in a row (rounds rotated; per round the median of its "
        "steps after the first; `adapter ovh runs` paired by round), where the single steps above each follow another "
        "model's step.\n\n",
        markdown_table(COLUMNS, _table(rows)),
    ]
    if tgt:
        lines += ["\n## Issue 18 targets\n\n", markdown_table(["target", "variant", "measured", "limit", "met"], tgt)]
    lines += ["\n## Checks (logits at the prompt's last position)\n\n```json\n", _json(result["checks"]), "\n```\n"]
    return "".join(lines)


def _json(x: object) -> str:
    import json

    return json.dumps(x, indent=1)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Bars of decode ms/token and prefill ms per variant, labelled with the ratios against
    llama.cpp (where measured) and the fp32 base; returns ``path`` (``None`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a lab dependency
        return None
    names = [x["variant"] for x in rows]
    colors = ["tab:orange" if x["engine"] == "llama.cpp" else "tab:blue" for x in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8))
    for ax, case, unit in ((axes[0], "decode", "ms / token"), (axes[1], "prefill", "ms")):
        values = [1e3 * x.get(f"{case}_s", 0.0) for x in rows]  # compiled variants: no prefill of their own
        ax.barh(names, values, color=colors)
        for i, x in enumerate(rows):
            if f"{case}_s" not in x:  # a decode-only variant (compiled step): no bar, no "0.0"
                ax.text(0, i, "  not measured (decode-only variant)", va="center", fontsize=7, color="grey")
                continue
            parts = [f"{values[i]:.1f}"]
            if f"{case}_vs_llama" in x:
                parts.append(f"{x[f'{case}_vs_llama']:.2f}× llama")
            if f"{case}_vs_fp32" in x:
                parts.append(f"{x[f'{case}_vs_fp32']:.2f}× fp32")
            ax.text(values[i], i, "  " + ", ".join(parts), va="center", fontsize=7)
        if case == "decode":  # decode in runs of steps (as generation runs it), where measured
            runs = [(i, 1e3 * x["decode_run_s"]) for i, x in enumerate(rows) if "decode_run_s" in x]
            if runs:
                ax.scatter([v for _, v in runs], [i for i, _ in runs], marker="|", s=140, color="black",
                           label="in runs of steps", zorder=3)  # fmt: skip
                ax.legend(loc="lower right", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_xlim(0, max(values) * 1.6)
        ax.set_title(f"{case} ({'one token after the prompt' if case == 'decode' else 'whole prompt'})")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("SmolLM2-135M: lordba (blue) vs llama.cpp (orange); ratios against llama.cpp's base and fp32")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
