"""Global knobs for blockwise computation (memory vs. speed)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Config:
    """Tile size and per-block element budget used by :mod:`captum_implicit.ops`.

    ``tile`` is the side of the square ``(rows, cols)`` tiles that every reduction
    walks; ``max_block_elements`` caps ``batch × channels × rows × cols`` of one
    block (times a family's cost factor, e.g. the SSM state size), which bounds
    peak memory independently of the channel count.
    """

    tile: int = 256
    max_block_elements: int = 1 << 22
    #: GPUs have the memory and want fewer, larger launches
    max_block_elements_cuda: int = 1 << 27
    #: use the fused Triton kernels (``captum_implicit.ops.*_triton``) where they apply (CUDA, float32);
    #: ``False`` forces the torch reference path everywhere
    triton: bool = True
    #: products inside the Triton kernels: ``"float32"`` (three TF32 tensor-core products that recover float32
    #: accuracy: ≈4e-7 relative) or ``"tf32"`` (one TF32 product, operands with 10 mantissa bits: ``Ā`` about twice
    #: as fast on an H200; off the torch path by up to ≈1e-3 of the largest entry in ``dense()`` or a sum over few
    #: channels, ≈5e-6 in the Ā of a 1536-channel layer). Accumulation is float32 either way
    precision: str = "float32"

    def budget(self, device: "torch.device | str") -> int:
        return self.max_block_elements_cuda if str(device).startswith("cuda") else self.max_block_elements


config = Config()
PRECISIONS = ("float32", "tf32")


@contextmanager
def blockwise(
    tile: int | None = None,
    max_block_elements: int | None = None,
    triton: bool | None = None,
    precision: str | None = None,
) -> Iterator[Config]:
    """Temporarily change the tile size / block budget / kernel choice / kernel precision::

        with captum_implicit.config.blockwise(tile=128):
            attn.aggregate()
        with captum_implicit.config.blockwise(triton=False):  # torch reference path only
            attn.dense()
        with captum_implicit.config.blockwise(precision="tf32"):  # faster kernels, TF32 accuracy
            explainer.attribute(ids, target=5)
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    old = (config.tile, config.max_block_elements, config.max_block_elements_cuda, config.triton, config.precision)
    try:
        if tile is not None:
            config.tile = int(tile)
        if max_block_elements is not None:
            config.max_block_elements = config.max_block_elements_cuda = int(max_block_elements)
        if triton is not None:
            config.triton = bool(triton)
        if precision is not None:
            config.precision = precision
        yield config
    finally:
        config.tile, config.max_block_elements, config.max_block_elements_cuda, config.triton, config.precision = old
