"""Helpers shared by the LRP forms of every family: rule switches, masks and exact float32 regions.

Every form recomputes its module's forward with the module's own torch operations, so the
forward value is the module's (bit for bit on CPU). Where a float64 model computes a region
in float32 (HF's Mamba2 SSD scan and gated norm, RecurrentGemma's RG-LRU accumulation and
RMSNorm), :func:`exact_region` runs the region twice: once as the model does (the value)
and once in the model's dtype with the LRP rules (the relevance path), joined by
:func:`~captum_implicit.lrp.primitives.proportional`. The float32 rounding of the region
is then absorbed into the gradient and conservation holds to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.capture import torch_fallback_of
from .canonizers import GatedLinearRules, LRPError
from .primitives import cast_rule, identity_rule, proportional, round_rule, stop_gradient, uniform_rule


def cast(x: Tensor, dtype: torch.dtype, rules: GatedLinearRules) -> Tensor:
    """``x.to(dtype)``; its rounding absorbed into the gradient when ``rules.exact_casts``."""
    return cast_rule(x, dtype) if rules.exact_casts else x.to(dtype)


def round_to(x: Tensor, dtype: torch.dtype, rules: GatedLinearRules) -> Tensor:
    """A cast whose result the next operation promotes back to ``x.dtype`` (see :func:`round_rule`)."""
    return round_rule(x, dtype) if rules.exact_casts else x.to(dtype)


def act(fn: Any, x: Tensor, rules: GatedLinearRules) -> Tensor:
    """Elementwise activation under the identity rule (``rules.identity_act``)."""
    return identity_rule(fn, x, rules.act_stabilizer) if rules.identity_act else fn(x)


def hold(x: Tensor, flag: bool) -> Tensor:
    """Stop-gradient on ``x`` when the rule ``flag`` is on (a data-dependent coefficient)."""
    return stop_gradient(x) if flag else x


def fill_cache_first_call(
    module: Any, cache: Any, key: Tensor, value: Tensor, kwargs: dict, layer_idx: int | None = None,
    what: str = "key",
) -> tuple[Tensor, Tensor]:
    """Fill an attention layer's cache as HF does on a first call; return ``(key, value)`` in the cache's layout.

    HF attends over the tensors its ``cache.update`` returns: copies, contiguous after the cache's ``torch.cat``,
    where the form's own ``key`` / ``value`` are views after a ``transpose``. Float32 matmul rounds differently by
    memory layout, so a form attending over its own views differs from HF by ~1e-6 (eager attention, float32,
    ``use_cache=True``). The returned tensors carry the form's graph (the cache gets them detached) and the
    cache's strides. A call continuing from a cached state is refused.

    Parameters
    ----------
    module : nn.Module
        The attention module (its class name and ``layer_idx`` name the layer in errors).
    cache : transformers Cache
        The cache passed to the module (not None).
    key, value : Tensor
        What the module stores: (b, heads, L, d) keys and values; MLA latents for Kimi / Bailing (``what``).
    kwargs : dict
        The module's keyword arguments (``cache.update`` reads e.g. ``cache_position`` from them).
    layer_idx : int, optional
        The cache's layer index (default: ``module.layer_idx``).
    """
    name = type(module).__name__
    idx = module.layer_idx if layer_idx is None else layer_idx
    if cache.get_seq_length(idx) > 0:
        raise continuation_refused(f"{name} layer {idx}")
    cached_key, cached_value = cache.update(key.detach(), value.detach(), idx, kwargs=kwargs)
    if cached_key.shape != key.shape:
        raise LRPError(f"{name}: the cache changed the {what} length on a first call")
    return _layout_like(key, cached_key), _layout_like(value, cached_value)


def held_softmax_attention(
    module: Any, rules: GatedLinearRules, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    cache: Any, kwargs: dict, eager: Callable, layer_idx: int | None = None, **extra: Any,
) -> tuple[Tensor, Tensor | None]:
    """HF's attention call with the softmax probabilities held: linear in ``value``.

    ``query`` / ``key`` (after rotary) are held under ``rules.detach_softmax``; with a cache, K/V are stored and
    taken back in the cache's layout (:func:`fill_cache_first_call`); then the module's configured attention
    function runs (``eager`` when it is eager), with the module's dropout and scaling unless ``extra`` sets them.
    Returns ``(out, weights)`` as the attention function does.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    query, key = hold(query, rules.detach_softmax), hold(key, rules.detach_softmax)
    if cache is not None:  # HF attends over the cache's copies: same layout, same float32 rounding
        key, value = fill_cache_first_call(module, cache, key, value, kwargs, layer_idx=layer_idx)
    extra.setdefault("dropout", 0.0 if not module.training else module.attention_dropout)
    extra.setdefault("scaling", module.scaling)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    return interface(module, query, key, value, attention_mask, **extra, **kwargs)


def _layout_like(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` (same shape and values as ``ref``) in ``ref``'s memory layout; differentiable (a copy where needed)."""
    if memory_layout(x) == memory_layout(ref):
        return x
    if ref.is_contiguous():
        return x.contiguous()
    return torch.empty_strided(ref.shape, ref.stride(), dtype=x.dtype, device=x.device).copy_(x)


def memory_layout(x: Tensor) -> tuple[int, ...]:
    """The strides that matter: a dimension of size 1 is never stepped over, whatever its stride."""
    return tuple(st if n > 1 else 0 for n, st in zip(x.shape, x.stride()))


def continuation_refused(where: str, how: str = "use_cache=False") -> LRPError:
    """The error for a call that continues from a cached state (``where``: e.g. "Mamba layer 3"; ``how``: the
    argument that runs a whole sequence instead). The forms explain a whole sequence from an empty state."""
    return LRPError(f"{where}: this call continues from a cached state; run the full sequence in one forward ({how}).")


def refuse_cached_state(module: Any, cache: Any, recurrent: bool = True) -> None:
    """Raise :class:`LRPError` if the call of ``module`` (its ``layer_idx``) continues from a cached state.

    The LRP forms explain a whole sequence from an empty state; a fresh cache (``use_cache=True`` on a first
    call) is fine. Caches of transformers 5.2x have ``get_conv_state`` (and ``get_recurrent_state``, unless
    ``recurrent=False``: conv-only layers); older 5.x releases (e.g. 5.17) only ``has_previous_state``.
    """
    if cache is None:
        return
    idx = module.layer_idx
    if hasattr(cache, "get_conv_state"):
        cached = cache.get_conv_state(idx) is not None or (recurrent and cache.get_recurrent_state(idx) is not None)
    else:
        cached = bool(cache.has_previous_state(idx))
    if cached:
        raise continuation_refused(f"{type(module).__name__} layer {idx}")


def mask_padding(h: Tensor, attention_mask: Tensor | None) -> Tensor:
    """transformers' ``apply_mask_to_padding_states``: ``h`` is ``(b, L, C)``, mask ``(b, L)``."""
    if attention_mask is None:
        return h
    return (h * attention_mask[:, :, None]).to(h.dtype)


def exact_region(
    fn: Callable[[torch.dtype], Tensor], wide: torch.dtype, narrow: torch.dtype, rules: GatedLinearRules
) -> Tensor:
    """Run a region the model computes in ``narrow`` (float32) inside a ``wide`` (float64) model.

    Parameters
    ----------
    fn : callable ``(compute_dtype) -> Tensor``
        The region with the LRP rules applied; with ``compute_dtype = narrow`` it must give the
        model's own value bit for bit.
    wide, narrow : torch.dtype
        The model's dtype and the dtype the model computes the region in.

    Returns
    -------
    Tensor
        The model's value (``fn(narrow)``, in ``fn(wide)``'s dtype) whose gradient flows into
        ``fn(wide)`` scaled by ``value / fn(wide)`` (:func:`proportional`): the region's
        rounding is absorbed and the relevance keeps float64 precision. Without
        ``rules.exact_casts`` (or when ``wide`` is not wider) ``fn(narrow)`` with plain gradients.

    Notes
    -----
    The ratio is ``1 + O(float32 ε)`` except where the region's output nearly cancels
    (``|value| ≲ ε·|terms|``); there it rescales that entry's decomposition, always summing
    to the entry's own relevance.
    """
    if not (rules.exact_casts and wide.is_floating_point and torch.finfo(wide).bits > torch.finfo(narrow).bits):
        return fn(narrow)
    with torch.no_grad():
        value = fn(narrow)
    relevance = fn(wide)
    return proportional(relevance, value.to(relevance.dtype))


def half_rule(x: Tensor, rules: GatedLinearRules) -> Tensor:
    """``x``, the result of a product of two input-dependent factors, under the half rule when ``rules.half_gate``
    is on (each factor gets half of the product's relevance; MambaLRP)."""
    return uniform_rule(x, 2) if rules.half_gate else x


def project_heads(module: nn.Module, hidden_states: Tensor, *projections: str) -> tuple[Tensor, ...]:
    """``module.<projection>(hidden_states)`` split into heads, as HF's attention layers do:
    (b, L, H) -> (b, heads, L, ``module.head_dim``) per projection name (e.g. ``"q_proj", "k_proj", "v_proj"``)."""
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    return tuple(getattr(module, name)(hidden_states).view(shape).transpose(1, 2) for name in projections)


def held_delta_rule(
    kernel: Callable[..., tuple[Tensor, Tensor | None]],
    recurrent: Callable[..., Tensor],
    query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
    rules: GatedLinearRules,
    keep_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """A delta-rule layer made linear in ``value``: queries, keys, betas and decays held constant.

    The value is HF's own float32 ``kernel`` (called as HF calls its chunked delta rule); the relevance runs
    through ``recurrent(query, key, value, g, beta, dtype)`` in the compute dtype, joined by
    :func:`exact_region`. Returns the core output and the kernel's final state (``None`` unless ``keep_state``).
    """
    query, key, beta, g = (hold(t, rules.detach_ssm) for t in (query, key, beta, g))
    if not value.is_cuda:  # with fla importable, transformers binds fla's Triton kernel, which fails on CPU tensors
        kernel = torch_fallback_of(kernel) or kernel
    final: list[Tensor | None] = []

    def region(compute_dtype: torch.dtype) -> Tensor:
        if compute_dtype == torch.float32:  # HF's own kernel (computes in float32): the model's value
            out, state = kernel(
                query, key, value, g=g, beta=beta, initial_state=None,
                output_final_state=keep_state, use_qk_l2norm_in_kernel=True,
            )
            final.append(state)
            return out
        return recurrent(query, key, value, g, beta, compute_dtype)

    if value.is_cuda and value.dtype == torch.float32:
        # On CUDA the kernel is fla's Triton delta rule: take its value only, never its backward (fla 0.6 refuses
        # the gated chunk backward under Triton 3.4-3.7 on Hopper, and the held-constant rules need no more than
        # the value path, which the float32 recurrence gives).
        with torch.no_grad():
            value_out = region(torch.float32)
        core = proportional(recurrent(query, key, value, g, beta, torch.float32), value_out)
    else:
        core = exact_region(region, value.dtype, torch.float32, rules)
    return core, (final[0] if final else None)
