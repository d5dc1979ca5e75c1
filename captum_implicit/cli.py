"""The ``captum-implicit`` command (also ``python -m captum_implicit``).

    captum-implicit demo                                 # explain a few sentences with a bundled model
    captum-implicit demo --model rwkv-rotten-tomatoes --text "a gorgeous, witty film" --out report
    captum-implicit explain ./my-mamba --text "The capital of France is"   # your own model folder
    captum-implicit models                               # the bundled models
    captum-implicit supported                            # the supported layer classes

Everything runs offline, on the CPU (mamba-ssm checkpoints: on a CUDA GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEMO_SENTENCES = [
    "a gorgeous , witty and moving film",
    "the plot is thin and the jokes fall flat",
    "not bad at all , though the ending drags",
]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _explain(model, tokenizer, text: str):
    """Tokens, predicted class, probabilities, ImplicitAttnGrad and IntegratedGradients scores, layer maps."""
    import torch
    from captum.attr import LayerIntegratedGradients

    import captum_implicit as ci

    from .zoo.data import split_words

    count = len(split_words(text)) + 1  # the tokenizer appends the <cls> read-out token
    if count <= 1:
        raise CLIError(f"text {text!r} has no words to explain; pass a non-empty --text")
    if count > tokenizer.max_length:  # the tokenizer would silently truncate
        raise CLIError(
            f"text has {count} tokens, more than the model's context of {tokenizer.max_length}; shorten it"
        )
    enc = tokenizer([text])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        probs = model(ids, attention_mask=mask).softmax(-1)[0]
    target = int(probs.argmax())
    ours = ci.ImplicitAttnGrad(model).attribute(ids, target=target, additional_forward_args=(mask,))[0]
    baseline = torch.full_like(ids, tokenizer.neutral_id)  # in-distribution, label-neutral (zoo vocab metadata)
    lig = LayerIntegratedGradients(model, model.get_input_embeddings())
    ig = lig.attribute(ids, baselines=baseline, target=target, additional_forward_args=(mask,), n_steps=50)
    ig = ig.sum(-1)[0]
    layers = ci.implicit_attention(model, ids, attention_mask=mask)
    maps = [(la.name, la.family, la.aggregate("abs_mean")[0]) for la in layers]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    # the appended <cls> read-out token is the query itself: its relevance is mostly the residual identity
    # of the rollout, so it is left out of the heatmaps (it stays in the matrices)
    words_only = slice(0, len(tokens) - 1)
    return tokens, words_only, target, probs, ours, ig, maps


_DEMO_INTRO = (
    "Red: evidence for the predicted class; blue: against (each row scaled by its largest |score|; the read-out "
    "token &lt;cls&gt; is left out of the heatmaps). Matrices: channel-averaged |implicit attention| per layer."
)


def _report(out: Path, model_name: str, results: list) -> Path:
    from .viz import ReportSection, write_report

    sections = [
        ReportSection(
            text,
            f"prediction: class {target} (p = {float(probs[target]):.3f})",
            heatmaps=[
                ("ImplicitAttnGrad (implicit attention × gradient, rolled out)", tokens[words], ours[words]),
                ("Captum IntegratedGradients (50 steps, neutral-token baseline)", tokens[words], ig[words]),
            ],
            matrices=maps,
            matrix_tokens=tokens,
        )
        for text, tokens, words, target, probs, ours, ig, maps in results
    ]
    return write_report(out, model_name, _DEMO_INTRO, sections)


def demo(args: argparse.Namespace) -> int:
    from . import zoo
    from .viz import ansi_heatmap

    available = zoo.available()
    if args.model not in available:
        raise CLIError(f"unknown model {args.model!r}; bundled models: {', '.join(available)}")
    texts = args.text or DEMO_SENTENCES
    if any(not t.strip() for t in texts):
        raise CLIError("empty --text: give a sentence to explain")
    model, tokenizer = zoo.load(args.model)
    results = []
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        def tqdm(x, **_):
            return x
    for text in tqdm(texts, desc="explaining", disable=len(texts) < 2 or not sys.stderr.isatty()):
        tokens, words, target, probs, ours, ig, maps = _explain(model, tokenizer, text)
        results.append((text, tokens, words, target, probs, ours, ig, maps))
        print(f"\n{text!r} → class {target} (p = {float(probs[target]):.3f})")
        print("  ImplicitAttnGrad      ", ansi_heatmap(tokens[words], ours[words]))
        print("  IntegratedGradients   ", ansi_heatmap(tokens[words], ig[words]))
    path = _report(Path(args.out), args.model, results)
    print(f"\nHTML report: {path}")
    return 0


_EXPLAIN_INTRO = (
    "Red: evidence for the explained target; blue: against (each row scaled by its largest |score|). "
    "Matrices: channel-averaged |implicit attention| per layer (row: query token, column: source token)."
)


def explain_cmd(args: argparse.Namespace) -> int:
    from .core.errors import InputError
    from .explain import METHODS, explain_text
    from .local_model import load_local
    from .viz import ReportSection, ansi_heatmap, write_report

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CLIError(f"unknown --method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if not args.text.strip():  # before loading the model: a newcomer's typo should not cost a model load
        raise CLIError("empty --text: give a text to explain")
    try:
        lm = load_local(args.path, tokenizer=args.tokenizer, device=args.device)
        print(f"{args.path}: {type(lm.model).__name__} ({lm.source}, {lm.kind.replace('_', ' ')}), "
              f"{len(lm.layers)} explained layers ({', '.join(sorted({c for _, c in lm.layers}))})")
        ex = explain_text(lm, args.text, args.target, methods)
    except InputError as e:
        raise CLIError(str(e)) from e
    print(f"\n{args.text!r} → {ex.caption}")
    width = max(len(m) for m in methods)
    for m in methods:
        print(f"  {m:<{width}}  ", ansi_heatmap(ex.tokens, ex.scores[m]))
    section = ReportSection(
        args.text,
        ex.caption,
        heatmaps=[(ex.labels[m], ex.tokens, ex.scores[m]) for m in methods],
        matrices=ex.maps,
        matrix_tokens=ex.tokens,
    )
    path = write_report(Path(args.out), Path(args.path).name or str(args.path), _EXPLAIN_INTRO, [section])
    print(f"\nHTML report: {path}")
    return 0


#: every method of the benchmark (those that do not apply to a model's family are reported n/a)
ALL_METHODS = (
    "random,saliency,input_x_gradient,integrated_gradients,feature_ablation,occlusion,kernel_shap,"
    "implicit_attn_grad,implicit_attention_rollout,implicit_attention,uia,mamba_attr,gated_linear_lrp"
)
#: the quick default: without the perturbation baselines (each costs L to 500 forwards per example)
DEFAULT_METHODS = (
    "random,saliency,input_x_gradient,integrated_gradients,implicit_attn_grad,implicit_attention_rollout,"
    "implicit_attention,uia,mamba_attr,gated_linear_lrp"
)
#: ``--full``: test examples per model, chosen so that the whole benchmark (8 models, every method, MPRT)
#: runs in about 30 min on 2 CPU cores (measured; docs/evaluation.md)
FULL_EXAMPLES = 32
#: ``--full``: examples of the randomisation (MPRT) check per model (5 explanations each: KernelShap-500 on
#: Mamba costs ~5 CPU-s per explanation)
FULL_SANITY_EXAMPLES = 4


def zoo_task(name: str, examples: int):
    """An evaluation task for a bundled model: its test split, the neutral token as the flip value,
    and ground truth (the trigger positions) for the synthetic task."""
    from . import zoo
    from .eval import Task
    from .zoo import data

    model, tokenizer = zoo.load(name)
    if name.endswith("-trigger"):
        items = [
            {
                "input_ids": tokenizer.encode_words(ex.words),
                "label": ex.label,
                "relevant_mask": [i in ex.relevant for i in range(len(ex.words))] + [False],  # + <cls>
            }
            for ex in data.trigger_split("test")[:examples]
        ]
    else:
        test = data.rotten_tomatoes("test")[:examples]
        items = [{"input_ids": tokenizer.encode(s.text), "label": s.label} for s in test]
    return Task(
        name,
        model,
        dataset=items,
        replacement=tokenizer.neutral_id,
        special_ids=[tokenizer.pad_id, tokenizer.cls_id],
        protect_last=True,
        pad_id=tokenizer.pad_id,
    )


def evaluate_cmd(args: argparse.Namespace) -> int:
    from . import zoo
    from .eval import evaluate

    from .eval import available_methods

    if args.full:
        if args.models or args.methods or args.examples is not None:
            raise CLIError("--full fixes the models, methods and example count; drop --models/--methods/--examples")
        args.methods, args.examples, args.sanity_examples = ALL_METHODS, FULL_EXAMPLES, FULL_SANITY_EXAMPLES
    names = args.models.split(",") if args.models else zoo.available()
    unknown = [n for n in names if n not in zoo.available()]
    if unknown:
        raise CLIError(f"unknown model(s) {', '.join(unknown)}; bundled models: {', '.join(zoo.available())}")
    methods = {m: m for m in (args.methods or DEFAULT_METHODS).split(",")}
    bad = [m for m in methods if m not in available_methods()]
    if bad:
        raise CLIError(f"unknown method(s) {', '.join(bad)}; available: {', '.join(available_methods())}")
    examples = args.examples if args.examples is not None else 200
    tasks = [zoo_task(n, examples) for n in names]
    result = evaluate(
        tasks, methods, args.out, seed=args.seed, sanity=not args.no_sanity, sanity_examples=args.sanity_examples,
        command="captum-implicit " + " ".join(sys.argv[1:]) if args.command else None,
    )
    print(f"report: {Path(args.out) / 'results.md'}")
    return 0 if result is not None else 1


def models(args: argparse.Namespace) -> int:
    from . import zoo

    print(zoo.markdown_table() if hasattr(zoo, "markdown_table") else "\n".join(zoo.available()))
    return 0


def supported(args: argparse.Namespace) -> int:
    from .core.registry import adapters

    for a in adapters():
        for c in a.classes:
            print(f"{a.family:15s} {c if isinstance(c, str) else c.__qualname__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captum-implicit",
        description="Exact implicit-attention explanations of Mamba / RWKV / Griffin-style models (offline).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="explain sentences with a bundled model; prints heatmaps and writes an HTML report",
        description="Loads a bundled sentiment model (trained by captum_implicit.zoo.train), explains each "
        "sentence with ImplicitAttnGrad next to Captum's IntegratedGradients, prints coloured per-token "
        "heatmaps and writes report.html plus one PNG per layer's implicit-attention matrix.",
    )
    d.add_argument("--model", default="mamba-rotten-tomatoes", help="bundled model (see `captum-implicit models`)")
    d.add_argument("--text", action="append", help="sentence to explain (repeatable); default: three examples")
    d.add_argument("--out", default="captum-implicit-report", help="folder for report.html and the PNGs")
    d.set_defaults(func=demo)
    x = sub.add_parser(
        "explain",
        help="explain a text with your own model folder (HF transformers or mamba-ssm checkpoint)",
        description="Loads a model saved on disk, offline, and explains one text: coloured per-token heatmaps\n"
        "in the terminal and report.html with each layer's implicit-attention matrix. Nothing is downloaded.\n\n"
        "PATH is one of\n"
        "  * an HF transformers folder: config.json + *.safetensors + tokenizer files, as save_pretrained\n"
        "    writes them. The head comes from config.architectures: *ForSequenceClassification is explained\n"
        "    for a class, anything else is loaded as a causal LM and explained at its last position;\n"
        "  * a mamba-ssm checkpoint folder: config.json + pytorch_model.bin, as MambaLMHeadModel.save_pretrained\n"
        "    writes it. Needs mamba-ssm and a CUDA GPU, and a tokenizer (in the folder, or --tokenizer DIR).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  captum-implicit explain ./my-mamba --text \"The capital of France is\"\n"
        "  captum-implicit explain ./my-mamba --text \"The capital of France is\" --target \" Paris\"\n"
        "  captum-implicit explain ./my-classifier --text \"a witty film\" --method attn_grad,rollout\n"
        "  captum-implicit explain ./mamba-130m --tokenizer ./gpt-neox-20b --text \"Hello\"   # mamba-ssm, GPU",
    )
    x.add_argument("path", help="folder with config.json and the weights")
    x.add_argument("--text", required=True, help="the text to explain")
    x.add_argument(
        "--target",
        help="what to explain. Causal LM: a token (string or id); default: the model's next-token prediction at "
        "the last position (the arg-max of its logits there). Classifier: a label name or class index; default: "
        "the predicted class",
    )
    x.add_argument(
        "--method",
        default="attn_grad,ig",
        help="comma-separated: attn_grad (ImplicitAttnGrad), rollout (ImplicitAttentionRollout), uia (the "
        "published UIA pipeline), ig (Captum LayerIntegratedGradients, 50 steps); default: attn_grad,ig",
    )
    x.add_argument("--tokenizer", help="folder with the tokenizer files (default: PATH)")
    x.add_argument("--device", help="torch device (default: cpu; cuda for mamba-ssm checkpoints)")
    x.add_argument("--out", default="captum-implicit-report", help="folder for report.html and the PNGs")
    x.set_defaults(func=explain_cmd)
    e = sub.add_parser(
        "evaluate",
        help="faithfulness benchmark of the explanation methods on the bundled models",
        description="Token flipping (ΔA^F), AOPC, ERASER, Chefer ±AUC, ground-truth recovery on the trigger task and "
        "MPRT, for each method on each bundled model's test split; writes results.md/.csv, plots and run.json.",
    )
    e.add_argument("--models", default="", help="comma-separated bundled models (default: all)")
    e.add_argument("--methods", default="", help=f"comma-separated method names (default: {DEFAULT_METHODS}; "
                   f"all: {ALL_METHODS})")
    e.add_argument("--examples", type=int, default=None, help="test examples per model (default 200)")
    e.add_argument("--full", action="store_true", help=f"the published benchmark: every bundled model, every method, "
                   f"the first {FULL_EXAMPLES} test examples of each model")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-sanity", action="store_true", help="skip the model-randomisation sanity check")
    e.add_argument("--sanity-examples", type=int, default=8, help="examples of the randomisation check per model")
    e.add_argument("--out", default="captum-implicit-evaluation")
    e.set_defaults(func=evaluate_cmd)
    sub.add_parser("models", help="list the bundled models").set_defaults(func=models)
    sub.add_parser("supported", help="list the supported layer classes").set_defaults(func=supported)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"captum-implicit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
