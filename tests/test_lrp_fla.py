"""LRP (captum_implicit.lrp.fla) on flash-linear-attention's layers: GLA, HGRN2, RetNet, RWKV-6, DeltaNet, GDN.

Each layer sits in a tiny float64 model
``embedding → [fla RMSNorm → layer → residual] × 2 → RMSNorm → head``. On CPU fla's Triton pieces are
unavailable; the reference (the model without the composite) runs under
:class:`~captum_implicit.core.capture.Capture`, which routes them to fla's naive references and torch norms
(``adapters/fla.py``) exactly as the forms compute their values, so the logits must agree bit for bit.
fla's ``ShortConvolution`` has no CPU route: configurations with short convolutions are checked for
conservation on CPU, and for values against fla's Triton conv in the GPU test. Skipped when fla is absent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("zennit")
fla = pytest.importorskip("fla")

import fla.layers as fl  # noqa: E402
from fla.modules import RMSNorm  # noqa: E402

from captum_implicit.core.capture import Capture  # noqa: E402
from captum_implicit.lrp import GatedLinearComposite, LRPError  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form, mixers_without_lrp_form  # noqa: E402
from conftest import rel_err, requires_cuda  # noqa: E402
from _lrp_checks import CONSERVE, FLOAT32, assert_restored, check_ablation, check_bias_absorption  # noqa: E402
from _lrp_checks import check_conservation, check_conservation_float32, check_restored_and_captum_class  # noqa: E402
from _lrp_checks import model_state  # noqa: E402
from _lrp_checks import rel_conservation, relevance  # noqa: E402

EXAMPLES = min(settings().max_examples, 4)
HIDDEN, VOCAB = 16, 23

KINDS: dict[str, tuple] = {
    "gla": (fl.GatedLinearAttention, {"fuse_norm": True}),
    "gla_unfused": (fl.GatedLinearAttention, {"fuse_norm": False, "num_kv_heads": 1}),
    "hgrn2": (fl.HGRN2Attention, {"expand_ratio": 4}),
    "retnet": (fl.MultiScaleRetention, {"fuse_norm": True}),
    "retnet_unfused": (fl.MultiScaleRetention, {"fuse_norm": False, "use_output_gate": False}),
    "rwkv6": (fl.RWKV6Attention, {"proj_low_rank_dim": 4, "gate_low_rank_dim": 4}),
    "deltanet": (fl.DeltaNet, {}),
    "deltanet_gate_sum": (fl.DeltaNet, {"use_gate": True, "qk_norm": "sum", "qk_activation": "relu"}),
    "gated_deltanet": (fl.GatedDeltaNet, {"head_dim": 4}),
    "gated_deltanet_neg": (fl.GatedDeltaNet, {"head_dim": 4, "use_gate": False, "allow_neg_eigval": True}),
}
_CONV = {fl.DeltaNet, fl.GatedDeltaNet, fl.GatedLinearAttention, fl.MultiScaleRetention, fl.HGRN2Attention}


class TinyFLA(nn.Module):
    """``embedding → [RMSNorm → layer → residual] × layers → RMSNorm → head`` around one fla layer class."""

    def __init__(self, kind: str, layers: int = 2, conv: bool = False, conv_bias: bool = False) -> None:
        super().__init__()
        cls, kw = KINDS[kind]
        kw = dict(kw)
        if cls in _CONV:
            kw.update(use_short_conv=conv, **({"conv_bias": True} if conv_bias else {}))
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norms = nn.ModuleList(RMSNorm(HIDDEN) for _ in range(layers))
        self.layers = nn.ModuleList(cls(hidden_size=HIDDEN, num_heads=2, layer_idx=i, **kw) for i in range(layers))
        self.final = RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, use_cache=False, past_key_values=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(norm(h), attention_mask=attention_mask, past_key_values=past_key_values,
                          use_cache=use_cache)[0]
        return SimpleNamespace(logits=self.head(self.final(h)))


def tiny(kind: str, seed: int = 0, zero_biases: bool = True, dtype=torch.float64, **kw) -> TinyFLA:
    torch.manual_seed(seed)
    model = TinyFLA(kind, **kw)
    with torch.no_grad():  # spread every weight (fla initialises several to 0 / 1) so that no branch is negligible
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("x_bias"):
                p.zero_() if zero_biases else p.normal_(0, 0.3)
            elif "norm" in name or name.endswith(("final.weight", "bonus")) or ".mu" in name:
                p.normal_(1 if "norm" in name or "final" in name else 0, 0.3)
            elif name.endswith(("A_log", "dt_bias")):
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


def reference_logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    """The model's own logits, fla's Triton pieces routed to torch on CPU as during a capture."""
    with Capture(model), torch.no_grad():
        return model(ids, **kw).logits


def _ids(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registry, values
def test_every_layer_and_norm_has_a_form():
    for kind in KINDS:
        model = tiny(kind)
        assert not mixers_without_lrp_form(model), kind
        assert find_lrp_form(model.layers[0]).family == "fla"
        assert find_lrp_form(model.final) is not None


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("length", [1, 9, 70])  # L > 64: the layers' chunk branch (routed on CPU)
def test_canonized_logits_identical(kind, length):
    model = tiny(kind, seed=1, zero_biases=False)
    ids = _ids(length, 2, length)
    ref = reference_logits(model, ids)
    with GatedLinearComposite().context(model):
        out = model(ids).logits
    assert torch.equal(out, ref)


def test_rwkv6_padding_logits_identical():
    model = tiny("rwkv6", seed=2, zero_biases=False)
    ids, mask = _ids(3, 2, 10), torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    ref = reference_logits(model, ids, attention_mask=mask)
    with GatedLinearComposite().context(model):
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_canonized_logits_float32():
    for kind in ("gla", "rwkv6", "gated_deltanet"):
        model = tiny(kind, seed=3, dtype=torch.float32)
        ids = _ids(4, 2, 11)
        with GatedLinearComposite().context(model):
            out = model(ids).logits
        assert torch.equal(out, reference_logits(model, ids)), kind


def test_short_conv_is_fla_conv_definition(monkeypatch):
    """With short convs the forms' logits equal the model with fla's ShortConvolution replaced by its definition
    (depthwise causal conv1d, ``padding = K − 1`` cut to ``L``, then SiLU): fla's conv is Triton-only, compared
    with the real one in the GPU test."""
    import torch.nn.functional as F
    from fla.modules import ShortConvolution

    def conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
        y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=self.kernel_size[0] - 1,
                     groups=self.hidden_size)[..., : x.shape[1]].transpose(1, 2)
        return (F.silu(y) if self.activation else y), None

    monkeypatch.setattr(ShortConvolution, "forward", conv)
    # GDN may run its three depthwise convs as one fused causal_conv1d call: the same maths, three calls here
    monkeypatch.setattr(fl.GatedDeltaNet, "_use_fused_qkv_conv", lambda self, *a, **k: False)
    for kind in ("gla", "hgrn2", "retnet", "deltanet", "gated_deltanet"):
        model = tiny(kind, seed=4, zero_biases=False, conv=True, conv_bias=True)
        ids = _ids(5, 2, 9)
        ref = reference_logits(model, ids)
        with GatedLinearComposite().context(model):
            out = model(ids).logits
        assert rel_err(out, ref) < 1e-14, kind  # the same maths; F.silu vs the identity rule's no-grad F.silu


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 12), batch=st.integers(1, 2), conv=st.booleans(),
       data=st.data())
def test_conservation_exact(kind, seed, length, batch, conv, data):
    model = tiny(kind, seed=seed, conv=conv and KINDS[kind][0] in _CONV)
    ids = _ids(seed, batch, length)
    target = torch.tensor(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=batch, max_size=batch)))
    mask = None
    if kind == "rwkv6" and data.draw(st.booleans()):  # RWKV-6 multiplies its inputs by the mask
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, : data.draw(st.integers(0, length - 1))] = 0
    # padded positions still carry their embeddings through the residual stream: not zero, only conserved
    check_conservation(model, ids, target, mask, padded_carry_nothing=False)


@pytest.mark.parametrize("kind", ["gla", "retnet", "deltanet"])
def test_conservation_across_chunk_branch(kind):
    """L = 70 > 64: the layers take their chunk branch; the forms' value (routed kernels) still conserves."""
    model = tiny(kind, seed=9)
    R, f, _ = relevance(model, _ids(9, 1, 70), torch.tensor([4]))
    assert rel_conservation(R, f) <= CONSERVE


@pytest.mark.parametrize("kind", list(KINDS))
def test_conservation_float32(kind):
    """A float32 model (fla's naive kernels' own float32 values, gradients through them): float32 rounding
    (measured ≤ 2e-6)."""
    model = tiny(kind, seed=11, dtype=torch.float32)
    check_conservation_float32(model, _ids(1, 2, 12), torch.tensor([3, 5]))


@pytest.mark.parametrize("kind,kw", [("rwkv6", {}), ("gla", {"conv": True, "conv_bias": True}),
                                     ("gated_deltanet", {"conv": True, "conv_bias": True})])
def test_bias_absorption(kind, kw):
    """RWKV-6's GroupNorm bias, the short convs' biases and the head's: Σ R + Σ b ⊙ grad_b = f."""
    model = tiny(kind, seed=5, zero_biases=False, **kw)
    check_bias_absorption(model, _ids(6, 1, 9), torch.tensor([3]))


# ----------------------------------------------------------------------------- ablations
_GATED = ("gla", "retnet", "rwkv6", "deltanet_gate_sum", "gated_deltanet")
ABLATIONS = [
    *[(k, "detach_ssm", {}) for k in KINDS],
    *[(k, "detach_norm", {}) for k in ("gla", "hgrn2", "rwkv6", "deltanet")],
    *[(k, "half_gate", {}) for k in (*_GATED, "gla_unfused")],
    *[(k, "identity_act", {}) for k in ("gla", "rwkv6", "deltanet", "gated_deltanet")],
    ("deltanet", "identity_act", {"conv": True}),  # the short convs' SiLU (HGRN2's value conv has none)
    *[(k, "exact_casts", {}) for k in ("gla", "hgrn2", "retnet", "rwkv6", "deltanet", "gated_deltanet")],
]


@pytest.mark.parametrize("kind,rule,kw", ABLATIONS)
def test_ablation_breaks_conservation(kind, rule, kw):
    """Each rule matters: switched off, the error exceeds 1e-3 (exact_casts: the float32 kernels' rounding,
    > CONSERVE)."""
    model = tiny(kind, seed=0, **kw)
    check_ablation(model, _ids(0, 2, 9), torch.tensor([3, 7]), rule, CONSERVE if rule == "exact_casts" else 1e-3)


# ----------------------------------------------------------------------------- model left as it was, refusals
@pytest.mark.parametrize("kind", ["gla_unfused", "rwkv6", "gated_deltanet"])
def test_model_restored_and_captum_class(kind):
    model = tiny(kind, seed=4, zero_biases=False)
    check_restored_and_captum_class(model, _ids(4, 2, 6), [2, 9])


def _refused(model: nn.Module, match: str, **kw) -> None:
    before = model_state(model)
    with pytest.raises(LRPError, match=match):
        with GatedLinearComposite().context(model):
            model(_ids(1, 2, 6), **kw)
    assert_restored(model, before)


@pytest.mark.parametrize("kind", ["gla", "hgrn2", "retnet", "deltanet", "gated_deltanet"])
def test_padding_mask_refused(kind):
    model = tiny(kind)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    name = type(model.layers[0]).__name__
    _refused(model, f"{name} layer 0: fla unpads a padded batch", attention_mask=mask)
    with GatedLinearComposite().context(model):  # a mask without padding is no padding
        out = model(_ids(1, 2, 6), attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
    assert torch.equal(out, reference_logits(model, _ids(1, 2, 6)))


@pytest.mark.parametrize("kind", ["gla", "rwkv6", "gated_deltanet"])
def test_cache_refused(kind):
    from fla.models.utils import Cache

    model = tiny(kind)
    name = type(model.layers[0]).__name__
    _refused(model, f"{name} layer 0: the LRP form keeps no state", use_cache=True, past_key_values=Cache())
    cache = Cache()
    with Capture(model), torch.no_grad():  # a filled cache (the layers routed on CPU)
        model(_ids(1, 2, 6), use_cache=True, past_key_values=cache)
    _refused(model, f"{name} layer 0: this call continues from a cached state", use_cache=True,
             past_key_values=cache)


# ----------------------------------------------------------------------------- GPU: fla's Triton kernels
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("length", [37, 100])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gpu_logits_match_triton(kind, length):
    """float32 on CUDA: the plain model runs fla's Triton kernels, norms, rotary, token shift and short convs;
    the forms run fla's naive float32 references and torch. In IEEE mode both are float32 computations of the
    same maths in different orders (recurrent vs chunked, ≤ 100 steps, tiny weights): float32 rounding, bounded
    like test_fla_layers' GPU test (FLOAT32 = 1e-4 relative). The relevance conserves to float32 rounding."""
    if length > 64 and kind.startswith("deltanet"):
        pytest.skip("fla's chunk_delta_rule refuses float32 ('Please use bfloat16')")
    model = tiny(kind, seed=6, conv=KINDS[kind][0] in _CONV, dtype=torch.float32).cuda()
    ids = _ids(7, 2, length).cuda()
    with torch.no_grad():
        ref = model(ids).logits
    with GatedLinearComposite().context(model), torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, ref) < FLOAT32
    R, f, _ = relevance(model, ids, torch.tensor([1, 2], device="cuda"))
    assert rel_conservation(R.double(), f.double()) < FLOAT32
