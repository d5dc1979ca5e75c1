"""A Captum workflow on a causal LM: implicit-attention methods next to Captum's, NoiseTunnel, metrics.

    python examples/captum_workflow.py            # tiny random HF Mamba LM, L = 64
    python examples/captum_workflow.py --smoke    # L = 16, fewer samples

Every method below is a Captum ``Attribution`` with the same ``attribute(inputs, target=...)`` call, so
they are swapped by name; NoiseTunnel and ``captum.metrics`` work on all of them. The model is a random
tiny HF Mamba (offline); with a real one use ``AutoModelForCausalLM.from_pretrained(...)``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers as tf
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from captum.metrics import infidelity, sensitivity_max

import captum_implicit as ci
from captum_implicit.eval import spearman


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CAPTUM_IMPLICIT_SMOKE") == "1")
    args = p.parse_args()
    length = 16 if args.smoke else args.length
    samples = 2 if args.smoke else 8

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=100))
    model.eval()
    ids = torch.randint(0, 100, (2, length))
    with torch.no_grad():
        target = model(ids).logits[:, -1].argmax(-1)            # each text's predicted next token

    # 1. token ids in: the implicit-attention methods read the logits at the last position themselves
    for name, method in [
        ("ImplicitAttnGrad", ci.ImplicitAttnGrad(model)),
        ("ImplicitAttentionRollout", ci.ImplicitAttentionRollout(model)),
        ("ImplicitAttention (last layer row)", ci.ImplicitAttention(model)),
        ("MambaAttr (published)", ci.MambaAttr(model)),
    ]:
        t = time.perf_counter()
        attr = method.attribute(ids, target=target)
        top = attr[0].topk(3).indices.tolist()
        print(f"{name:38s} {tuple(attr.shape)}  top-3 positions {top}  {time.perf_counter() - t:.2f} s")

    # 2. embeddings in: the same call for Captum's gradient methods and ours
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()   # Captum's gradient methods want it

    def last_logits(e):
        return model(inputs_embeds=e).logits[:, -1]               # (B, V)

    ours = ci.ImplicitAttnGrad(last_logits, model=model)
    methods = {"ImplicitAttnGrad": ours, "Saliency": Saliency(last_logits),
               "InputXGradient": InputXGradient(last_logits), "IntegratedGradients": IntegratedGradients(last_logits)}
    token_scores = {}
    for name, method in methods.items():
        kw = {"n_steps": 8 if args.smoke else 50} if name == "IntegratedGradients" else {}
        token_scores[name] = method.attribute(embeds, target=target, **kw).sum(-1)   # (B, L)
    ref = token_scores["IntegratedGradients"]
    for name, s in token_scores.items():
        rho = float(spearman(s, ref).mean())
        print(f"Spearman rho with IntegratedGradients: {name:20s} {rho:+.2f}")

    # 3. NoiseTunnel around ours (SmoothGrad on the embeddings)
    smooth = NoiseTunnel(ours).attribute(embeds, nt_type="smoothgrad", nt_samples=samples, stdevs=0.02, target=target)
    print("NoiseTunnel(ImplicitAttnGrad):", tuple(smooth.shape))

    # 4. Captum metrics
    attr = ours.attribute(embeds, target=target)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    print("infidelity     ", infidelity(last_logits, perturb, embeds, attr, target=target,
                                        n_perturb_samples=samples).tolist())
    print("max-sensitivity", sensitivity_max(ours.attribute, embeds, target=target, n_perturb_samples=samples,
                                             perturb_radius=0.01).tolist())


if __name__ == "__main__":
    main()
