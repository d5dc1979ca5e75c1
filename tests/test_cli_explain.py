"""`captum-implicit explain PATH`: a user's own model folder, saved here with a tokenizer built offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import captum_implicit as ci  # noqa: E402
from captum_implicit.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = "<pad> <unk> <eos> the a film is good bad plot thin witty moving and not at all dull".split()
TEXT = "the film is witty and moving"


def save_tokenizer(folder: Path, max_length: int | None = None) -> None:
    """A word-level tokenizer made here (no download), saved as save_pretrained writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {} if max_length is None else {"model_max_length": max_length}
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", **kwargs
    )
    fast.save_pretrained(folder)


def save(model: torch.nn.Module, folder: Path, max_length: int | None = None) -> Path:
    model.save_pretrained(folder)
    save_tokenizer(folder, max_length)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    v = len(WORDS)
    mamba = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=v))
    gemma = tf.RecurrentGemmaForCausalLM(
        tf.RecurrentGemmaConfig(
            vocab_size=v, hidden_size=16, lru_width=16, num_attention_heads=2, intermediate_size=32,
            num_hidden_layers=3, attention_window_size=8, block_types=["recurrent", "recurrent", "attention"],
        )
    )
    jamba = tf.JambaForSequenceClassification(
        tf.JambaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, mamba_d_state=4, vocab_size=v, num_labels=2, pad_token_id=0,
            max_position_embeddings=8, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1},
        )
    )
    rwkv = tf.RwkvForCausalLM(
        tf.RwkvConfig(hidden_size=16, attention_hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      vocab_size=v)
    )
    llama = tf.LlamaForCausalLM(
        tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=v)
    )
    return {
        "mamba": save(mamba, root / "mamba"),
        "gemma": save(gemma, root / "gemma"),
        "jamba": save(jamba, root / "jamba"),
        "rwkv": save(rwkv, root / "rwkv"),
        "llama": save(llama, root / "llama"),
    }


def spans(page: str) -> list[float]:
    return [float(x) for x in re.findall(r'<span class="tok" title="([^"]+)"', page)]


def test_explain_causal_lm_default_target_is_the_next_token_prediction(folders, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["explain", str(folders["mamba"]), "--text", TEXT, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MambaForCausalLM" in printed and "predicted next token" in printed and "\x1b[48;2;" in printed
    page = (out / "report.html").read_text()
    assert page.count("class='heatmap'") == 2  # attn_grad and ig
    scores = spans(page)
    n = len(TEXT.split())
    assert len(scores) == 2 * n
    assert len(list(out.glob("text0_layer*.png"))) == 2  # one per MambaMixer

    # the reported ImplicitAttnGrad scores are those of the model's own arg-max next token at the last position
    model = tf.MambaForCausalLM.from_pretrained(folders["mamba"], local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(folders["mamba"], local_files_only=True)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        predicted = int(model(ids).logits[0, -1].argmax())
    expected = ci.ImplicitAttnGrad(model).attribute(ids, target=predicted)[0]
    torch.testing.assert_close(torch.tensor(scores[:n], dtype=torch.float64), expected.double(), rtol=1e-3, atol=0)
    assert f"(id {predicted})" in page


def test_transformers_checkpoint_loads_into_transformers_classes(folders, monkeypatch):
    """Another package registered under transformers' model type (as ``import fla`` does for "mamba" and "mamba2",
    process-wide): a checkpoint saved by transformers still loads into transformers' own classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from captum_implicit.local_model import load_local

    class OtherConfig(tf.MambaConfig):
        model_type = "mamba"

    class OtherMamba(tf.MambaForCausalLM):
        config_class = OtherConfig

    monkeypatch.setitem(CONFIG_MAPPING._extra_content, "mamba", OtherConfig)
    monkeypatch.setitem(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, OtherConfig, OtherMamba)
    assert type(tf.AutoModelForCausalLM.from_pretrained(folders["mamba"], local_files_only=True)) is OtherMamba
    loaded = load_local(folders["mamba"])
    assert type(loaded.model) is tf.MambaForCausalLM and type(loaded.model.config) is tf.MambaConfig


# RecurrentGemma: two recurrent (RG-LRU) blocks and one attention block, one matrix each. RWKV: its in-place
# cache update would block the backward, so explain must run it with use_cache=False.
@pytest.mark.parametrize("name, families", [("gemma", ["rglru", "rglru", "softmax"]), ("rwkv", ["rwkv", "rwkv"])])
def test_explain_given_target_and_other_families(name, families, folders, tmp_path, capsys):
    out = tmp_path / name
    argv = ["explain", str(folders[name]), "--text", TEXT, "--target", "dull", "--method", "attn_grad,rollout",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"given next token 'dull' (id {WORDS.index('dull')})" in printed
    page = (out / "report.html").read_text()
    assert page.count("class='heatmap'") == 2 and len(spans(page)) == 2 * len(TEXT.split())
    assert len(list(out.glob("text0_layer*.png"))) == len(families)
    assert re.findall(r"<figcaption>[^<]* \((\w+)\)</figcaption>", page) == families


def test_explain_sequence_classifier_and_its_context(folders, tmp_path, capsys):
    out = tmp_path / "jamba"
    assert main(["explain", str(folders["jamba"]), "--text", "a witty film", "--target", "fresh",
                 "--method", "attn_grad", "--out", str(out)]) == 0
    assert "given class 1 (fresh)" in capsys.readouterr().out
    long = " ".join(["film"] * 9)  # max_position_embeddings=8
    assert main(["explain", str(folders["jamba"]), "--text", long, "--out", str(out)]) == 2
    assert "9 tokens, more than the model's maximum of 8 positions" in capsys.readouterr().err


def _mamba_ssm_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mamba-ssm"
    folder.mkdir()
    cfg = {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": len(WORDS), "ssm_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
           "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "pytorch_model.bin").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"model path '.*nowhere' does not exist"),
        ("empty", r"empty --text"),
        ("llama", r"LlamaForCausalLM has no layer captum-implicit can explain; its module classes are "
                  r".*LlamaAttention"),
        ("method", r"unknown --method magic; choose from attn_grad, rollout, uia, ig"),
        ("target", r"--target 'very good' is 2 tokens for this tokenizer"),
        ("no-tokenizer", r"no tokenizer could be loaded from"),
    ],
)
def test_explain_errors_are_clear(case, message, folders, tmp_path, capsys):
    path, extra = str(folders["mamba"]), []
    text = TEXT
    if case == "missing":
        path = str(tmp_path / "nowhere")
    elif case == "empty":
        text = "  "
    elif case == "llama":
        path = str(folders["llama"])
    elif case == "method":
        extra = ["--method", "magic"]
    elif case == "target":
        extra = ["--target", "very good"]
    elif case == "no-tokenizer":
        extra = ["--tokenizer", str(tmp_path)]
    assert main(["explain", path, "--text", text, *extra, "--out", str(tmp_path / "r")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_explain_mamba_ssm_checkpoint_needs_mamba_ssm_and_cuda(tmp_path, capsys):
    try:
        import mamba_ssm  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("mamba-ssm and CUDA are here: the GPU test loads a real checkpoint")
    except ImportError:
        pass
    assert main(["explain", str(_mamba_ssm_folder(tmp_path)), "--text", TEXT]) == 2
    err = capsys.readouterr().err
    assert "mamba-ssm checkpoint" in err and ("not importable" in err or "need a CUDA GPU" in err)


@pytest.mark.gpu
def test_explain_mamba_ssm_checkpoint_on_gpu(tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mixer = pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    from mamba_ssm.models.config_mamba import MambaConfig

    torch.manual_seed(0)
    model = mixer.MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=len(WORDS)), device="cuda")
    folder = tmp_path / "mamba-ssm"
    model.save_pretrained(str(folder))
    save_tokenizer(folder)
    out = tmp_path / "report"
    assert main(["explain", str(folder), "--text", TEXT, "--out", str(out)]) == 0
    assert "MambaLMHeadModel (mamba-ssm" in capsys.readouterr().out
    assert len(list(out.glob("text0_layer*.png"))) == 2


def test_python_dash_m_explain(folders, tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "captum_implicit", "explain", str(folders["mamba"]), "--text", TEXT,
         "--method", "attn_grad", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HTML report:" in proc.stdout and (out / "report.html").is_file()
