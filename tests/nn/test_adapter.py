"""The adapter's two forms (training and inference) and the conversions between them."""

import pytest
import torch

from lordba import AdapterStateError, ShapeMismatchError, kernels
from lordba.core.scales import get_codec
from lordba.core.ste import STE
from lordba.nn.adapter import PackedAdapter, TrainableAdapter, held_nbytes
from nn.test_layer import make_layer


def test_pack_gives_bit_identical_outputs_and_keeps_signs():
    layer = make_layer()
    ad = layer.lordba_adapters["a"]
    x = torch.randn(5, 21)
    with torch.no_grad():
        before = layer(x)
    signs = [s.clone() for s in ad.signs()]
    packed = ad.pack()
    assert isinstance(packed, PackedAdapter) and not any(True for _ in packed.parameters())
    assert packed.sign_A.dtype == torch.uint8 and packed.sign_A.numel() == (3 * 21 + 7) // 8
    layer.add_adapter("a", packed)
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    back = packed.trainable(STE(), latent_signs=True, magnitude=0.02)
    assert back.has_latent_signs and all(torch.equal(s, t) for s, t in zip(back.signs(), signs))
    assert torch.equal(back.latent_A.abs(), torch.full_like(back.latent_A, 0.02))
    assert back.latent_A.requires_grad and not back.scale_in.requires_grad


def test_frozen_signs_train_the_scales_only():
    ad = make_layer().lordba_adapters["a"].freeze_signs()
    assert not ad.has_latent_signs and ad.sign_A.dtype == torch.uint8
    with pytest.raises(AdapterStateError, match="unpack_to_latent"):
        ad.set_trainable(signs=True, scales=True)
    ad.set_trainable(signs=False, scales=True)
    ad(torch.randn(3, 21)).sum().backward()
    assert ad.scale_out.grad is not None and ad.scale_in.grad is not None
    unfrozen = ad.unfreeze_signs(0.5)
    assert unfrozen.has_latent_signs and all(torch.equal(s, t) for s, t in zip(unfrozen.signs(), ad.signs()))
    assert torch.equal(unfrozen.scale_in, ad.scale_in)


@pytest.mark.parametrize("signs, scales", [(True, True), (True, False), (False, True), (False, False)])
def test_set_trainable_sets_both_latents_and_the_scales_with_the_trained_bias(signs, scales):
    ad = make_layer().lordba_adapters["a"]
    ad.attach_bias(torch.full((13,), 0.25))
    ad.set_trainable(signs=not signs, scales=not scales)
    ad.set_trainable(signs=signs, scales=scales)
    assert [ad.latent_A.requires_grad, ad.latent_B.requires_grad] == [signs, signs]
    trained = (ad.scale_in, ad.scale_mid, ad.scale_out, ad.bias_delta)
    assert [p.requires_grad for p in trained] == [scales] * 4


def test_freezing_and_unfreezing_the_signs_keep_which_scales_train():
    """A scale the user froze (``requires_grad_(False)``) stays frozen in the copies that freeze_signs and
    unfreeze_signs make, and one that trains keeps training."""
    ad = make_layer().lordba_adapters["a"]
    ad.set_trainable(signs=True, scales=True)
    ad.scale_in.requires_grad_(False)
    for copy in (ad.freeze_signs(), ad.freeze_signs().unfreeze_signs(0.5)):
        assert [p.requires_grad for p in (copy.scale_in, copy.scale_mid, copy.scale_out)] == [False, True, True]
    ad.set_trainable(signs=True, scales=False)
    frozen = ad.freeze_signs()
    assert not any(p.requires_grad for p in (frozen.scale_in, frozen.scale_mid, frozen.scale_out))


@pytest.mark.parametrize("training", [True, False])
def test_freeze_signs_and_pack_keep_the_train_or_eval_mode(training):
    """An adapter in eval mode stays in eval mode in its copies (in training mode, dropout would run at inference)."""
    ad = make_layer().lordba_adapters["a"].train(training)
    assert ad.freeze_signs().training == training and ad.pack().training == training


@pytest.mark.parametrize("scale_dtype", ["int8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kernel", ["auto", "sign", "unpack", "torch", "dense"])
def test_inference_form_computes_exactly_what_the_training_form_does(scale_dtype, kernel):
    layer = make_layer(in_f=37, out_f=19, names=("a",), r=5, scale_dtype=scale_dtype)
    trainable = layer.lordba_adapters["a"].freeze_signs()
    trainable.load_stored(trainable.stored_tensors())  # as loaded from a file for training
    trainable.requires_grad_(False)
    layer.add_adapter("a", trainable)
    x = torch.randn(3, 37)
    with torch.no_grad(), kernels.mode(kernel):
        expected, stored = layer(x), trainable.stored_tensors()
        packed = trainable.pack()
        layer.add_adapter("a", packed)
        assert packed.scale_in.dtype == get_codec(scale_dtype).stored_dtypes[0]
        assert torch.equal(layer(x), expected)
        for name, tensor in packed.stored_tensors().items():
            assert torch.equal(tensor, stored[name]), name
        merged = layer.base_layer.weight + packed.delta_weight()
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, merged)
        layer.unmerge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_int8_inference_adapter_holds_its_file_size_and_trains_back_exactly():
    layer = make_layer(in_f=64, out_f=48, names=("a",), r=8, scale_dtype="int8")
    trainable = layer.lordba_adapters["a"]
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = layer(x)
        packed = trainable.pack()
        layer.add_adapter("a", packed)
        assert packed.cache_nbytes()["total"] == 0
        assert held_nbytes([packed]) == (8 * 64 + 48 * 8) // 8 + 64 + 4 * 8 + 48  # signs, int8 b and a, float32 m
        assert torch.equal(layer(x), before)
        back = packed.trainable(STE())
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in back.parameters())
        layer.add_adapter("a", back)
        assert torch.equal(layer(x), before)
        assert back.cache_nbytes()["scales"] == 0  # the decoded scales view the parameters
        with kernels.mode("dense"):
            back(x)  # a cache of its own: the folded factors
        own = sum(t.numel() * t.element_size() for t in (*back.parameters(), *back.buffers()))
        assert back.cache_nbytes()["dense"] > 0
        assert held_nbytes([back, packed]) == own + back.cache_nbytes()["total"] + held_nbytes([packed])
    for name, tensor in back.pack().stored_tensors().items():
        assert torch.equal(tensor, packed.stored_tensors()[name]), name


def test_the_gpu_decoded_scales_of_an_int8_adapter_count_in_its_held_bytes():
    """Off the CPU an int8-code adapter decodes its scales to float32 once and keeps them (``_decoded``: the GPU
    kernels read float32); ``cache_nbytes`` left that cache out (it counted its ``scales``, ``signs`` and
    ``dense`` entries only), so ``held_nbytes``, by which a server sizes every load, said the adapter held its
    file's bytes while it held 4 bytes more per ``in`` and ``out`` value (as much again as the signs at r = 16).
    The cache is built here as an off-CPU call builds it (the same method), on CPU tensors."""
    layer = make_layer(in_f=64, out_f=48, names=("a",), r=8, scale_dtype="int8")
    packed = layer.lordba_adapters["a"].pack()
    before = held_nbytes([packed])
    decoded = packed._decoded(packed._kernel_tensors())  # what _inference keeps for an input off the CPU
    own = {t.untyped_storage().data_ptr() for t in packed.buffers()}
    extra = sum(t.nbytes for t in decoded if t.untyped_storage().data_ptr() not in own)
    assert extra >= 4 * (64 + 48)  # float32 b and a (m is float32 already)
    assert packed.cache_nbytes() == {"scales": extra, "signs": 0, "dense": 0, "total": extra}
    assert held_nbytes([packed]) == before + extra
    packed.clear_cache()
    assert held_nbytes([packed]) == before


def test_inference_form_hot_swaps_across_scale_formats_and_refuses_a_float_state():
    layer = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="int8")
    layer.add_adapter("a", layer.lordba_adapters["a"].pack())
    ad = layer.lordba_adapters["a"]
    other = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="float16").lordba_adapters["a"].pack()
    sign_buffer = ad.sign_A
    ad.codec = other.codec  # what hotswap_adapter does before loading the new tensors
    ad.load_stored(other.stored_tensors())
    assert ad.sign_A is sign_buffer  # in place: compiled graphs stay valid
    assert ad.scale_in.dtype == ad.scale_mid.dtype == torch.float16
    x = torch.randn(3, 30)
    with torch.no_grad():
        torch.testing.assert_close(ad(x), other(x), rtol=0, atol=0)
    state = {k: v.float() for k, v in layer.state_dict().items()}
    with pytest.raises(AdapterStateError, match="packed adapter"):
        layer.load_state_dict(state)


def test_from_stored_checks_shapes_and_dtypes_and_copies():
    packed = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="int8").lordba_adapters["a"].pack()
    t = packed.stored_tensors()
    again = PackedAdapter.from_stored(t, 30, 20, 4, packed.scaling, packed.codec)
    assert again.sign_A.data_ptr() != t["sign_A"].data_ptr()
    with pytest.raises(ShapeMismatchError, match="scale_in"):
        PackedAdapter.from_stored({**t, "scale_in": t["scale_in"].float()}, 30, 20, 4, 1.0, packed.codec)
    with pytest.raises(ShapeMismatchError, match="sign_A"):
        PackedAdapter.from_stored({**t, "sign_A": t["sign_A"][:-1]}, 30, 20, 4, 1.0, packed.codec)


def test_half_keeps_the_stored_dtypes_of_an_inference_adapter():
    packed = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="int8").lordba_adapters["a"].pack()
    before = {k: v.dtype for k, v in packed.state_dict().items()}
    packed.half()
    assert {k: v.dtype for k, v in packed.state_dict().items()} == before


@pytest.mark.parametrize("scale_dtype", ["int8", "float16"])
def test_to_empty_of_an_inference_adapter_on_meta_gives_its_stored_dtypes_back(scale_dtype):
    """``module.to("meta")`` then ``to_empty(device=...)`` (materialize, then load a state dict) raised "Cannot copy
    out of meta tensor" for a packed adapter: its ``_apply`` took its held scales back and copied them off ``meta``."""
    layer = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype=scale_dtype)
    layer.add_adapter("a", layer.lordba_adapters["a"].pack())
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 30)
    with torch.no_grad():
        want = layer(x)
    layer.to("meta")
    layer.to_empty(device="cpu")
    assert {k: (v.dtype, v.device.type) for k, v in layer.state_dict().items()} == {
        k: (v.dtype, "cpu") for k, v in state.items()
    }
    layer.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["training", "inference"])
def test_a_bias_attached_from_the_cpu_lives_on_the_adapters_device(form):
    """Loading an adapter with a trained bias (``bias="all"`` / ``"lora_only"``) onto a model on a GPU attached the
    file's bias, read on the CPU, as a CPU tensor beside the adapter's GPU ones: every forward then failed adding it
    to the layer's output ("Expected all tensors to be on the same device"), and so did saving. ``meta`` stands for
    the other device here."""
    meta = torch.device("meta")
    if form == "training":
        adapter = TrainableAdapter(30, 20, 4, 1.0, get_codec("float32"), STE(), device=meta)
    else:
        signs = torch.empty(15, dtype=torch.uint8, device=meta), torch.empty(10, dtype=torch.uint8, device=meta)
        scales = tuple(torch.empty(n, device=meta) for n in (30, 4, 20))
        adapter = PackedAdapter(*signs, scales, 30, 20, 4, 1.0, get_codec("float32"))
    adapter.attach_bias(torch.ones(20, dtype=torch.float16))
    assert (adapter.bias_delta.device, adapter.bias_delta.dtype) == (meta, torch.float32)
    assert isinstance(adapter.bias_delta, torch.nn.Parameter) == (form == "training")


def test_gradient_to_the_input_includes_an_inference_adapter_in_every_mode():
    """An adapter trained beside (or below) a loaded one needs the loaded branch's share of the input
    gradient: the inference form takes the autograd path when its input needs a gradient."""
    layer = make_layer(in_f=40, out_f=24, names=("a",), r=4, scale_dtype="int8")
    trainable = layer.lordba_adapters["a"].freeze_signs()
    trainable.requires_grad_(False)
    packed = trainable.pack()
    grads = {}
    for name, ad in (("trainable", trainable), ("packed", packed)):
        for mode in ("auto", "torch", "dense"):
            x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with kernels.mode(mode):
                ad(x).sum().backward()
            grads[name, mode] = x.grad
    for key, grad in grads.items():
        assert grad is not None, key
        torch.testing.assert_close(grad, grads["trainable", "torch"], rtol=1e-6, atol=1e-6)


def test_compiled_latent_adapter_without_gradient_traces_in_one_graph():
    layer = make_layer(in_f=40, out_f=24, names=("a",), r=4, scale_dtype="int8")
    layer.requires_grad_(False)
    x = torch.randn(5, 40)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    # traced: the latents' signs through the autograd function's math; eager: the CPU kernel (other sum order)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_torch_mode_does_not_build_the_cpu_kernels(monkeypatch):
    monkeypatch.setattr(kernels._STATE, "cpu", None)  # as in a fresh process
    with torch.no_grad(), kernels.mode("torch"):  # neither building the layer nor running it
        packed = make_layer(in_f=40, out_f=24, names=("a",), r=4).lordba_adapters["a"].pack()
        packed(torch.randn(2, 40))
    assert kernels._STATE.cpu is None


def test_caches_follow_a_fused_optimizer_step(input_ids):
    """Fused AdamW (the HF Trainer's default) does not bump version counters: the packed-sign and
    scale caches must still be rebuilt after each optimizer step."""
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.core.packing import pack_signs

    from conftest import tiny_llama

    torch.manual_seed(0)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    with torch.no_grad():
        lm(input_ids=input_ids)  # fills the caches
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=0.5, fused=True)
    for _ in range(3):
        lm(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        got = lm(input_ids=input_ids).logits
        for adapter in lm.adapter_modules("default").values():
            adapter.clear_cache()
        want = lm(input_ids=input_ids).logits
    assert torch.equal(got, want)
    adapter = lm.adapter_modules("default")["model.layers.0.self_attn.q_proj"]
    assert torch.equal(adapter.stored_tensors()["sign_A"], pack_signs(adapter.latent_A.detach()))


def test_from_stored_without_copy_holds_the_given_tensors_and_equals_a_constructed_adapter():
    packed = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="int8").lordba_adapters["a"].pack()
    t = packed.stored_tensors()
    shared = PackedAdapter.from_stored(t, 30, 20, 4, packed.scaling, packed.codec, copy=False)
    assert all(getattr(shared, k) is v for k, v in t.items())  # the loader's own tensors: no copy
    built = PackedAdapter(
        t["sign_A"], t["sign_B"], (t["scale_in"], t["scale_mid"], t["scale_out"]), 30, 20, 4, 1.0, packed.codec
    )
    built.scaling = packed.scaling
    assert set(vars(shared)) == set(vars(built))  # the same module state as __init__ gives
    assert {k: type(v) for k, v in vars(shared).items()} == {k: type(v) for k, v in vars(built).items()}
    assert list(shared.state_dict()) == list(built.state_dict())
    x = torch.randn(3, 30)
    assert torch.equal(shared(x), built(x))
    shared.register_forward_hook(lambda *a: None)
    assert not built._forward_hooks  # containers are the adapter's own
    noncontiguous = {**t, "scale_mid": torch.stack([t["scale_mid"], t["scale_mid"]], 1)[:, 0]}
    copied = PackedAdapter.from_stored(noncontiguous, 30, 20, 4, 1.0, packed.codec, copy=False)
    assert copied.scale_mid.is_contiguous() and copied.sign_A is t["sign_A"]


@pytest.mark.parametrize("kernel", ["auto", "dense"])
def test_a_latent_adapter_first_run_under_inference_mode_runs_in_every_mode_afterwards(kernel):
    """The latents' packed signs are kept between calls; made under ``torch.inference_mode`` (an evaluation,
    a server) they were inference tensors, which have no version counter, so the ``dense`` mode's folded
    factors (keyed by the signs' versions) raised on every later call, inside inference mode or out."""
    layer = make_layer(in_f=37, out_f=19, names=("a",), r=5)
    x = torch.randn(3, 37)
    with torch.inference_mode(), kernels.mode(kernel):
        first = layer(x)
    with torch.no_grad(), kernels.mode("torch"):
        want = layer(x)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    for context in (torch.inference_mode, torch.no_grad):
        with context(), kernels.mode("dense"):
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lordba_adapters["a"].latent_A.neg_()  # a change to the latents is still seen
        with kernels.mode("dense"):
            dense = layer(x)
        with kernels.mode("torch"):
            torch.testing.assert_close(dense, layer(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dense, want)


@torch.no_grad()
@pytest.mark.parametrize("latent", [False, True])
def test_a_tensor_replaced_twice_between_calls_is_never_taken_for_the_one_a_cache_was_made_for(latent):
    """The caches are keyed by version counter and address; ``.data =`` keeps the version, and a replaced
    tensor's freed storage is often where the next one is allocated: a scale (int8: decoded scales kept) or
    latents (packed signs kept) replaced twice between two calls gave the first call's cached values again,
    silently (about one trial in three). An entry keeps the storages it was made for alive."""
    for trial in range(200):
        layer = make_layer(in_f=64, out_f=64, names=("a",), scale_dtype="int8")
        ad = layer.lordba_adapters["a"]
        if not latent:
            ad = ad.freeze_signs()
            layer.add_adapter("a", ad)
        x = torch.randn(3, 64)
        layer(x)  # the caches are made
        tensor = ad.latent_A if latent else ad.scale_in
        new = torch.randn_like(tensor) * (0.01 if latent else 1.0)
        tensor.data = torch.ones_like(tensor)
        tensor.data = new.clone()
        got = layer(x)
        ad.clear_cache()
        assert torch.equal(got, layer(x)), trial


@pytest.mark.parametrize("scale_dtype", ["float32", "int8"])
@pytest.mark.parametrize("form, kernel", [("latent", "auto"), ("frozen", "auto"), ("packed", "dense")])
def test_torch_save_of_an_adapter_that_has_run_without_gradient(scale_dtype, form, kernel):
    """``torch.save(model)`` of a model whose training-form adapters had run one forward without gradient (an
    evaluation) raised "Cannot save multiple tensors or storages that view the same data as different types": the
    adapter's caches hold the untyped storages of its float32 parameters (the entries' pins) beside the parameters
    themselves; so did a packed adapter's ``dense``-mode entry. The caches are not pickled (a copy rebuilds its own)."""
    import io

    layer = make_layer(in_f=40, out_f=24, names=("a",), r=4, scale_dtype=scale_dtype)
    ad = layer.lordba_adapters["a"]
    ad = {"latent": ad, "frozen": ad.freeze_signs(), "packed": ad.pack()}[form]
    x = torch.randn(3, 40)
    with torch.no_grad(), kernels.mode(kernel):
        want = ad(x)
        assert ad._caches.entries  # what made the pickle fail
        saved = io.BytesIO()
        torch.save(ad, saved)
        saved.seek(0)
        copied = torch.load(saved, weights_only=False)
        assert not copied._caches.entries
        assert torch.equal(copied(x), want)
        assert torch.equal(ad(x), want)  # the original keeps its caches
        assert ad._caches.entries
