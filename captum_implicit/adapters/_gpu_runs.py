"""What the GPU tests (``pytest -m gpu``, ``scripts/gpu_tests.sh``) showed, in the words of the support table's
GPU column (``docs/supported.md``). Each adapter names, per module class, the kernels its GPU test compared
against; these are the phrases they share.

Last GPU run: session 5 (one H200; torch 2.11, transformers 5.17, triton 3.6, mamba-ssm 2.3.2.post1 built
without causal-conv1d, fla 0.6.0). Bounds are relative to the largest entry of the real tensor entering the
output projection: float32 ≤ 1e-4 (Triton's float32 dots in IEEE, TF32 off: ``tests/conftest.py``), bf16
≤ 5e-2 (the kernels round to bf16; the closed form runs in float32) unless a phrase says otherwise.
"""

from __future__ import annotations

#: the bounds and the test of the HF relatives' and hybrids' every captured layer on CUDA
HF_VARIANTS = "float32 ≤ 1e-4 and bf16 ≤ 5e-2, with padding, H200 (tests/test_hf_variants.py)"
#: a model the GPU machine's transformers does not have
NOT_IN_GPU_TRANSFORMERS = (
    "— (GPU test written in tests/test_hf_variants.py; not run: transformers 5.17 on the GPU machine lacks the model)"
)
#: no GPU test builds this class
NO_GPU_TEST = "— (no GPU test of this class)"
#: the GPU machine's mamba-ssm build lacks causal-conv1d: transformers and mamba-ssm take their torch conv
WITHOUT_CAUSAL_CONV1D = "causal-conv1d not installed there: torch conv"


def written_not_run(test: str) -> str:
    """A GPU test exists (``test``: its file or node id) but no GPU run has executed it yet."""
    return f"— (GPU test written, not yet run: {test})"
