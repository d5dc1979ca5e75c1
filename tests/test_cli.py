"""The captum-implicit command: the demo explains real text with a bundled model and writes a report."""

from __future__ import annotations

import re

import pytest

from captum_implicit.cli import main


def test_demo_prints_heatmaps_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--text", "a gorgeous , witty and moving film", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ImplicitAttnGrad" in printed and "IntegratedGradients" in printed
    assert "\x1b[48;2;" in printed  # coloured tokens
    page = (out / "report.html").read_text()
    # one heatmap per method, one span per word (the <cls> read-out token is left out)
    assert page.count("class='heatmap'") == 2
    spans = re.findall(r'<span class="tok" title="([^"]+)"', page)
    assert len(spans) == 2 * 7 and all(float(x) == float(x) for x in spans)
    pngs = sorted(out.glob("text0_layer*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--model", "no-such-model"],
         "unknown model 'no-such-model'; bundled models: .*mamba-rotten-tomatoes"),
        (["demo", "--text", "   "], "empty --text"),
        (["demo", "--text", " ".join(["film"] * 500)], "more than the model's context"),
    ],
)
def test_demo_errors_are_clear(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_supported_lists_the_registry(capsys):
    assert main(["supported"]) == 0
    assert "MambaMixer" in capsys.readouterr().out


def test_evaluate_writes_a_report(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--models", "mamba-trigger", "--examples", "4", "--no-sanity",
            "--methods", "random,implicit_attn_grad", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert "implicit_attn_grad" in table and "GT AUROC" in table
    assert (out / "results.csv").exists() and (out / "run.json").exists()
    assert main(["evaluate", "--models", "nope", "--out", str(out)]) == 2


def test_evaluate_full_and_method_errors_are_clear(tmp_path, capsys):
    assert main(["evaluate", "--full", "--models", "mamba-trigger", "--out", str(tmp_path)]) == 2
    assert "--full fixes the models" in capsys.readouterr().err
    assert main(["evaluate", "--models", "mamba-trigger", "--methods", "random,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
