"""Capture is harmless (the model is left exactly as it was) and fails loudly on bad input."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from _hygiene import assert_unchanged, snapshot
from transformers.models.mamba import modeling_mamba

import captum_implicit as ci
from captum_implicit.core.capture import Capture, torch_fallback_of


def _model(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=32)
    return tf.MambaForCausalLM(cfg).to(dtype)


_KERNELS = ("mamba_selective_scan", "causal_conv1d_fn")


def _snapshot(model: torch.nn.Module) -> dict:
    """:func:`_hygiene.snapshot` and the HF kernel functions the capture patches while it runs."""
    return {"model": snapshot(model), "functions": {k: getattr(modeling_mamba, k) for k in _KERNELS}}


def _assert_same(model: torch.nn.Module, before: dict) -> None:
    assert_unchanged(model, before["model"])
    assert before["functions"] == {k: getattr(modeling_mamba, k) for k in _KERNELS}


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_left_exactly_as_it_was(train_mode):
    model = _model()
    model.train(train_mode)
    # a mixed state the capture must not normalise
    model.backbone.layers[0].mixer.out_proj.weight.requires_grad_(False)
    model.backbone.layers[1].eval()
    user_hook = model.backbone.layers[0].register_forward_hook(lambda *a: None)
    before = _snapshot(model)
    layers = ci.implicit_attention(model, torch.randint(0, 32, (1, 7)))
    assert len(layers) == 2
    _assert_same(model, before)
    user_hook.remove()


def test_model_left_as_it_was_when_forward_raises():
    model = _model()
    model.train()
    before = _snapshot(model)
    bad_ids = torch.full((1, 5), 10_000)  # out of the vocabulary: the embedding raises mid-forward
    with pytest.raises(IndexError):
        ci.implicit_attention(model, bad_ids)
    _assert_same(model, before)

    def boom(*args, **kwargs):
        raise RuntimeError("boom inside the second mixer")

    handle = model.backbone.layers[1].mixer.x_proj.register_forward_hook(boom)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        ci.implicit_attention(model, torch.randint(0, 32, (1, 5)))
    _assert_same(model, before)
    handle.remove()


def test_unsupported_model_names_the_problem():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ci.UnsupportedModelError, match="no supported layer.*Linear.*MambaMixer"):
        ci.implicit_attention(model, torch.randn(2, 4))


def test_wrong_shapes_and_dtypes_are_refused():
    model = _model()
    with pytest.raises(ci.InputError, match="integer token ids"):
        ci.implicit_attention(model, torch.randn(1, 5))
    with pytest.raises(ci.InputError, match=r"\(batch, length\)"):
        ci.implicit_attention(model, torch.randint(0, 32, (1, 2, 5)))
    with pytest.raises(ci.InputError, match="inputs_embeds must have shape"):
        ci.implicit_attention(model, inputs_embeds=torch.randn(1, 5, 7, dtype=torch.float64))
    with pytest.raises(ci.InputError, match="attention_mask has shape"):
        ci.implicit_attention(model, torch.randint(0, 32, (2, 5)), attention_mask=torch.ones(2, 4))


def test_non_finite_inputs_and_captures_are_refused():
    model = _model()
    embeds = torch.randn(1, 5, 16, dtype=torch.float64)
    embeds[0, 2, 3] = float("nan")
    with pytest.raises(ci.NonFiniteError, match="inputs_embeds"):
        ci.implicit_attention(model, inputs_embeds=embeds)
    with torch.no_grad():
        model.backbone.layers[1].mixer.dt_proj.bias.fill_(float("inf"))
    before = _snapshot(model)
    with pytest.raises(ci.NonFiniteError, match="backbone.layers.1.mixer"):
        ci.implicit_attention(model, torch.randint(0, 32, (1, 5)))
    _assert_same(model, before)


def test_finiteness_is_read_once_for_all_layers(monkeypatch):
    """The captured factors' finiteness flags of every layer are read in one go when the layers are asked for (on a
    GPU each read is a synchronisation: one per layer in the forward left the GPU idle); the first non-finite
    layer in forward order is still the one named, also when the forward fails after it."""
    from captum_implicit.core import capture

    reads = []
    real = capture._raise_if_not_finite
    monkeypatch.setattr(capture, "_raise_if_not_finite", lambda pending: (reads.append(len(pending)), real(pending)))
    model = _model()
    layers = ci.implicit_attention(model, torch.randint(0, 32, (1, 5)))
    assert reads == [len(layers)] == [2]

    with torch.no_grad():
        model.backbone.layers[0].mixer.dt_proj.bias.fill_(float("inf"))  # both layers non-finite: the first named
    with pytest.raises(ci.NonFiniteError, match=r"backbone\.layers\.0\.mixer"):
        ci.implicit_attention(model, torch.randint(0, 32, (1, 5)))
    before = _snapshot(model)
    with pytest.raises(ci.NonFiniteError, match=r"backbone\.layers\.0\.mixer") as raised:
        with Capture(model), torch.no_grad():
            model(torch.randint(0, 32, (1, 5)))
            raise RuntimeError("a later failure of the forward")
    assert isinstance(raised.value.__cause__, RuntimeError)
    _assert_same(model, before)


def test_inputs_embeds_give_the_same_attention_as_ids():
    model = _model()
    ids = torch.randint(0, 32, (2, 9))
    a = ci.implicit_attention(model, ids)
    b = ci.implicit_attention(model, inputs_embeds=model.get_input_embeddings()(ids))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.dense(), y.dense())


def test_gradient_tracking_gives_the_gradient_at_the_layer_output():
    model = _model()
    ids = torch.randint(0, 32, (1, 6))
    captured = {}

    def keep(i):
        def hook(module, args):
            args[0].retain_grad()
            captured[i] = args[0]

        return hook

    handles = [layer.mixer.out_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.backbone.layers)]
    with Capture(model, track_grad=True) as cap:
        logits = model(ids).logits
        logits[0, -1, 3].backward()
    for h in handles:
        h.remove()
    for i, la in enumerate(cap.layers):
        assert torch.equal(la.output_grad, la.from_output_layout(captured[i].grad))
    model.zero_grad(set_to_none=True)


def test_user_registered_layer_class_is_captured():
    class Toy(torch.nn.Module):
        """y = cumulative mean of x per channel: A[t, s] = 1/(t+1)."""

        def forward(self, x):  # x: (b, L, C)
            steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
            return x.cumsum(1) / steps

    class ToyAttention(ci.LayerAttention):
        family = "toy"

        def core_block(self, channels, rows, cols):
            t = torch.arange(rows.start, rows.stop, dtype=self.dtype)[:, None]
            s = torch.arange(cols.start, cols.stop, dtype=self.dtype)[None, :]
            tile = torch.where(s <= t, 1.0 / (t + 1), torch.zeros((), dtype=self.dtype))
            n = len(range(*channels.indices(self.num_channels))) if isinstance(channels, slice) else len(channels)
            return tile.expand(self.batch_size, n, -1, -1)

        def to_output_layout(self, y):
            return y[..., 0].transpose(1, 2)

        def from_output_layout(self, t):
            return t.transpose(1, 2)[..., None]

    adapter = ci.Adapter(
        family="toy",
        classes=(Toy,),
        build=lambda module, rec, name: ToyAttention(name, rec.args[0].transpose(1, 2)[..., None].double()),
        output_module=None,
    )
    from captum_implicit.core.registry import find_adapter

    assert find_adapter(Toy()) is None  # looked up (and remembered per class) before the registration
    ci.register_adapter(adapter)
    try:
        assert find_adapter(Toy()) is adapter
        model = torch.nn.Sequential(Toy())
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        (la,) = ci.implicit_attention(model, x)
        assert la.family == "toy" and la.name == "0"
        assert torch.allclose(la.output(), model(x))
    finally:
        ci.unregister_adapter(adapter)
    assert find_adapter(Toy()) is None


def _hub_wrapper(torch_function, implementation):
    """The closure transformers' hub-kernel wrappers leave (``use_kernel_func_from_hub_with_fallback``)."""

    def wrapped(*args, **kwargs):
        return implementation(*args, **kwargs) if implementation is not None else torch_function(*args, **kwargs)

    return wrapped


def test_torch_fallback_found_through_nested_kernel_wrappers():
    """A kernel wrapper around another (transformers binding fla, then a second layer of wrapping) unwraps to the
    innermost torch function, not to the inner wrapper, which would still call the GPU kernel on CPU tensors."""

    def torch_function(x):
        return x + 1

    def gpu_kernel(x):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    once = _hub_wrapper(torch_function, gpu_kernel)
    twice = _hub_wrapper(once, gpu_kernel)
    assert torch_fallback_of(once) is torch_function
    assert torch_fallback_of(twice) is torch_function
    assert torch_fallback_of(torch_function) is None
