"""Float32, HF's eager attention, ``use_cache=True``: the canonized logits are the model's, bit for bit, for every
family with a softmax-attention LRP form.

Why this case: with a cache HF attends over the cache's copies of K and V (contiguous after its ``torch.cat``),
and float32 matmul rounding depends on the memory layout, so a form attending over its own non-contiguous K / V
(views after ``transpose``) differs from HF by ~1e-6. SDPA (the default elsewhere in the tests) hides it; eager
shows it. Float64 hides it too (rounding far below the logits' differences), hence float32.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("zennit")
pytest.importorskip("transformers")

import test_lrp_falcon_zamba as falcon_zamba  # noqa: E402
import test_lrp_families as families  # noqa: E402
import test_lrp_hybrids as hybrids  # noqa: E402
import test_lrp_kimi as kimi  # noqa: E402
import test_lrp_mamba2_hybrids as mamba2_hybrids  # noqa: E402
import test_lrp_relatives as relatives  # noqa: E402
import test_lrp_xlstm_minimax as xlstm_minimax  # noqa: E402
from _lrp_checks import check_canonized_logits_identical, hf_forward, left_padded  # noqa: E402
from captum_implicit.lrp import GatedLinearComposite  # noqa: E402
from captum_implicit.lrp.common import memory_layout  # noqa: E402

F32 = dict(seed=1, dtype=torch.float32)
#: family -> (a float32 model with biases where it takes them, its vocabulary)
MODELS = {
    "jamba": lambda: hybrids.tiny_jamba(**F32, zero_biases=False, use_bias=True),
    "qwen3_next": lambda: hybrids.tiny_qwen3_next(**F32, zero_biases=False, use_bias=True),
    "lfm2": lambda: hybrids.tiny_lfm2(**F32, zero_biases=False, use_bias=True),
    "kimi_linear": lambda: kimi.tiny_kimi(**F32, q_rank=4, zero_biases=False, use_bias=True),
    "minimax": lambda: xlstm_minimax.tiny_minimax(**F32),
    "recurrent_gemma": lambda: families.tiny_rg(**F32, zero_biases=False),
    **{f: (lambda f=f: relatives.BUILD[f](**F32, zero_biases=False, use_bias=True))
       for f in ("qwen3_5", "qwen3_5_moe", "lfm2_moe", "lfm3", "bailing_hybrid", "lara_mini", "olmo_hybrid")},
    **{k: (lambda k=k: mamba2_hybrids.build(k, **F32, zero_biases=False))
       for k in ("bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2", "zamba2_adapters")},
    "zamba": lambda: falcon_zamba.build("zamba", **F32, zero_biases=False),
}
#: MLA: the cache holds one latent "head" (K and V are expanded from it by the form, as by HF)
MLA = {"kimi_linear", "bailing_hybrid"}
VOCABS = {**{k: mamba2_hybrids.VOCAB for k in ("bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2",
                                              "zamba2_adapters")}, "zamba": falcon_zamba.VOCAB}


def _eager_model(family: str) -> torch.nn.Module:
    """The family's float32 model with eager attention and several K/V heads: with one, the transposed K/V views
    (b, L, 1, d) -> (b, 1, L, d) lie in memory as the cache's copies do, and no form could differ."""
    model = MODELS[family]()
    cfg = model.config
    if getattr(cfg, "num_key_value_heads", None) == 1:
        cfg = copy.deepcopy(cfg)
        cfg.num_key_value_heads = cfg.num_attention_heads = 2
        torch.manual_seed(1)
        model = type(model)(cfg).to(torch.float32).eval()
        with torch.no_grad():  # spread the weights (HF's init gives nearly uniform attention)
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.5)
    assert model.config.num_key_value_heads >= 2 or family in MLA
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    return model


def _ids(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCABS.get(family, families.VOCAB), (2, 9), generator=torch.Generator().manual_seed(1))
    return ids, left_padded(2, 9, 3, row=1)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_eager_float32_cached_logits_identical(family):
    model = _eager_model(family)
    check_canonized_logits_identical(model, *_ids(family))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_eager_attention_gets_hf_layout(family, monkeypatch):
    """The mechanism, independent of whether the tiny sizes happen to round differently: with a cache, every eager
    attention call under the composite gets query, key and value in the memory layout (strides) HF's own forward
    gives it (for K and V: the cache's)."""
    model = _eager_model(family)
    ids, mask = _ids(family)
    calls = []
    # every modeling file's eager attention (a form may call a relative's, e.g. LFM2-MoE's LFM2's); each is looked
    # up at call time by HF's forwards and by the forms
    for hf in [m for n, m in list(sys.modules.items()) if n.startswith("transformers.models.")]:
        eager = getattr(hf, "eager_attention_forward", None)
        if eager is not None:
            def recording(module, query, key, value, *args, _eager=eager, **kwargs):
                calls.append(tuple(memory_layout(t) for t in (query, key, value)))
                return _eager(module, query, key, value, *args, **kwargs)

            monkeypatch.setattr(hf, "eager_attention_forward", recording)
    hf_forward(model, ids, attention_mask=mask, use_cache=True)
    plain, calls[:] = list(calls), []
    with GatedLinearComposite().context(model):
        model(ids, attention_mask=mask, use_cache=True)
    assert plain and calls == plain
