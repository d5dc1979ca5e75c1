"""KDA (Kimi Delta Attention): the gated delta rule with one log-decay per key channel.

Per head (formulas.md §3.7), with ``G = cumsum g`` per key channel ``i``::

    QK[t, s] = Σ_i q̂_{t,i} k̂_{s,i} exp(G_{t,i} − G_{s,i})            (s ≤ t)
    KK[t, s] = β_t Σ_i k̂_{t,i} k̂_{s,i} exp(G_{t,i} − G_{s,i})        (s < t)
    A        = QK · (I + KK)^{−1} · diag(β),       o = A v

The exponent ``G_t − G_s`` is formed inside the key-channel sum (pivot-factorised below the
diagonal, masked on it; :func:`~.gated_deltanet.decayed_products`), never as
``(q·e^{G})(k·e^{−G})ᵀ``, which overflows once ``−G`` exceeds ~88 in float32.
Everything else — channels, frozen sigmoid-gated RMSNorm row scale, the global triangular
solve and its memory — is shared with :class:`~.gated_deltanet.DeltaRuleAttention`.
"""

from __future__ import annotations

from .gated_deltanet import DeltaRuleAttention


class KDAAttention(DeltaRuleAttention):
    """Implicit attention of a KDA layer; ``cum`` is ``(b, H, L, dk)`` (one decay per key channel)."""

    family = "kda"
