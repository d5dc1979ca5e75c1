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

    def budget(self, device: "torch.device | str") -> int:
        return self.max_block_elements_cuda if str(device).startswith("cuda") else self.max_block_elements


config = Config()


@contextmanager
def blockwise(
    tile: int | None = None, max_block_elements: int | None = None, triton: bool | None = None
) -> Iterator[Config]:
    """Temporarily change the tile size / block budget / kernel choice::

        with captum_implicit.config.blockwise(tile=128):
            attn.aggregate()
        with captum_implicit.config.blockwise(triton=False):  # torch reference path only
            attn.dense()
    """
    old = (config.tile, config.max_block_elements, config.max_block_elements_cuda, config.triton)
    try:
        if tile is not None:
            config.tile = int(tile)
        if max_block_elements is not None:
            config.max_block_elements = config.max_block_elements_cuda = int(max_block_elements)
        if triton is not None:
            config.triton = bool(triton)
        yield config
    finally:
        config.tile, config.max_block_elements, config.max_block_elements_cuda, config.triton = old
