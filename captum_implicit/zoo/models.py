"""Small sequence classifiers: an HF backbone (Mamba, Mamba2, RWKV, Griffin) plus a linear head on the read-out token.

The read-out is the last non-padding token (the tokenizer appends ``<cls>`` there). Batches are RIGHT-padded:
HF's RWKV and Griffin recurrent blocks ignore ``attention_mask``, so left pads would flow into their state and
change the prediction; right pads come after the read-out and a causal model never sees them, which makes every
family's logits independent of padding (tested). For one unpadded text the read-out is simply the last position.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# family -> (config class name, model class name); imported lazily (transformers is the optional [hf] extra)
FAMILIES = {
    "mamba": ("MambaConfig", "MambaModel"),
    "mamba2": ("Mamba2Config", "Mamba2Model"),
    "rwkv": ("RwkvConfig", "RwkvModel"),
    "griffin": ("RecurrentGemmaConfig", "RecurrentGemmaModel"),
}
_MASKED = {"mamba", "mamba2", "griffin"}  # backbones whose forward takes attention_mask (RWKV warns and ignores it)


def small_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, pad_token_id: int = 0):
    """A tiny HF backbone config for ``family`` (a few hundred thousand parameters with a ~7k vocabulary).

    Choices that matter for explanations: RWKV ``rescale_every=0`` (otherwise HF rescales weights in place when
    switching to eval); Griffin uses recurrent blocks only (every layer is an RG-LRU, no softmax attention);
    Mamba2's chunk size covers the whole sequence (64).
    """
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, pad_token_id=pad_token_id,
                  bos_token_id=None, eos_token_id=None, use_cache=False)
    if family == "mamba":
        kw = dict(state_size=16, expand=2, conv_kernel=4, time_step_rank="auto")
    elif family == "mamba2":
        kw = dict(state_size=16, expand=2, head_dim=16, num_heads=2 * hidden // 16, n_groups=1, conv_kernel=4,
                  chunk_size=64)
    elif family == "rwkv":
        kw = dict(attention_hidden_size=hidden, intermediate_size=2 * hidden, context_length=64, rescale_every=0)
    elif family == "griffin":
        kw = dict(intermediate_size=2 * hidden, num_attention_heads=4, lru_width=hidden, conv1d_width=4,
                  attention_window_size=64, block_types=["recurrent"], tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    return getattr(transformers, FAMILIES[family][0])(**common, **kw)


def config_from_dict(family: str, d: dict):
    """Rebuild the backbone config saved by :meth:`SequenceClassifier.to_config_dict`."""
    import transformers

    d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}
    return getattr(transformers, FAMILIES[family][0])(**d)


class SequenceClassifier(nn.Module):
    """HF backbone + linear head on the read-out token.

    Parameters
    ----------
    family : {"mamba", "mamba2", "rwkv", "griffin"}
    backbone_config : transformers.PretrainedConfig
    num_labels : int
    dropout : float
        Dropout before the head (training only).
    embed_dropout : float
        Dropout on the token embeddings (training only; regularises the large embedding of a small data set).

    Forward
    -------
    ``input_ids`` (B, L) long, or ``inputs_embeds`` (B, L, H) float; optional ``attention_mask`` (B, L) of 1 on
    real tokens. Returns logits (B, num_labels) read at :meth:`readout_index`.
    """

    def __init__(self, family: str, backbone_config, num_labels: int = 2, dropout: float = 0.1,
                 embed_dropout: float = 0.0) -> None:
        super().__init__()
        import transformers

        self.family, self.num_labels, self.dropout_p = family, num_labels, dropout
        self.backbone = getattr(transformers, FAMILIES[family][1])(backbone_config)
        self.dropout = nn.Dropout(dropout)
        self.embed_dropout_p = embed_dropout
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.head = nn.Linear(backbone_config.hidden_size, num_labels)

    @property
    def config(self):
        return self.backbone.config

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the layer for Captum's ``LayerIntegratedGradients`` and friends)."""
        return self.backbone.get_input_embeddings()

    @staticmethod
    def readout_index(attention_mask: torch.Tensor | None, batch: int, length: int, device=None) -> torch.Tensor:
        """(B,) index of the last real token of each row (``length - 1`` without a mask; works for either padding)."""
        if attention_mask is None:
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        flipped = attention_mask.flip(-1).to(torch.long)
        return (length - 1 - flipped.argmax(-1)).to(torch.long)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None and self.training and self.embed_dropout_p > 0:
            # only while training: in eval the backbone embeds the ids itself, exactly as HF would
            inputs_embeds, input_ids = self.embed_dropout(self.get_input_embeddings()(input_ids)), None
        kw = {"attention_mask": attention_mask} if self.family in _MASKED and attention_mask is not None else {}
        hidden = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False,
                               **kw).last_hidden_state  # (B, L, H)
        b, length = hidden.shape[:2]
        idx = self.readout_index(attention_mask, b, length, hidden.device)
        last = hidden[torch.arange(b, device=hidden.device), idx]  # (B, H)
        return self.head(self.dropout(last))

    def head_config(self) -> dict:
        return {"type": "linear", "num_labels": self.num_labels, "dropout": self.dropout_p,
                "embed_dropout": self.embed_dropout_p,
                "readout": "last non-padding token (<cls>)", "padding_side": "right"}


@torch.no_grad()
def predict(model: nn.Module, tokenizer, encoded: Sequence[Sequence[int]], batch_size: int = 128) -> torch.Tensor:
    """(N, num_labels) logits of already encoded id lists, in input order.

    Rows are batched in a fixed order (stable sort by length) so that the recorded accuracies are recomputed with
    exactly the same batches, hence the same float rounding.
    """
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad([encoded[i] for i in idx])
            for i, row in zip(idx, model(**batch)):
                out[i] = row
        return torch.stack(out)
    finally:
        model.train(was_training)
