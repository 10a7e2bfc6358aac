"""A LoRDBA model on a q4 base exports with ``torch.export`` (strict: dynamo) as its first use in a
process: the CPU kernels are loaded when the layers are built, since tracing cannot load them; the
adapted q4 layers are captured as the fused ``lordba::q4_branch``."""

import subprocess
import sys
import textwrap

CODE = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.kernels import _STATE
    from lordba.quant import quantize_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quantize_model(LlamaForCausalLM(config).eval(), "q4", group_size=32)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random", target_modules="all-linear"))
    lm.pack()
    lm.eval()
    assert _STATE.cpu is not None and _STATE.cpu.ok, "the kernels were not loaded when the layers were built"
    inner = lm.get_base_model()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        program = torch.export.export(inner, (ids,), kwargs={"use_cache": False}, strict=True)
        ops = {str(n.target) for n in program.graph.nodes}
        # adapted layers: the q4 layer and its branch in one op; the head: q4_linear
        assert "lordba.q4_branch.default" in ops and "lordba.q4_linear.default" in ops, ops
        want = inner(ids, use_cache=False).logits
        got = program.module()(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_a_fresh_process_exports_a_lordba_model_on_a_q4_base():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
