"""With an importable (but CPU-incapable) fla, transformers binds its kernels at import and the plain CPU
forward crashes; the capture must force the torch fallbacks and stay exact (formulas.md §2.3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_FAKE_OP = '''
def _no_driver(*args, **kwargs):
    raise RuntimeError("0 active drivers ([]). There should only be one.")

{names}
'''

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import transformers
    sys.path.insert(0, {tests!r})
    from conftest import OutputRecorder, rel_err
    from captum_implicit.core.capture import implicit_attention

    import fla  # the fake package: importable, every kernel fails like a real fla without a GPU
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  layer_types=["linear_attention", "full_attention"], vocab_size=128,
                  experts_implementation="eager")
    models = [
        (transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
            **common, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_key_value_heads=2,
            head_dim=16, num_experts=2, num_experts_per_tok=1, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16)), "out_proj", "gated_deltanet"),
        (transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(
            **common, moe_intermediate_size=64, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, num_local_experts=2, num_experts_per_tok=1, linear_head_dim=16,
            linear_num_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)), "o_proj", "kda"),
    ]
    ids = torch.randint(0, 128, (2, 21))
    for model, out_name, family in models:
        model = model.double().eval()
        try:
            model(input_ids=ids, use_cache=False)
        except RuntimeError as e:
            assert "0 active drivers" in str(e), e
        else:
            raise AssertionError("the fake fla kernel was not bound: the test would prove nothing")
        with OutputRecorder(model, suffix=out_name) as rec:
            layers = implicit_attention(model, input_ids=ids, use_cache=False)
        (attn,) = [a for a in layers if a.family == family]
        err = rel_err(attn.output(), rec.inputs[attn.name])
        assert err < 1e-5, err  # float32 kernel, see test_gated_deltanet
    print("OK")
    """
)


def test_capture_forces_torch_fallbacks_when_fla_is_importable(tmp_path: Path) -> None:
    ops = {
        "gated_delta_rule": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
        "kda": ("chunk_kda", "fused_recurrent_kda"),
    }
    root = tmp_path / "fla"
    (root / "ops").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "ops" / "__init__.py").write_text("")
    for pkg, names in ops.items():
        (root / "ops" / pkg).mkdir()
        body = "\n".join(f"{n} = _no_driver" for n in names)
        (root / "ops" / pkg / "__init__.py").write_text(_FAKE_OP.format(names=body))
    repo = Path(__file__).resolve().parents[1]
    script = _SCRIPT.format(tests=str(repo / "tests"))
    env_path = f"{tmp_path}:{repo}"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
