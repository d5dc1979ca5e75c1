"""What the GPU tests (``pytest -m gpu``, ``scripts/gpu_tests.sh``) showed, in the words of the support table's
GPU column (``docs/supported.md``). Each adapter names, per module class, the kernels its GPU test compared
against; these are the phrases they share.

GPU runs: sessions 4 to 7 on one H200 (torch 2.11, triton 3.6, mamba-ssm 2.3.2.post1 built for sm_90, fla 0.6.0).
Sessions 4 and 5 had transformers 5.17 and no causal-conv1d (transformers and mamba-ssm took their torch conv);
sessions 6 and 7 had transformers 5.24 and causal-conv1d 1.7.0 (its CUDA conv). Bounds are relative to the largest entry
of the real tensor entering the output projection: float32 ≤ 1e-4 (Triton's float32 dots in IEEE, TF32 off:
``tests/conftest.py``), bf16 ≤ 2e-2 (the kernels round to bf16; the closed form runs in float32; 5e-2 until session 10,
whose run of every GPU test passed at 1e-2 but for the whole sparse-attention models, tests/test_sparse_attention.py)
unless a phrase says otherwise.
"""

from __future__ import annotations

def default_bounds(test: str) -> str:
    """The default bounds, with padding, on the H200, checked by ``test`` (its file or node id)."""
    return f"float32 ≤ 1e-4 and bf16 ≤ 2e-2, with padding, H200 ({test})"


#: the bounds and the test of the HF relatives' and hybrids' every captured layer on CUDA
HF_VARIANTS = default_bounds("tests/test_hf_variants.py")
#: the bounds and the test of the older hybrids' every captured layer on CUDA (session 6)
HYBRIDS_ON_CUDA = (
    "every captured layer of the model, float32 ≤ 1e-4 and bf16 ≤ 2e-2, L = 80 with padding, H200 "
    "(tests/test_softmax.py::test_every_layer_of_the_hybrids_on_cuda)"
)
#: the kernels transformers 5.24 binds on CUDA when mamba-ssm, causal-conv1d and fla import (session 6)
KERNELS_5_24 = "the kernels transformers 5.24 binds on CUDA with mamba-ssm, causal-conv1d and fla installed"
#: both conv paths ran: sessions 4–5 without causal-conv1d, session 6 with it
BOTH_CONVS = "with causal-conv1d's CUDA conv (transformers 5.24) and without it (torch conv, transformers 5.17)"
#: only transformers 5.24 (session 6) has the model
ONLY_5_24 = "transformers 5.24 with causal-conv1d"
#: no GPU test builds this class
NO_GPU_TEST = "— (no GPU test of this class)"

