"""CPU micro-benchmark: the kernels' torch path against what kdn_hf used before it.

Re-rotating one layer of a chunk into the prompt buffer, ``kdn_hf.kernels.rerotate(backend="torch")``
vs ``kdn_hf.rope.rerotate_layer`` (same math; the wrapper adds validation and dispatch), and the
int8 / int4 decode + re-rotate + write of one layer, ``decode_rerotate_scatter(backend="torch")`` vs
the codec's per-layer decoder + ``rerotate_layer`` + copy (what the layer-wise composer does now).
The two sides alternate, median of ``--reps`` rounds; prints a table.

    python -m kdn_hf.kernels.bench_cpu [--tokens 512] [--heads 3] [--head-dim 64] [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdn_hf.codec import get_codec, layer_decoder
from kdn_hf.kernels import QuantKV, decode_rerotate_scatter, rerotate
from kdn_hf.rope import RopeFrequencies, RopeSpec, rerotate_layer


def _median_us(fns, reps: int) -> list[float]:
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):  # alternate, so load on a shared machine hits both sides alike
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e6 for t in times]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    H, T, D = a.heads, a.tokens, a.head_dim
    w = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    spec = RopeSpec((RopeFrequencies(w, "default"),), (0,), D, D)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(H, T, D).to(dtype)
        buf = torch.empty(H, T + 100, D, dtype=dtype)
        dst = buf[:, 100:]
        per_token = torch.arange(T) // 64 * 7 + 100
        for name, delta in (("one delta", 100), ("per-token deltas", per_token)):
            old, new = _median_us([lambda: rerotate_layer(k, delta, spec, 0, out=dst),
                                   lambda: rerotate(k, delta, w, out=dst, backend="torch")], a.reps)
            rows.append((f"rerotate {dtype} {name}", old, new))
        for codec in ("int8", "int4"):
            kv = torch.randn(1, 2, H, T, D).to(dtype)
            tensors = get_codec(codec).encode(kv)
            src = QuantKV.from_tensors(tensors, codec, dtype, kv.shape)
            decode_range = layer_decoder(get_codec(codec), tensors, dtype, tuple(kv.shape))
            out = torch.empty(1, 2, H, T + 100, D, dtype=dtype)

            def before():
                layer = decode_range(0, 1)[0]
                rerotate_layer(layer[0], 100, spec, 0, out=out[0, 0, :, 100:])
                out[0, 1, :, 100:].copy_(layer[1])

            def after():
                decode_rerotate_scatter(src, out[:, 0], out[:, 1], rows=100, delta=100, inv_freq=w, backend="torch")

            old, new = _median_us([before, after], a.reps)
            rows.append((f"decode+rerotate+write {codec} {dtype}", old, new))
    print(f"one layer, K [{H}, {T}, {D}], {a.threads} thread(s), median of {a.reps}")
    print(f"{'case':44s} {'before us':>10s} {'kernels us':>10s} {'ratio':>6s}")
    for name, old, new in rows:
        print(f"{name:44s} {old:10.1f} {new:10.1f} {new / old:6.2f}")


if __name__ == "__main__":
    main()
