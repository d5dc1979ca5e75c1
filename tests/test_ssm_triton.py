"""The Triton kernel of the Mamba family (ops/ssm_triton.py) against the torch reference path.

Both compute the same matrix in float32; they differ only in rounding order (the kernel contracts the
state dimension in one IEEE float32 dot, the reference through float64 exponentials cast to float32),
so agreement is at float32 rounding: ≤ 1e-5 relative to the largest entry.

On the GPU machine the kernel runs compiled; on CPU (CI) one small case runs in Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess because the variable is read when kernels are defined).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, requires_cuda

import captum_implicit as ci
from captum_implicit.config import blockwise
from captum_implicit.layers.mamba import build_mamba_attention

REDUCTIONS = ["mean", "sum", "abs_mean", "positive_mean", "positive_sum", "max_abs"]
BOUND = 1e-5


def random_mamba_attention(
    device: str, *, batch=2, channels=6, length=150, state=5, taps=4, heads=1, skip=True, conv=True, gate=True,
    rate_scale=3.0, seed=0, spikes=(),
):
    """``spikes``: ``(batch row, channel, positions)`` where Δ jumps to 1000 (a spike, as trained models' Δ has):
    with small decay rates only the row blocks holding one fail the pivoted form's exponent bound."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    bc_shape = (batch, heads, state, length) if heads > 1 else (batch, state, length)
    dt = rnd(batch, channels, length)
    for row, channel, positions in spikes:
        dt[row, channel, positions] = 1000.0  # softplus(1000) = 1000
    return build_mamba_attention(
        "mixer",
        u=rnd(batch, channels, length),
        dt=dt,
        A=-(torch.rand(channels, state, generator=g) * rate_scale).to(device),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(channels) if skip else None,
        z=rnd(batch, channels, length) if gate else None,
        delta_bias=None,
        delta_softplus=True,
        conv_input=rnd(batch, channels, length) if conv else None,
        conv_weight=rnd(channels, taps) if conv else None,
        conv_bias=rnd(channels) if conv else None,
        torch_scan_casts=False,
        head_of=torch.randint(0, heads, (channels,), generator=g).to(device) if heads > 1 else None,
    )


def compare_with_reference(attn) -> None:
    """Kernel (default path) against the torch reference for dense and every reduction, ± gradient."""
    with blockwise(triton=False):
        ref_dense = attn.dense()
    assert rel_err(attn.dense(), ref_dense) <= BOUND
    grad = torch.randn(attn.values.shape, generator=torch.Generator().manual_seed(1)).to(attn.device)
    for reduce in REDUCTIONS:
        for g in (None, grad):
            with blockwise(triton=False):
                ref = attn.aggregate(reduce, grad=g)
            assert rel_err(attn.aggregate(reduce, grad=g), ref) <= BOUND, (reduce, g is not None)


#: one reduction per kernel mode (sum, abs, positive, max_abs)
MODE_REDUCTIONS = ["sum", "abs_mean", "positive_sum", "max_abs"]
#: opt-in far-tile variants (module constants of ops/ssm_triton.py) next to the shipped settings
FAR_VARIANTS = [
    dict(FAR_PRODUCT="fused"),
    dict(FAR_UNROLL=2),
    dict(FAR_PRODUCT="fused", FAR_UNROLL=2),
    dict(SEPARATE_FAR=True),
    dict(SEPARATE_FAR=False),  # the shipped default (None) splits the launches for the reductions only
    dict(SEPARATE_FAR=True, FAR_PRODUCT="fused", FAR_UNROLL=2),
]
#: variants that differ from the shipped kernel only on CUDA (the interpreter runs them as shipped)
GPU_ONLY_VARIANTS = [dict(OVERLAP_NEAR=True), dict(OVERLAP_NEAR=True, FAR_UNROLL=2)]
#: a variant against the shipped kernel: the same TF32 products, summed in another float32 order
VARIANT_BOUND = 1e-6


def kernel_outputs(attn, reductions=MODE_REDUCTIONS) -> dict:
    """Dense and one reduction per kernel mode with a gradient (λ, ρ ≠ 1), by whatever path is configured."""
    grad = torch.randn(attn.values.shape, generator=torch.Generator().manual_seed(1)).to(attn.device)
    out = {"dense": attn.dense()}
    for reduce in reductions:
        out[reduce] = attn.aggregate(reduce, grad=grad)
    return out


def compare_variant(got: dict, shipped: dict, ref: dict, exact: bool) -> None:
    """A far-tile variant against the shipped kernel (bit for bit where only the loop order changed) and
    against the torch reference."""
    for key in ref:
        if exact:
            assert torch.equal(got[key], shipped[key]), key
        assert rel_err(got[key], shipped[key]) <= VARIANT_BOUND, (key, rel_err(got[key], shipped[key]))
        assert rel_err(got[key], ref[key]) <= BOUND, (key, rel_err(got[key], ref[key]))


#: the factor kernel against the torch factors: the same float32 operations, exponentials apart
FACTOR_BOUND = 1e-6


def check_factor_kernel(attn, reductions=MODE_REDUCTIONS) -> int:
    """Run :func:`kernel_outputs` with every call of the factor kernel checked against the torch reference
    (``_factors``) on the same inputs: ``Q`` and ``K'`` (as is, or split into a TF32 high part and a
    rest) to float32 rounding. Returns the number of calls checked."""
    from captum_implicit.ops import ssm_triton

    kernel, calls = ssm_triton._kernel_factors, []

    def checked(ch, block, n_pad, split, *, head_of, **factors):
        q, k, kh, kl = kernel(ch, block, n_pad, split, head_of=head_of, **factors)
        ref_q, ref_k = ssm_triton._factors(ch, block, n_pad, head_of=head_of.long(), **factors)
        states = factors["rate"].shape[-1]
        assert rel_err(q, ref_q) <= FACTOR_BOUND, (rel_err(q, ref_q), ch)
        assert not q[..., states:].any()
        if split:  # only the parts are stored: the far tiles read nothing else
            assert k.numel() == 0
            assert not (kh.view(torch.int32) & 8191).any()  # TF32: the low 13 mantissa bits clear
            # the parts sum to the kernel's own unsplit K' within one float32 rounding, not always exactly: compiled,
            # the last multiply of K' (by ρ) can fuse into the subtraction that makes the rest (an FMA), which then
            # holds K' before its rounding (H200, session 6)
            whole = kernel(ch, block, n_pad, False, head_of=head_of, **factors)[1]
            assert ((kh + kl - whole).abs() <= whole.abs() * 2.0**-23).all()
            assert rel_err(whole, ref_k) <= FACTOR_BOUND and not whole[..., states:].any(), ch
        else:
            assert kh.numel() == kl.numel() == 0
            assert rel_err(k, ref_k) <= FACTOR_BOUND and not k[..., states:].any(), (rel_err(k, ref_k), ch)
        calls.append(ch)
        return q, k, kh, kl

    ssm_triton._kernel_factors = checked
    try:
        kernel_outputs(attn, reductions)
    finally:
        ssm_triton._kernel_factors = kernel
    assert calls
    return len(calls)


def emulate_tf32_in_interpreter() -> None:
    """Make the interpreter's ``tl.dot(..., input_precision="tf32")`` read its operands as TF32, as the tensor
    cores do (they ignore the low 13 mantissa bits of a float32 operand).

    The interpreter otherwise multiplies in float32, where the far tiles' three TF32 products would be exact
    whatever pairing of high and low parts they used; with truncated operands only a correct split recovers
    float32 accuracy.
    """
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    plain = InterpreterBuilder.create_dot

    def tf32(h):
        return TensorHandle((h.data.view(np.int32) & np.int32(-8192)).view(np.float32), h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32:
            a, b = tf32(a), tf32(b)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot


CASES = {
    "conv-skip-gate": {},
    "no-conv": dict(conv=False),
    "no-skip-no-gate": dict(skip=False, gate=False),
    "multi-head": dict(heads=3, length=70),
    "state16-long": dict(state=16, channels=3, length=600, batch=1),
    "one-token": dict(length=1),
    "two-taps": dict(taps=2, length=65),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_on_gpu(case):
    attn = random_mamba_attention("cuda", **CASES[case])
    compare_with_reference(attn)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("from_factors", [True, False])
@pytest.mark.parametrize("case", sorted(CASES) + ["spiky"])
def test_near_tile_forms_on_gpu(case, from_factors, monkeypatch):
    """The pivoted tiles next to the diagonal from the far tiles' factors plus their diagonal band
    (NEAR_FROM_FACTORS, the default since this passed on the GPU, session 8) or one product per tap; the spiky case
    mixes them with the per-entry form."""
    from captum_implicit.ops import ssm_triton

    monkeypatch.setattr(ssm_triton, "NEAR_FROM_FACTORS", from_factors)
    attn = spiky_attention("cuda", 600, 64) if case == "spiky" else random_mamba_attention("cuda", **CASES[case])
    compare_with_reference(attn)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("length", [150, 600])
def test_kernel_mixes_the_near_tile_forms_on_gpu(length, monkeypatch):
    """One (batch row, channel, row block) too fast for the pivoted form: with MIXED_NEAR_FORMS (the default since
    this passed on the GPU, session 7) that tile pair takes the per-entry form, the rest keep the pivoted one, in one
    launch (the flag table); equal to the reference."""
    from captum_implicit.ops import ssm_triton

    monkeypatch.setattr(ssm_triton, "MIXED_NEAR_FORMS", True)
    attn = spiky_attention("cuda", length, 64)
    assert ssm_triton._near_forms(attn.cum, attn.rate, 4, length)[1] == 2
    compare_with_reference(attn)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("block", [32, 16])
@pytest.mark.parametrize("wide", [128, 64])
def test_wide_far_tiles_on_gpu(wide, block, monkeypatch):
    """WIDE_FAR_BLOCK (128 by default) with near tiles that need 32 or 16: the reductions' far tiles in wide tiles,
    the rest in the small ones; against the kernel without wide tiles and the reference, in one channel chunk and
    in two."""
    from captum_implicit.ops import ssm_triton

    length = 400  # far 128-tiles: rows from 256 on
    attn = wide_far_case("cuda", length, block, channels=3)
    with blockwise(triton=False):
        ref = kernel_outputs(attn)
    monkeypatch.setattr(ssm_triton, "WIDE_FAR_BLOCK", None)
    shipped = kernel_outputs(attn)
    monkeypatch.setattr(ssm_triton, "WIDE_FAR_BLOCK", wide)
    assert wide in {size for _, _, size in ssm_triton._launch_plan(length, block, 4, False, True, attn.device)}
    for elements in (1 << 28, 2 * attn.batch_size * length * 16):
        monkeypatch.setattr(ssm_triton, "FACTOR_ELEMENTS", elements)
        compare_variant(kernel_outputs(attn), shipped, ref, exact=False)


#: one TF32 product per tile (``precision="tf32"``): operands keep 10 mantissa bits. Triton's interpreter with
#: truncated operands (emulate_tf32_in_interpreter): up to 7.2e-4 relative on these 2–3-channel layers
TF32_BOUND = 2e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", ["conv-skip-gate", "state16-long"])
def test_tf32_precision_on_gpu(case):
    """``blockwise(precision="tf32")``: within TF32's accuracy of the reference, and not the float32 kernel."""
    attn = random_mamba_attention("cuda", **CASES[case])
    with blockwise(triton=False):
        ref = kernel_outputs(attn)
    with blockwise(precision="tf32"):
        got = kernel_outputs(attn)
    for key in ref:
        assert rel_err(got[key], ref[key]) <= TF32_BOUND, (key, rel_err(got[key], ref[key]))
    assert rel_err(got["dense"], ref["dense"]) > 1e-6  # the switch took effect


@pytest.mark.gpu
@requires_cuda
def test_dense_output_past_2_to_the_31_entries_on_gpu():
    """A dense ``(b, C, L, L)`` output of more than 2^31 entries (520 channels at L = 2048: 2.2e9, 8.7 GB): 32-bit
    offsets wrapped there and the kernel wrote out of bounds (H200, session 6: an illegal memory access in
    ``dense()`` of a 1536-channel layer at L = 2048). The last channels, whose offsets pass 2^31, against the torch
    path, which builds the channels asked for."""
    attn = random_mamba_attention("cuda", batch=1, channels=520, length=2048, state=4)
    dense = attn.dense()
    assert dense.numel() > 2**31
    tail = [0, 511, 519]
    with blockwise(triton=False):
        ref = attn.dense(channels=tail)
    assert rel_err(dense[:, tail], ref) <= BOUND


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", sorted(CASES))
def test_factor_kernel_matches_torch_factors_on_gpu(case, monkeypatch):
    """The factor kernel (compiled: its exponentials are the GPU's) against the torch factors, call by call, and
    the kernel's results with either."""
    from captum_implicit.ops import ssm_triton

    attn = random_mamba_attention("cuda", **CASES[case])
    monkeypatch.setattr(ssm_triton, "FACTOR_ELEMENTS", attn.batch_size * attn.seq_len * 16 * 2)  # 2 channels a call
    assert check_factor_kernel(attn) >= 2 * (1 + len(MODE_REDUCTIONS))
    with blockwise(precision="tf32"):  # K' as is, unsplit
        check_factor_kernel(attn, ["positive_sum"])
    fast = kernel_outputs(attn)
    monkeypatch.setattr(ssm_triton, "FACTOR_KERNEL", False)
    for key, value in kernel_outputs(attn).items():
        assert rel_err(fast[key], value) <= VARIANT_BOUND, key


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rate_scale", [3.0, 1e4], ids=["moderate", "huge"])
def test_kernel_per_entry_form_next_to_the_diagonal(rate_scale, monkeypatch):
    """Decays so fast that e^{|a|·Δ} overflows float32 within one token: the tiles next to the diagonal take
    the per-entry form (forced for moderate decays too), and the result still equals the reference. Every mode
    with moderate decays; with huge ones dense and Ā (the same code with other numbers: each mode is one more
    compile of the per-entry kernel per launch, minutes on a fresh machine)."""
    from captum_implicit.ops import ssm_triton

    monkeypatch.setattr(ssm_triton, "FORCE_NEAR_EXACT", True)
    attn = random_mamba_attention("cuda", rate_scale=rate_scale, length=150)
    if rate_scale < 100:
        compare_with_reference(attn)
        return
    assert ssm_triton._block_for(attn.cum, attn.rate, 4, 150) is None  # the per-entry form without forcing
    with blockwise(triton=False):
        ref = kernel_outputs(attn, ["positive_sum"])
    for key, got in kernel_outputs(attn, ["positive_sum"]).items():
        assert rel_err(got, ref[key]) <= BOUND, key


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", FAR_VARIANTS + GPU_ONLY_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("case", ["conv-skip-gate", "multi-head", "state16-long"])
def test_far_tile_variants_on_gpu(case, variant, monkeypatch):
    """The opt-in far-tile variants (benchmarks/sweep_kernel.py) agree with the shipped kernel and the reference
    (OVERLAP_NEAR: across channel chunks too, where each chunk's tiles accumulate onto the last chunk's)."""
    from captum_implicit.ops import ssm_triton

    attn = random_mamba_attention("cuda", **{**CASES[case], "channels": 3})
    with blockwise(triton=False):
        ref = kernel_outputs(attn)
    shipped = kernel_outputs(attn)
    for key, value in variant.items():
        monkeypatch.setattr(ssm_triton, key, value)
    fused = variant.get("FAR_PRODUCT") == "fused"
    if fused and variant.get("FAR_UNROLL") == 2:  # two fused products of a 128-tile need 377 KB of shared memory
        monkeypatch.setattr(ssm_triton, "WIDE_FAR_BLOCK", 64)  # (H200: 227 KB), so this sweep variant takes 64
    per_channel = attn.batch_size * attn.seq_len * 16 * (4 if fused else 1)  # n_pad = 16
    # as shipped (reductions: one channel per program, dense: 3, a pair and the odd one); then one program per
    # tile for the reductions too; then also 2 channels in a first launch, the third alone in a second
    for setting in ({}, {"PROGRAMS": 1}, {"FACTOR_ELEMENTS": 2 * per_channel}):
        for key, value in setting.items():
            monkeypatch.setattr(ssm_triton, key, value)
        compare_variant(kernel_outputs(attn), shipped, ref, exact=False)


@pytest.mark.gpu
@requires_cuda
def test_attn_grad_same_with_and_without_kernel_on_hf_mamba():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=64, state_size=16, num_hidden_layers=3, vocab_size=128)
    model = tf.MambaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    explainer = ci.ImplicitAttnGrad(model)
    fast = explainer.attribute(ids, target=5, additional_forward_args=(mask,))
    with blockwise(triton=False):
        slow = explainer.attribute(ids, target=5, additional_forward_args=(mask,))
    assert rel_err(fast, slow) <= BOUND


def spiky_attention(device: str, length: int, block: int):
    """Δ spikes in one row block of one channel of the second batch row: only that (row, channel, block) fails the
    pivoted form's bound, at every block size (with MIXED_NEAR_FORMS the kernel runs both forms in one launch)."""
    from captum_implicit.ops import ssm_triton

    spike = slice(block + block // 2, block + block // 2 + 4)  # inside row block 1, clear of block 0's conv halo
    attn = random_mamba_attention(device, channels=3, length=length, state=3, rate_scale=0.1, spikes=[(1, 2, spike)])
    assert ssm_triton._block_for(attn.cum, attn.rate, 4, length) is None
    exact = ssm_triton._block_exponents(attn.cum, attn.rate, 4, length, block) >= ssm_triton.MAX_EXPONENT
    assert exact.sum() == 1 and exact[1, 2, 1], exact
    return attn


def test_mixed_forms_take_their_own_block(monkeypatch):
    """Where no candidate block passes the pivoted form's bound, the mixed forms run at MIXED_BLOCK (32: at 64 the
    launch holding both forms spills, session 9), not at BLOCK: the table of row blocks taking the per-entry form is
    the one at that block, and BLOCK caps it."""
    from captum_implicit.ops import ssm_triton

    attn = spiky_attention("cpu", 150, 32)  # the spike fails exactly one row block at 32
    block, form, table = ssm_triton._near_forms(attn.cum, attn.rate, 4, 150)
    assert (block, form) == (32, 2) and table.shape == (2, 3, 5) and table.sum() == 1 and table[1, 2, 1] == 1
    monkeypatch.setattr(ssm_triton, "MIXED_BLOCK", 64)
    block, form, table = ssm_triton._near_forms(attn.cum, attn.rate, 4, 150)
    assert (block, form) == (64, 2) and table.shape == (2, 3, 3) and table.sum() >= 1
    monkeypatch.setattr(ssm_triton, "BLOCK", 16)
    assert ssm_triton._near_forms(attn.cum, attn.rate, 4, 150)[:2] == (16, 2)


def wide_far_case(device: str, length: int, block: int, **kw):
    """A layer whose tiles next to the diagonal need ``block`` (the pivoted form's bound fails at the sizes above
    it), so that WIDE_FAR_BLOCK can put the far tiles at a larger one: the smallest decay rates that do."""
    from captum_implicit.ops import ssm_triton

    for rate_scale in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
        attn = random_mamba_attention(device, length=length, rate_scale=rate_scale, **kw)
        if ssm_triton._block_for(attn.cum, attn.rate, 4, length) == block:
            return attn
    raise AssertionError(f"no rate scale makes the near tiles take block {block}")


def test_precision_switch():
    """``blockwise(precision="tf32")`` picks the one-TF32-product variant for its block only; unknown names raise."""
    from captum_implicit.ops import ssm_triton

    default = ssm_triton._products()
    assert default == (ssm_triton.PRODUCT, ssm_triton.FAR_PRODUCT) == ("tf32x3", "split")
    with blockwise(precision="tf32"):
        assert ssm_triton._products() == ("tf32", "register")
    assert ssm_triton._products() == default
    with pytest.raises(ValueError, match="precision='fp16'"):
        with blockwise(precision="fp16"):
            pass


@pytest.mark.parametrize("dense", [False, True])
def test_launch_plan_covers_each_tile_once(dense):
    """Every output tile in exactly one launch, far tiles of the reductions at WIDE_FAR_BLOCK over near tiles at 16
    (an uneven length, conv halo of 3); dense() keeps one block size (it is bound by writing its output)."""
    from captum_implicit.ops import ssm_triton

    length, block, taps = 300, 16, 4
    plan = ssm_triton._launch_plan(length, block, taps, dense, True, torch.device("cpu"))
    covered = torch.zeros(length, length, dtype=torch.int32)
    for _, tiles, size in plan:
        for row, col in tiles.tolist():
            covered[row * size:(row + 1) * size, col * size:(col + 1) * size] += 1
    position = torch.arange(length)
    # dense writes every tile (zeros above the diagonal); the reductions walk the block-lower triangle
    wanted = torch.ones_like(covered) if dense else (position[None, :] // block <= position[:, None] // block).int()
    assert torch.equal(covered, wanted)
    sizes = {size for _, _, size in plan}
    assert sizes == ({block} if dense else {block, ssm_triton.WIDE_FAR_BLOCK})


def _interpreter_case():
    """Emulated TF32, 16-token tiles (far tiles exist), 3 channels, and the kernel module."""
    from captum_implicit.ops import ssm_triton

    emulate_tf32_in_interpreter()
    ssm_triton.BLOCK = 16
    return ssm_triton, random_mamba_attention("cpu", channels=3, length=40, state=3, batch=1)


def interpreter_checks() -> None:
    """The checks of :func:`test_kernel_logic_in_triton_interpreter`, run in a ``TRITON_INTERPRET=1`` process."""
    ssm_triton, attn = _interpreter_case()
    compare_with_reference(attn)  # several channels per program (dense and reductions)
    ssm_triton.FACTOR_ROWS = 16  # three programs along the 40 positions, the last one partial
    for case in (attn, random_mamba_attention("cpu", channels=3, length=40, state=3, heads=2, conv=False, gate=False)):
        check_factor_kernel(case)
    with blockwise(precision="tf32"):  # one product from registers: K' as is, no split
        check_factor_kernel(attn, ["positive_sum"])
    ssm_triton.FACTOR_KERNEL = False  # the torch factors in the kernel's place: the same results
    compare_with_reference(attn)
    ssm_triton.FACTOR_KERNEL = True
    # the emulation is live: one TF32 product misses float32 accuracy by far
    with blockwise(triton=False):
        ref_dense = attn.dense()
    ssm_triton.FAR_PRODUCT, ssm_triton.PRODUCT = "register", "tf32"
    one_tf32 = attn.dense()
    assert rel_err(one_tf32, ref_dense) > 1e-4
    ssm_triton.PRODUCT = "tf32x3"
    compare_with_reference(attn)
    ssm_triton.FAR_PRODUCT = "split"
    with blockwise(precision="tf32"):  # the user's switch to that variant
        assert torch.equal(attn.dense(), one_tf32)
    ssm_triton.FACTOR_ELEMENTS = 40 * 16  # one channel per launch
    compare_with_reference(attn)
    huge = random_mamba_attention("cpu", channels=2, length=40, state=3, batch=1, rate_scale=1e4)
    assert ssm_triton._near_forms(huge.cum, huge.rate, 4, 40)[1] == 1  # the per-entry form everywhere
    compare_with_reference(huge)
    mixed = spiky_attention("cpu", length=40, block=16)
    assert ssm_triton._near_forms(mixed.cum, mixed.rate, 4, 40)[1] == 2  # per row, channel and row block
    compare_with_reference(mixed)
    ssm_triton.MIXED_NEAR_FORMS = False
    assert ssm_triton._near_forms(mixed.cum, mixed.rate, 4, 40)[1] == 1  # the per-entry form everywhere
    compare_with_reference(mixed)
    ssm_triton.MIXED_NEAR_FORMS = True


def interpreter_near_form_checks() -> None:
    """The checks of :func:`test_near_tile_forms_in_triton_interpreter` (``TRITON_INTERPRET=1`` process): the
    tiles next to the diagonal from the far tiles' factors plus their diagonal band (NEAR_FROM_FACTORS, the default)
    against the reference, with and without conv, skip, gate and heads, with two taps, with the per-entry form in
    some row blocks, and over the far tiles' product variants (split, fused, from registers); then one product per
    tap (the opt-in form)."""
    ssm_triton, attn = _interpreter_case()
    ssm_triton.NEAR_FROM_FACTORS = False
    compare_with_reference(attn)
    ssm_triton.NEAR_FROM_FACTORS = True
    compare_with_reference(attn)
    for kw in (dict(conv=False), dict(skip=False, gate=False), dict(heads=2), dict(taps=2, length=33)):
        compare_with_reference(random_mamba_attention("cpu", channels=3, length=kw.pop("length", 40), state=3, **kw))
    mixed = spiky_attention("cpu", length=40, block=16)
    assert ssm_triton._near_forms(mixed.cum, mixed.rate, 4, 40)[1] == 2
    compare_with_reference(mixed)
    ssm_triton.FAR_PRODUCT = "fused"
    compare_with_reference(attn)
    ssm_triton.FAR_PRODUCT, ssm_triton.PRODUCT = "register", "ieee"
    compare_with_reference(attn)


def interpreter_variant_checks() -> None:
    """The checks of :func:`test_far_tile_variants_in_triton_interpreter` (``TRITON_INTERPRET=1`` process): the
    3 channels in one program (a pair, then the odd one), then 2 + 1 over two launches; bit for bit where the
    products are the shipped ones (only the loop or the launches differ). Then far tiles wider than the near ones
    (WIDE_FAR_BLOCK), and the per-entry form."""
    ssm_triton, attn = _interpreter_case()
    with blockwise(triton=False):
        ref = kernel_outputs(attn)
    shipped = kernel_outputs(attn)
    shipped_settings = {key: getattr(ssm_triton, key) for key in ("FAR_PRODUCT", "FAR_UNROLL", "SEPARATE_FAR")}
    for variant in FAR_VARIANTS:
        for key, value in {**shipped_settings, **variant}.items():
            setattr(ssm_triton, key, value)
        fused = variant.get("FAR_PRODUCT") == "fused"
        for elements in (1 << 28, 2 * 40 * 16 * (4 if fused else 1)):
            ssm_triton.FACTOR_ELEMENTS = elements
            compare_variant(kernel_outputs(attn), shipped, ref, exact=not fused)
    # far tiles at 32 over the near tiles' 16 (three launches: wide far, far, near), in one channel chunk and in two
    for key, value in shipped_settings.items():
        setattr(ssm_triton, key, value)
    wide = wide_far_case("cpu", 100, 16, channels=3, state=3, batch=1)
    with blockwise(triton=False):
        ref = kernel_outputs(wide)
    default_wide, ssm_triton.WIDE_FAR_BLOCK = ssm_triton.WIDE_FAR_BLOCK, None
    shipped = kernel_outputs(wide)
    ssm_triton.WIDE_FAR_BLOCK = 32
    for elements in (1 << 28, 2 * 100 * 16):
        ssm_triton.FACTOR_ELEMENTS = elements
        compare_variant(kernel_outputs(wide), shipped, ref, exact=False)
    ssm_triton.WIDE_FAR_BLOCK, ssm_triton.FACTOR_ELEMENTS = default_wide, 1 << 28
    # decays too fast for the pivoted near tiles: the per-entry form in the launch of the other tiles
    # (slow in the interpreter: dense and Ā only)
    huge = random_mamba_attention("cpu", channels=2, length=40, state=3, batch=1, rate_scale=1e4)
    with blockwise(triton=False):
        ref = kernel_outputs(huge, ["positive_sum"])
    for key, value in shipped_settings.items():
        setattr(ssm_triton, key, value)
    shipped = kernel_outputs(huge, ["positive_sum"])
    for key, value in FAR_VARIANTS[-1].items():
        setattr(ssm_triton, key, value)
    compare_variant(kernel_outputs(huge, ["positive_sum"]), shipped, ref, exact=False)


def _run_in_interpreter(checks: str) -> None:
    code = f"import sys; sys.path.insert(0, 'tests'); import test_ssm_triton as t; t.{checks}(); print('ok')"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_kernel_logic_in_triton_interpreter():
    """CI has no GPU: run small cases of the kernel in Triton's CPU interpreter (TF32 products emulated)."""
    pytest.importorskip("triton")
    _run_in_interpreter("interpreter_checks")


def test_near_tile_forms_in_triton_interpreter():
    """Both pivoted forms of the tiles next to the diagonal (NEAR_FROM_FACTORS) in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    _run_in_interpreter("interpreter_near_form_checks")


def test_far_tile_variants_in_triton_interpreter():
    """The opt-in far-tile variants (benchmarks/sweep_kernel.py) in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    _run_in_interpreter("interpreter_variant_checks")


@pytest.mark.gpu
@requires_cuda
def test_near_statistics_started_at_capture_on_gpu(monkeypatch):
    """A captured layer starts the statistics the kernel reads back (so that its call does not wait for the GPU's
    queue): the same choice of block and forms as computed at the call, and recomputed if BLOCK or MIXED_BLOCK
    changed since."""
    from captum_implicit.ops import ssm_triton

    length = 150
    attn = spiky_attention("cuda", length, 64)
    ahead = attn._near_statistics
    assert ahead is not None and ahead.values.is_pinned()
    fresh = ssm_triton._near_forms(attn.cum, attn.rate, 4, length)
    early = ssm_triton._near_forms(attn.cum, attn.rate, 4, length, ahead)
    assert early[:2] == fresh[:2] == (ssm_triton.MIXED_BLOCK, 2) and torch.equal(early[2], fresh[2])
    monkeypatch.setattr(ssm_triton, "MIXED_BLOCK", 16)
    assert ssm_triton._near_forms(attn.cum, attn.rate, 4, length, ahead)[0] == 16  # not the stale block 32
    compare_with_reference(attn)
