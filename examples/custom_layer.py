"""Support your own layer: a LayerAttention subclass + register_adapter, checked exact, then attributed.

    python examples/custom_layer.py            # L = 256
    python examples/custom_layer.py --smoke    # L = 24

The layer is a gated exponential moving average, ``y_t = SiLU(g_t) ⊙ Σ_{s≤t} a^{t−s} x_s`` per channel, so
``A[c, t, s] = SiLU(g[t, c]) · a_c^{t−s}``: values ``x``, the gate as row scale, a decay kernel as core.
See docs/recipes/custom_layer.md for the walk-through.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import captum_implicit as ci


class GatedEMA(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.decay_logit = nn.Parameter(torch.randn(dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, g = self.in_proj(h).chunk(2, -1)
        a = torch.sigmoid(self.decay_logit)
        state, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            state = a * state + x[:, t]
            ys.append(state)
        return self.out_proj(torch.stack(ys, 1) * F.silu(g))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(GatedEMA(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class GatedEMAAttention(ci.LayerAttention):
    family = "gated_ema"

    def __init__(self, name, values, gate, log_decay, module_type=""):
        super().__init__(name, values, row_scale=gate, module_type=module_type)
        self.log_decay = log_decay

    def core_block(self, channels, rows, cols):
        lag = (torch.arange(rows.start, rows.stop, device=self.device)[:, None]
               - torch.arange(cols.start, cols.stop, device=self.device)[None, :])
        core = torch.exp(self.log_decay[channels].to(self.dtype)[:, None, None] * lag.clamp(min=0)) * (lag >= 0)
        return core[None].expand(self.batch_size, -1, -1, -1)


def build_gated_ema(module, rec, name):
    (h,) = rec.submodule_inputs["in_proj"][0]
    with torch.no_grad():
        x, g = module.in_proj(h).chunk(2, -1)
    return GatedEMAAttention(name, values=x.transpose(1, 2)[..., None], gate=F.silu(g).transpose(1, 2),
                             log_decay=F.logsigmoid(module.decay_logit.detach()), module_type=type(module).__name__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CAPTUM_IMPLICIT_SMOKE") == "1")
    args = p.parse_args()
    length = 24 if args.smoke else 256

    adapter = ci.register_adapter(ci.Adapter(family="gated_ema", classes=(GatedEMA,), build=build_gated_ema,
                                             submodule_inputs=("in_proj",), output_module="out_proj"))
    try:
        torch.manual_seed(0)
        model = TinyLM().double()
        ids = torch.randint(0, 50, (2, length))

        # exactness against the real out_proj inputs, recorded independently
        seen: dict[str, torch.Tensor] = {}
        hooks = [blk.out_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"blocks.{i}", a[0]))
                 for i, blk in enumerate(model.blocks)]
        layers = ci.implicit_attention(model, ids)
        for hk in hooks:
            hk.remove()
        for la in layers:
            err = float((la.output() - seen[la.name]).norm() / seen[la.name].norm())
            print(f"{la.name}: {la.family}, {la.num_channels} channels, relative error of A @ x {err:.1e}")
            assert err < 1e-12

        # blockwise views agree with the dense matrix
        dense = layers[0].dense()
        assert torch.allclose(layers[0].aggregate("abs_mean"), dense.abs().mean(1), rtol=1e-10, atol=1e-14)

        with torch.no_grad():
            target = model(ids)[:, -1].argmax(-1)
        relevance = ci.ImplicitAttnGrad(model).attribute(ids, target=target)
        print("ImplicitAttnGrad", tuple(relevance.shape), "top positions", relevance[0].topk(3).indices.tolist())
    finally:
        ci.unregister_adapter(adapter)


if __name__ == "__main__":
    main()
