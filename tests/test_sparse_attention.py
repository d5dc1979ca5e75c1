"""Capture of indexed sparse softmax attention: GLM-5-Next's DSA (``Glm5NextTextAttention``) and Qwen4-Exp's QSA
(``Qwen4ExpTextAttention``), in full hybrid models (linear + sparse layers), with the indexer's selection narrower
than the sequence.

Each sparse layer's ``output()`` must equal the real tensor entering its ``o_proj`` (recorded independently with
``OutputRecorder``) in float64 and float32 with left padding; the matrix's support must be exactly the indexer's
selection (recorded independently with a hook on the indexer); aggregate/row must agree with dense. The tiny models
are the LRP tests' (``tests/test_lrp_relatives.py``), so capture and LRP see the same configurations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_implicit.core.capture import implicit_attention
from conftest import OutputRecorder, assert_views_match_dense, check_every_layer, rel_err, requires_cuda

pytest.importorskip("transformers")
from test_lrp_relatives import VOCAB, build_or_skip, tiny_glm5_next, tiny_qwen4_exp  # noqa: E402

# (layers, sparse layers, GLM's shared-indexer layers): first, last, adjacent, alone, sharing the previous top-k
PATTERNS = [(1, (0,), ()), (2, (0, 1), (1,)), (2, (1,), ()), (3, (0, 2), ()), (3, (1, 2), (2,))]
LINEAR = {"glm5_next": "kda", "qwen4_exp": "gated_deltanet"}


def _build(kind: str, dtype: torch.dtype, seed: int, pattern: tuple, group: int, count: int) -> torch.nn.Module:
    """``group`` tokens per k-pool / block, ``count`` of them selected per query (plus the incomplete tail)."""
    layers, attn, shared = pattern
    if kind == "glm5_next":
        return tiny_glm5_next(seed=seed, dtype=dtype, layers=layers, attn=attn, shared=shared, kpool=group,
                              pools=count, zero_biases=False, use_bias=True)
    return tiny_qwen4_exp(seed=seed, dtype=dtype, layers=layers, attn=attn, ratio=group, blocks=count,
                          zero_biases=False, use_bias=True)


def _selections(model: torch.nn.Module, kind: str) -> list:
    """Hooks recording, per sparse layer in forward order, the (b, L, L) boolean key set HF's indexer selected."""
    found: list = []
    handles = []
    for layer in model.modules():
        if type(layer).__name__ not in ("Glm5NextTextAttention", "Qwen4ExpTextAttention"):
            continue
        if layer.indexer is None:  # GLM shared layer: the previous full layer's selection
            handles.append(layer.register_forward_pre_hook(lambda m, a: found.append(found[-1])))
            continue

        def record(m, args, out):
            if kind == "qwen4_exp":
                found.append(out[:, 0])  # (b, L, L) selected tokens
                return
            length = out.shape[1]
            keys = torch.zeros(*out.shape[:2], length + 1, dtype=torch.bool)
            found.append(keys.scatter(-1, torch.where(out >= 0, out.long(), length), True)[..., :length])

        handles.append(layer.indexer.register_forward_hook(record))
    return found, handles


def _run(kind: str, dtype: torch.dtype, seed: int, length: int, pad: int, pattern: tuple, group: int, count: int):
    model = _build(kind, dtype, seed, pattern, group, count)
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed + length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0  # left padding on the last row
    selected, handles = _selections(model, kind)
    try:
        with OutputRecorder(model, "o_proj") as rec:
            layers = implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers_n, attn, _ = pattern
    assert [a.family for a in layers] == ["softmax" if i in attn else LINEAR[kind] for i in range(layers_n)]
    return [a for a in layers if a.family == "softmax"], rec.inputs, selected, mask


@pytest.mark.parametrize("kind", ["glm5_next", "qwen4_exp"])
@settings(max_examples=8)
@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 40),
    pad=st.integers(0, 6),
    pattern=st.sampled_from(PATTERNS),
    group=st.integers(1, 3),
    count=st.integers(1, 2),
)
def test_output_equals_real_o_proj_input(kind, dtype, seed, length, pad, pattern, group, count):
    """``output()`` is the tensor entering ``o_proj``; the matrix is zero outside the indexer's selection."""
    sparse, real, selected, mask = _run(kind, dtype, seed, length, pad, pattern, group, count)
    assert len(sparse) == len(selected)
    bound = 1e-10 if dtype == torch.float64 else 1e-4  # eager attention: probs @ V in the model's dtype
    for attn, keys in zip(sparse, selected):
        assert rel_err(attn.output(), real[attn.name]) < bound, attn.name
        support = attn.dense().ne(0).any(1)  # (b, L, L): keys with weight for some channel
        rows = mask.bool()  # pad query rows attend uniformly to every key (no selection): their own check
        assert torch.equal(support[rows], keys[rows]), attn.name
        assert int(keys.sum(-1).max()) <= group * count + group - 1  # top-k groups and the incomplete tail


def test_selection_narrower_than_causal():
    """On a long enough sequence the sparse matrices leave out visible keys (the selection really matters), and
    the captured probabilities still reproduce the layer."""
    for kind in ("glm5_next", "qwen4_exp"):
        sparse, real, selected, mask = _run(kind, torch.float64, 3, 24, 3, (3, (1, 2), (2,)), 2, 2)
        for attn, keys in zip(sparse, selected):
            visible = torch.ones(24, 24, dtype=torch.bool).tril() & mask.bool()[:, None, :]
            dense = attn.dense()
            assert (visible & ~keys).any() and (keys & ~visible).sum() == 0
            assert (dense.ne(0).any(1) & visible).sum() < visible.sum()
            assert rel_err(attn.output(), real[attn.name]) < 1e-10


@pytest.mark.parametrize("kind", ["glm5_next", "qwen4_exp"])
def test_aggregate_and_row_equal_reductions_of_dense(kind):
    sparse, _, _, _ = _run(kind, torch.float64, 0, 19, 2, (3, (1, 2), (2,)), 2, 2)  # pad rows included
    for attn in sparse:
        assert_views_match_dense(attn, rows=(0, 11), max_block_elements=512)


def test_qwen4_gate_is_in_the_matrix():
    """QSA's σ(gate) output gate is the row scale (not trivial), GLM's DSA has none."""
    for kind, gated in (("qwen4_exp", True), ("glm5_next", False)):
        sparse, _, _, _ = _run(kind, torch.float64, 1, 9, 0, (2, (1,), ()), 2, 1)
        for attn in sparse:
            assert (attn.row_scale is not None and attn.row_scale.std() > 1e-3) == gated


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["glm5_next", "qwen4_exp"])
def test_every_layer_on_cuda(kind, dtype):
    """On CUDA (fla's kernels for the linear layers where fla imports; the capture turns the sparse layers' SDPA
    eager), float32 and bf16, left padding: a linear, a sparse and a shared-indexer layer (GLM), each reproduces the
    real input of its output projection (bounds: conftest.GPU_BOUND)."""
    # the GPU machine's transformers may predate the sparse layer types (CI's has them: the CPU tests need them)
    model = build_or_skip(kind, _build, kind=kind, dtype=torch.float32, seed=3, pattern=(3, (1, 2), (2,)), group=2,
                          count=2).to("cuda", dtype)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    # bf16: the linear layer of these models (random biases) is further from fla's bf16 kernel than the layer tests'
    # (H200, session 10: 3.05e-2 Qwen4-Exp's Gated DeltaNet, 1.5e-2 GLM-5-Next's KDA, against ≤ 1e-2 in
    # tests/test_gated_deltanet.py / test_kda.py); not analysed further: the pre-session bound 5e-2 is kept for them
    bounds = {LINEAR[kind]: 5e-2} if dtype == torch.bfloat16 else None
    layers = check_every_layer(model, ids, dtype, bounds=bounds)
    assert [x.family for x in layers] == [LINEAR[kind], "softmax", "softmax"]
