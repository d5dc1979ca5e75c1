"""Models for the attribution tests: a toy layer with a known attention, tiny HF Mamba LM / classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_implicit import Adapter, LayerAttention, register_adapter, unregister_adapter


class ToyMixer(nn.Module):
    """``y[b, t, c] = Σ_{s≤t} W[c, t, s] · x[b, s, c]``: implicit attention ``A = W`` (data-independent)."""

    def __init__(self, channels: int, length: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(channels, length, length, generator=g, dtype=torch.float64).tril())
        self.out_proj = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        w = self.weight[:, :length, :length]
        y = torch.einsum("cts,bsc->btc", w, x)
        return self.out_proj(y)


class ToyAttention(LayerAttention):
    family = "toy"

    def __init__(self, name: str, values: Tensor, weight: Tensor) -> None:
        super().__init__(name, values)
        self.weight = weight

    def core_block(self, channels, rows, cols):  # noqa: ANN001, ANN201
        blk = self.weight[channels][:, rows, cols]
        return blk[None].expand(self.batch_size, *blk.shape).to(self.dtype)

    def to_output_layout(self, y: Tensor) -> Tensor:
        return y[..., 0].transpose(1, 2)

    def from_output_layout(self, t: Tensor) -> Tensor:
        return t.transpose(1, 2)[..., None]


def _build(module: ToyMixer, rec, name: str) -> ToyAttention:  # noqa: ANN001
    x = rec.args[0]
    length = x.shape[1]
    return ToyAttention(name, x.detach().transpose(1, 2)[..., None], module.weight.detach()[:, :length, :length])


TOY_ADAPTER = Adapter(family="toy", classes=(ToyMixer,), build=_build, output_module="out_proj")


class toy_registered:
    """Context manager registering the toy adapter for the duration of a test."""

    def __enter__(self) -> None:
        register_adapter(TOY_ADAPTER)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        unregister_adapter(TOY_ADAPTER)


class ToyClassifier(nn.Module):
    """Embedding → ``depth`` residual-free toy mixers → read position ``q`` (last non-pad) → linear head.

    ``forward(ids_or_embeds, attention_mask=None)`` returns ``(B, K)`` logits.
    """

    def __init__(self, channels: int = 3, length: int = 8, depth: int = 1, classes: int = 2, vocab: int = 11) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.embed = nn.Embedding(vocab, channels, dtype=torch.float64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, channels, generator=g, dtype=torch.float64))
        self.mixers = nn.ModuleList(ToyMixer(channels, length, seed=i) for i in range(depth))
        self.head = nn.Parameter(torch.randn(channels, classes, generator=g, dtype=torch.float64))

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(x) if not x.is_floating_point() else x
        for mixer in self.mixers:
            h = mixer(h)
        if attention_mask is None:
            q = torch.full((h.shape[0],), h.shape[1] - 1)
        else:
            q = (torch.arange(h.shape[1]) * attention_mask).argmax(1)
        return h[torch.arange(h.shape[0]), q] @ self.head


def tiny_mamba_lm(layers: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=40,
        hidden_size=12,
        state_size=4,
        num_hidden_layers=layers,
        intermediate_size=16,
        conv_kernel=4,
        time_step_rank=2,
        use_cache=False,
        pad_token_id=0,
        # HF casts the residual to float32 by default; keep the float64 model float64 throughout so that
        # batch-vs-single comparisons are at float64 rounding (the exactness tests do not depend on it)
        residual_in_fp32=False,
    )
    model = MambaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial conv bias and D so every term of the exact matrix matters
        for layer in model.backbone.layers:
            layer.mixer.conv1d.bias.normal_(0, 0.3)
            layer.mixer.D.normal_(1, 0.3)
    return model


class MambaClassifier(nn.Module):
    """A tiny ``MambaForSequenceClassification`` (transformers has none): backbone, last non-pad token, head."""

    def __init__(self, classes: int = 3, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        lm = tiny_mamba_lm(2, dtype, seed=1)
        self.backbone = lm.backbone
        self.config = lm.config
        self.score = nn.Linear(lm.config.hidden_size, classes, bias=False, dtype=dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.backbone(input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if attention_mask is None:
            last = torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
        else:
            last = (torch.arange(h.shape[1], device=h.device) * attention_mask).argmax(1)
        return self.score(h[torch.arange(h.shape[0], device=h.device), last])
