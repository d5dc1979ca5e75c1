"""Explain sentences with a bundled sentiment model: ImplicitAttnGrad next to Captum's IntegratedGradients.

    python examples/explain_zoo_model.py                                  # three sentences, mamba model
    python examples/explain_zoo_model.py --model rwkv-rotten-tomatoes --text "a dull , lifeless film"
    python examples/explain_zoo_model.py --smoke                          # one sentence, few IG steps

Prints coloured per-token heatmaps, the agreement of the two methods (Spearman ρ over the words) and
writes an HTML report with each layer's implicit-attention matrix. Offline, CPU.
"""

from __future__ import annotations

import argparse
import os

import torch
from captum.attr import LayerIntegratedGradients

from captum_implicit import ImplicitAttnGrad, implicit_attention
from captum_implicit.eval import spearman
from captum_implicit.viz import ReportSection, ansi_heatmap, write_report
from captum_implicit.zoo import available, load

SENTENCES = [
    "a gorgeous , witty and moving film",
    "the plot is thin and the jokes fall flat",
    "not bad at all , though the ending drags",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mamba-rotten-tomatoes", choices=available())
    p.add_argument("--text", action="append", help="sentence to explain (repeatable)")
    p.add_argument("--out", default="zoo-report")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CAPTUM_IMPLICIT_SMOKE") == "1",
                   help="tiny run (also: CAPTUM_IMPLICIT_SMOKE=1)")
    args = p.parse_args()
    texts = args.text or (SENTENCES[:1] if args.smoke else SENTENCES)
    steps = 8 if args.smoke else 50

    model, tok = load(args.model)
    attn_grad = ImplicitAttnGrad(model)
    lig = LayerIntegratedGradients(model, model.get_input_embeddings())
    sections = []
    for text in texts:
        enc = tok([text])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            probs = model(ids, attention_mask=mask).softmax(-1)[0]
        target = int(probs.argmax())
        ours = attn_grad.attribute(ids, target=target, additional_forward_args=(mask,))[0]
        baseline = torch.full_like(ids, tok.neutral_id)     # an in-distribution, label-neutral token
        ig = lig.attribute(ids, baselines=baseline, target=target, additional_forward_args=(mask,),
                           n_steps=steps).sum(-1)[0]
        tokens = tok.convert_ids_to_tokens(ids[0].tolist())
        words = slice(0, len(tokens) - 1)                   # the <cls> read-out token is the query itself
        rho = float(spearman(ours[None, words], ig[None, words])[0])
        print(f"\n{text!r} -> class {target} (p = {float(probs[target]):.3f}); Spearman rho(ours, IG) = {rho:+.2f}")
        print("  ImplicitAttnGrad    ", ansi_heatmap(tokens[words], ours[words]))
        print(f"  IG ({steps} steps)      ", ansi_heatmap(tokens[words], ig[words]))
        layers = implicit_attention(model, ids, attention_mask=mask)
        sections.append(ReportSection(
            text, f"class {target} (p = {float(probs[target]):.3f})",
            heatmaps=[("ImplicitAttnGrad", tokens[words], ours[words]),
                      (f"IntegratedGradients ({steps} steps)", tokens[words], ig[words])],
            matrices=[(la.name, la.family, la.aggregate("abs_mean")[0]) for la in layers],
            matrix_tokens=tokens,
        ))
    path = write_report(args.out, args.model, "Red: evidence for the predicted class; blue: against.", sections)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
