"""LRP forms of HF transformers' xLSTM (mLSTM blocks, ``xLSTMForCausalLM``; transformers' own classes).

Rules:

* ``xLSTMLayer`` (mLSTM): queries, keys, the (soft-capped) input and forget gate pre-activations
  are held constant (``rules.detach_ssm``). With them fixed the exponential input gate, the
  log-sigmoid forget gate, the stabiliser ``m_t`` and the normaliser
  ``max(|n_t·q_t|, exp(−m_t)) + ε`` are constants, and ``h = A v`` with
  ``A[t, s] = exp(F_t − F_s + i_s − m_t)(q_t·k_s/√d) / (max(|Σ_s …|, e^{−m_t}) + ε)`` is linear
  in v (the q·k products are held like attention probabilities). HF keeps the mLSTM states in
  float32 (``inference_state_dtype``) even in a float64 model: the value is HF's own backend
  call, the relevance the parallel form above in float64, joined by
  :func:`~captum_implicit.lrp.common.exact_region`. The output gate ``σ(o) ⊙ norm(h)``: half
  rule (both factors depend on the input, as every other output gate here), identity rule on
  the sigmoid;
* ``xLSTMMultiHeadLayerNorm``: per-head LN rule (centering is linear, 1/std held), float32
  reduction made exact; its weight and bias applied after, as HF does;
* ``xLSTMRMSNorm``: ``x · rsqrt(mean x² + ε)`` (float32 reduction made exact), scale held, then
  weight and bias;
* ``xLSTMFeedForward``: ``SiLU(gate) ⊙ up`` (single or fused weights): half rule, identity on SiLU;
* ``xLSTMForCausalLM``: HF casts the logits to float32 (``.float()``; rounding absorbed,
  ``rules.exact_casts``) and soft-caps them, ``c·tanh(z/c)``: identity rule, so the relevance
  sums to the capped float32 logit the model returns.

The residual adds of ``xLSTMBlock`` conserve under gradient×input as they are. A call that
continues from a non-zero cached state is refused (:class:`LRPError`), as is HF's chunked
no-grad inference path (``max_inference_chunksize`` shorter than the input).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, cast, continuation_refused, exact_region, half_rule, hold
from .primitives import identity_rule

_HF = "transformers.models.xlstm.modeling_xlstm"


def mlstm_parallel(
    query: Tensor, key: Tensor, value: Tensor, igate: Tensor, fgate: Tensor, eps: float, compute_dtype: torch.dtype
) -> Tensor:
    """The mLSTM from a zero state in its parallel (quadratic) form, in ``compute_dtype``.

    Parameters
    ----------
    query, key : (b, H, L, dqk)
    value : (b, H, L, dv)
    igate, fgate : (b, H, L)  input and forget gate pre-activations (after HF's soft cap)
    eps : float  HF's ``config.eps`` added to the normaliser

    Returns
    -------
    (b, H, L, dv) in ``value.dtype``; linear in ``value`` (the other inputs enter as coefficients).
    The stabiliser ``m_t = max(F_t, max_{s≤t} F_t − F_s + i_s)`` is the recurrence's own
    ``m_t = max(logσ(f_t) + m_{t−1}, i_t)``, ``m_0 = 0``, unrolled.
    """
    q, k, v, i, f = (x.to(compute_dtype) for x in (query, key, value, igate, fgate))
    length = v.shape[-2]
    cum = F.logsigmoid(f).cumsum(-1)  # F_t
    log_d = cum[..., :, None] - cum[..., None, :] + i[..., None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=v.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = torch.maximum(cum, log_d.amax(-1))  # (b, H, L)
    weights = torch.exp(log_d - m[..., None]) * (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    den = torch.maximum(weights.sum(-1).abs(), torch.exp(-m)) + eps
    return ((weights / den[..., None]) @ v).to(value.dtype)


def _state_is_empty(state: Any) -> bool:
    return state is None or all(not bool(torch.any(s != 0)) for s in state)


def xlstm_layer_lrp(
    module: nn.Module, rules: GatedLinearRules, x: Tensor, state: Any = None
) -> tuple[Tensor, Any]:
    """LRP form of ``xLSTMLayer.forward``; (b, L, H) -> ((b, L, H), final state)."""
    from transformers.models.xlstm.modeling_xlstm import soft_cap

    if not _state_is_empty(state):
        raise continuation_refused("xLSTMLayer")
    config = module.config
    batch, seq_len, _ = x.shape
    if config.weight_mode == "single":
        query, key, value = module.q(x), module.k(x), module.v(x)
        o_preact = module.ogate_preact(x)
        i_preact = soft_cap(module.igate_preact(x), cap_value=config.gate_soft_cap)
        f_preact = soft_cap(module.fgate_preact(x), cap_value=config.gate_soft_cap)
    else:
        query, key, value, o_preact = torch.tensor_split(
            module.qkv_opreact(x), (module.qk_dim, 2 * module.qk_dim, 2 * module.qk_dim + module.v_dim), dim=-1
        )
        if_preact = soft_cap(module.ifgate_preact(x), cap_value=config.gate_soft_cap)
        i_preact, f_preact = torch.tensor_split(if_preact, (config.num_heads,), dim=-1)
    query, key, value = (t.reshape(batch, seq_len, config.num_heads, -1).transpose(1, 2) for t in (query, key, value))
    # q, k and both gates are functions of the input held constant: exp/σ gates, stabiliser, normaliser constant
    query, key = hold(query, rules.detach_ssm), hold(key, rules.detach_ssm)
    i_preact = hold(i_preact.transpose(1, 2), rules.detach_ssm)
    f_preact = hold(f_preact.transpose(1, 2), rules.detach_ssm)
    c0, n0, m0 = (None, None, None) if state is None else state
    final: list[Any] = []

    def region(compute_dtype: torch.dtype) -> Tensor:
        if compute_dtype == torch.float32:  # HF's backend (float32 states): the model's value
            out = module.mlstm_backend(query=query, key=key, value=value, igate=i_preact, fgate=f_preact,
                                       c_initial=c0, n_initial=n0, m_initial=m0)
            h, new_state = out if isinstance(out, tuple) else (out, None)  # train mode may return h alone
            final.append(new_state)
            return h
        return mlstm_parallel(query, key, value, i_preact, f_preact, float(config.eps), compute_dtype)

    h = exact_region(region, value.dtype, torch.float32, rules)
    h = module.multihead_norm(h.transpose(1, 2)).reshape(batch, seq_len, -1)
    out = act(module.ogate_act_fn, o_preact, rules) * h
    out = half_rule(out, rules)
    return module.out_proj(out), (final[0] if final else None)


def _normalize_region(
    module: nn.Module, rules: GatedLinearRules, x: Tensor, centre: bool
) -> Tensor:
    """HF's ``_layer_normalize`` / ``_rms_normalize`` with the scale held; float32 reduction made exact."""
    def region(compute_dtype: torch.dtype) -> Tensor:
        h = x.to(compute_dtype)
        if centre:
            scale = torch.rsqrt(h.var(dim=-1, keepdim=True, unbiased=False) + module.eps)
            return ((h - h.mean(dim=-1, keepdim=True)) * hold(scale, rules.detach_norm)).to(x.dtype)
        return (h * hold(torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + module.eps), rules.detach_norm)).to(x.dtype)

    narrow = torch.float32 if module.force_float32_reductions else x.dtype
    return exact_region(region, x.dtype, narrow, rules)


def xlstm_multihead_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``xLSTMMultiHeadLayerNorm.forward``; (b, L, nh, dh) -> (b, L, nh·dh)."""
    batch, seq_len, nh, dh = x.shape
    if nh != module.num_heads or dh != module.head_dim:
        raise ValueError(f"Expected {module.num_heads} heads of {module.head_dim}, input shape: {x.shape}")
    return module._apply_weight_bias(_normalize_region(module, rules, x, centre=True).reshape(batch, seq_len, -1))


def xlstm_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``xLSTMRMSNorm.forward``: scale held, then weight and bias."""
    return module._apply_weight_bias(_normalize_region(module, rules, x, centre=False))


def xlstm_ffn_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``xLSTMFeedForward.forward``: ``proj_down(SiLU(gate) ⊙ up)``."""
    if module.config.weight_mode == "single":
        gate, up = module.proj_up_gate(x), module.proj_up(x)
    else:
        gate, up = torch.tensor_split(module.proj_up_gate_z(x), (module.up_proj_dim,), dim=-1)
    h = act(module.act_fn, gate, rules) * up
    h = half_rule(h, rules)
    return module.proj_down(h)


def xlstm_causal_lm_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    cache: Any = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs: Any,
) -> Any:
    """LRP form of ``xLSTMForCausalLM.forward``: exact float32 cast and identity rule on the logit soft cap."""
    from transformers.models.xlstm.modeling_xlstm import soft_cap, xLSTMCausalLMOutput

    if cache is None:
        cache = kwargs.pop("cache_params", None)
    return_dict = kwargs.pop("return_dict", None)
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    if not module.training and module.config.max_inference_chunksize < length and torch.is_grad_enabled():
        raise LRPError(
            f"xLSTMForCausalLM: {length} tokens exceed config.max_inference_chunksize "
            f"({module.config.max_inference_chunksize}), where HF runs the blocks without gradients; raise it."
        )
    outputs = module.backbone(input_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    logits = module.lm_head(outputs[0].to(module.lm_head.weight.dtype))
    cap = module.config.output_logit_soft_cap
    if cap is not None and rules.identity_act:
        # identity rule on the elementwise z ↦ c·tanh(fl32(z)/c) as one map: the ratio is taken in the model's
        # dtype (a ratio in float32, after HF's .float(), would round the relevance)
        logits = identity_rule(lambda z: soft_cap(z.float(), cap), logits, rules.act_stabilizer)
    else:
        logits = soft_cap(cast(logits, torch.float32, rules), cap)  # HF's .float(), then the cap
    loss = None
    if labels is not None:
        loss = module.loss_function(logits=logits, labels=labels, vocab_size=module.config.vocab_size, **kwargs)
    result = xLSTMCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
    return result.to_tuple() if return_dict is False else result


for _cls, _fwd, _note in [
    ("xLSTMLayer", xlstm_layer_lrp,
     "q, k, exp input / σ forget gates, stabiliser and normaliser held: linear in v; float32 states made exact; "
     "half rule on σ(o) ⊙ norm(h), identity on σ"),
    ("xLSTMMultiHeadLayerNorm", xlstm_multihead_norm_lrp, "per-head LN rule (1/std held), float32 made exact"),
    ("xLSTMRMSNorm", xlstm_rms_norm_lrp, "scale held (LN rule), float32 reduction made exact"),
    ("xLSTMFeedForward", xlstm_ffn_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("xLSTMForCausalLM", xlstm_causal_lm_lrp, "float32 logit cast made exact; identity rule on the soft cap"),
]:
    register_lrp_form(LRPForm(family="xlstm", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)
