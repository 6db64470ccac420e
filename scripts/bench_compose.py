"""CPU timing of the layer-wise composer on int8 / int4 entries: the codec path (the codec's
per-layer decoder + ``rerotate``, what CPU runs) against the fused ``decode_rerotate_scatter``
path (what CUDA runs; its torch backend here), on a SmolLM2-135M-shaped prompt of random KV.
The two alternate; median of ``--reps``. Checks they write the same bytes first.

    python scripts/bench_compose.py [--reps 25] [--threads 1] [--repeat]

``--repeat`` places the first chunk a second time at the end (a chunk used twice in one prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from kdn_hf.delivery import LayerSource, LayerwiseComposer
from kdn_hf.kv import ChunkKV
from kdn_hf.rope import RopeFrequencies, RopeSpec
from kdn_hf.store.entry import encode_entry, open_entry

L, H, D = 30, 3, 64  # SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64, RoPE theta 100000


def sources(codec: str, chunks: int, tokens: int, dtype: torch.dtype, repeat: bool) -> list[LayerSource]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(chunks):
        kv = torch.randn(L, 2, H, tokens, D, generator=g).to(dtype)
        pos = torch.arange(tokens)  # each computed on its own: every chunk but the first moves
        chunk = ChunkKV(kv=kv, positions=pos, token_ids=torch.arange(tokens), meta={})
        e = open_entry(encode_entry(f"k{i}", chunk, "fp", codec), key=f"k{i}", fingerprint="fp")
        e.prepare_layers()  # done on the loader's thread in the engine
        out.append(LayerSource(f"k{i}", e.layers, pos, i * tokens))
    if repeat:
        out.append(dataclasses.replace(out[0], at=chunks * tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--repeat", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = 1.0 / 100000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    spec = RopeSpec((RopeFrequencies(w, "default"),), (0,) * L, D, D)
    dtype = torch.bfloat16
    slots = (a.chunks + a.repeat) * a.tokens

    def compose(srcs, fused: bool):
        out = torch.empty(L, 2, H, slots, D, dtype=dtype)
        t = time.perf_counter()
        with LayerwiseComposer(out, srcs, spec, fused=fused) as c:
            c.wait_all()
        return time.perf_counter() - t, out

    print(f"{L} layers, {H} kv heads, head_dim {D}, {a.chunks} x {a.tokens} tokens"
          f"{' + chunk 0 again' if a.repeat else ''}, bf16, {a.threads} thread(s), median of {a.reps}")
    print(f"{'codec':6s} {'codec path ms':>14s} {'fused ms':>9s} {'ratio':>6s}")
    for codec in ("int4", "int8"):
        srcs = sources(codec, a.chunks, a.tokens, dtype, a.repeat)
        if not torch.equal(compose(srcs, False)[1].view(torch.int16), compose(srcs, True)[1].view(torch.int16)):
            raise SystemExit(f"{codec}: the fused path wrote other bytes than the codec path")
        old, new = [], []
        for _ in range(a.reps):
            old.append(compose(srcs, False)[0])
            new.append(compose(srcs, True)[0])
        mo, mn = statistics.median(old) * 1e3, statistics.median(new) * 1e3
        print(f"{codec:6s} {mo:14.1f} {mn:9.1f} {mn / mo:6.2f}")


if __name__ == "__main__":
    main()
