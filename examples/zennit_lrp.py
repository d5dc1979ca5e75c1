"""LRP for an HF Mamba with Zennit: GatedLinearComposite (exact conservation) and MambaLRP's rules.

    python examples/zennit_lrp.py            # hidden 64, 4 layers, L = 64
    python examples/zennit_lrp.py --smoke    # hidden 16, 2 layers, L = 12

Relevance is input × gradient under the composite (Zennit's ``Gradient`` attributor on the embeddings).
With the biases that absorb relevance switched off (``use_conv_bias=False``) the token relevances sum
to the explained logit; the script checks it. Offline, CPU, float64.
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers as tf
from zennit.attribution import Gradient

from captum_implicit.lrp import GatedLinearComposite, GatedLinearLRP, MambaLRPComposite


class LastLogits(torch.nn.Module):
    """Zennit attributors call ``model(x)`` with one tensor: embeddings in, last-position logits out."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds, use_cache=False).logits[:, -1].double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CAPTUM_IMPLICIT_SMOKE") == "1")
    args = p.parse_args()
    hidden, layers, length = (16, 2, 12) if args.smoke else (64, 4, 64)

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=hidden, state_size=8, num_hidden_layers=layers, vocab_size=100,
                         use_conv_bias=False)
    model = tf.MambaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 100, (1, length))
    with torch.no_grad():
        target = int(model(ids).logits[0, -1].argmax())

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    one_hot = torch.nn.functional.one_hot(torch.tensor([target]), 100).double()
    results, logit = {}, 0.0
    composites = [("GatedLinearComposite", GatedLinearComposite()), ("MambaLRPComposite", MambaLRPComposite())]
    for name, composite in composites:
        with Gradient(LastLogits(model), composite) as attributor:
            logits, grad = attributor(embeds, attr_output=one_hot)
        relevance = (embeds * grad).sum(-1).detach()[0]           # (L,)
        logit = float(logits.detach()[0, target])
        results[name] = relevance
        print(f"{name:22s} sum of relevances {float(relevance.sum()):+.10f}   logit {logit:+.10f}   "
              f"conservation error {abs(float(relevance.sum()) - logit) / abs(logit):.1e}")
    # the exact composite conserves to HF's float32 logits; MambaLRP's 1e-6 stabiliser costs a little more
    exact = results["GatedLinearComposite"]
    assert abs(float(exact.sum()) - logit) <= 1e-6 * abs(logit)

    top = exact.abs().topk(min(5, length)).indices.tolist()
    print("most relevant positions (|R|):", top)
    print("the two rule sets agree: corr =",
          f"{float(torch.corrcoef(torch.stack([exact, results['MambaLRPComposite']]))[0, 1]):.6f}")

    # the same through Captum's Attribution interface
    rel, delta = GatedLinearLRP(model).attribute(ids, target=target, return_convergence_delta=True)
    print("GatedLinearLRP (Captum):", tuple(rel.shape), "convergence delta", float(delta[0]))
    assert torch.allclose(rel[0], exact, rtol=1e-6, atol=1e-9)


if __name__ == "__main__":
    main()
