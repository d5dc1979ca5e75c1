"""A long input: what does the last token read, 16k tokens back? Rows and maps without an L × L × C tensor.

    python examples/long_document.py                  # L = 8192
    python examples/long_document.py --length 16384
    python examples/long_document.py --smoke          # L = 512

A tiny random HF Mamba reads a long sequence. The last token's row of
implicit attention (``ImplicitAttention`` / ``LayerAttention.row``) costs O(C·L) memory; a whole
channel-averaged map ``aggregate()`` costs its (L, L) result plus one tile. The dense (C, L, L) tensor
is never built (it would need C·L²·4 bytes; the script prints how much).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers as tf

import captum_implicit as ci


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CAPTUM_IMPLICIT_SMOKE") == "1")
    args = p.parse_args()
    length = 512 if args.smoke else args.length

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=64))
    model.eval()
    ids = torch.randint(1, 64, (1, length))

    t = time.perf_counter()
    layers = ci.implicit_attention(model, ids)
    print(f"L = {length}: captured {len(layers)} layers in {time.perf_counter() - t:.1f} s "
          f"(a dense (C, L, L) float32 tensor per layer would be "
          f"{layers[0].num_channels * length * length * 4 / 2**20:,.0f} MiB)")

    for la in layers:
        t = time.perf_counter()
        row = la.row(length - 1, reduce="abs_mean")[0]          # (L,): what the last token reads
        far = float(row[: length // 2].sum() / row.sum())
        recent = row.topk(5).indices.sort().values.tolist()
        print(f"{la.name}: last-token row in {time.perf_counter() - t:.2f} s; share of |A| on the first half "
              f"{far:.2e}; largest entries at {recent}")

    # the same row as a Captum attribution (last layer, last token)
    rel = ci.ImplicitAttention(model).attribute(ids, reduce="abs_mean")[0]
    assert torch.allclose(rel, layers[-1].row(length - 1, reduce="abs_mean")[0], rtol=1e-5, atol=1e-12)

    # a whole map, tile by tile: its (L, L) result plus one tile at a time
    size = min(length, 1024)
    t = time.perf_counter()
    with ci.blockwise(tile=256):
        maps = ci.implicit_attention(model, ids[:, :size])[0].aggregate("abs_mean")
    print(f"aggregate() of the first {size} tokens: {tuple(maps.shape)} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
