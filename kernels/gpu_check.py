"""Check and time every Triton kernel against its torch reference on a CUDA GPU; one script, < 5 min.

    python kernels/gpu_check.py [--quick] [--json out.json]      (from the repository root)

Needs torch (CUDA), triton, transformers and xxhash; kdn-hf need not be installed: run from a
checkout, the script puts the repository on ``sys.path`` and maps ``kdn_hf.kernels`` /
``kdn_hf.integrations`` to the top-level folders the way an install does (a finder placed after the
regular ones, so an installed kdn-hf is used as is). This is the script's own setup; the library
changes nothing on import.

What it checks (relative error = max |kernel - reference| / max |reference|, at most 1e-3 in
float32 and 1e-2 in bfloat16):

- ``rerotate``: rotate-half and interleaved, partial rotary, per-layer bases, per-chunk deltas,
  in place; timed on 32 layers x 8 kv heads x 8K tokens x 128.
- ``decode_rerotate_scatter``: int8 and int4 entries of 8K tokens x 32 layers x 8 kv heads x 128
  into a prompt buffer (and into SGLang-style pool slots, checked); timed against the torch path
  (target: >= 3x faster) and against a device-to-device copy of the same output bytes (target:
  within 2x).
- ``selected_attention``: 15% of 8K positions over the whole context, GQA 32/8 heads, with and
  without a sliding window; timed against SDPA with a mask and against torch's flex attention with
  the same mask function (the kernel is worth keeping only if it matches or beats flex).
- ``causal_attention``: flash-attn if installed, else SDPA, against SDPA with an explicit mask.

Timings are medians of CUDA-event measurements after warm-up. The table is printed last; the exit
status is 1 if a check fails (targets that are missed are reported, not failures).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MAPPED = {"kdn_hf.kernels": ROOT / "kernels", "kdn_hf.integrations": ROOT / "integrations"}


class _RepoLayout(importlib.abc.MetaPathFinder):
    """kdn_hf.kernels -> <repo>/kernels, kdn_hf.integrations -> <repo>/integrations (as installed)."""

    def find_spec(self, name, path=None, target=None):
        folder = _MAPPED.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _use_checkout() -> None:
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]  # kernels/ itself must not shadow top-level names
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.meta_path.append(_RepoLayout())


if __name__ == "__main__":
    _use_checkout()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ROWS: list[dict] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(op: str, case: str, dtype, err: float | None = None, ref_ms: float | None = None,
           kernel_ms: float | None = None, note: str = "") -> None:
    tol = TOL.get(dtype)
    ok = err is None or (err == err and err <= tol)  # NaN fails
    ROWS.append(dict(op=op, case=case, dtype=str(dtype).replace("torch.", ""), err=err, tol=tol, ok=ok,
                     ref_ms=ref_ms, kernel_ms=kernel_ms, note=note))
    err_s = "-" if err is None else f"{err:.2e}"
    print(f"  {'ok  ' if ok else 'FAIL'} {op} {case} {dtype}: err {err_s} {note}", flush=True)


def _inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def check_rerotate(quick: bool) -> None:
    from kdn_hf.kernels import rerotate

    dev = "cuda"
    print("rerotate", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for layout, D, rd in (("half", 128, 128), ("interleaved", 64, 64), ("half", 96, 32)):
            k = torch.randn(4, 8, 1000, D, device=dev).to(dtype)
            w = _inv_freq(rd)
            table = torch.stack([w, w / 8, torch.zeros_like(w), w * 0.5])
            delta = torch.cat([torch.full((n,), d) for n, d in ((300, 7), (450, 4000), (250, -12))]).to(dev)
            for name, freqs in (("one base", w), ("per-layer bases", table)):
                ref = rerotate(k, delta, freqs, layout=layout, backend="torch")
                got = rerotate(k, delta, freqs, layout=layout, backend="triton")
                record("rerotate", f"{layout} D={D} rotary={rd} {name}", dtype, rel_err(got, ref))
            inplace = k.clone()
            rerotate(inplace, 3000, w, layout=layout, out=inplace, backend="triton")
            record("rerotate", f"{layout} D={D} in place", dtype,
                   rel_err(inplace, rerotate(k, 3000, w, layout=layout, backend="torch")))
    L, T = (8, 2048) if quick else (32, 8192)
    k = torch.randn(L, 8, T, 128, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(k)
    w = _inv_freq(128)
    ref_ms = timed(lambda: rerotate(k, 1234, w, out=out, backend="torch"))
    ker_ms = timed(lambda: rerotate(k, 1234, w, out=out, backend="triton"))
    copy_ms = timed(lambda: out.copy_(k))
    record("rerotate", f"timing {L}x8x{T}x128", torch.bfloat16, None, ref_ms, ker_ms,
           f"copy of the same bytes {copy_ms:.3f} ms (kernel {ker_ms / copy_ms:.2f}x copy)")


def check_decode(quick: bool) -> None:
    from kdn_hf.codec import get_codec
    from kdn_hf.kernels import QuantKV, decode_rerotate_scatter

    dev = "cuda"
    print("decode_rerotate_scatter", flush=True)
    L, H, T, D = (8, 8, 2048, 128) if quick else (32, 8, 8192, 128)
    w = _inv_freq(D)
    for codec in ("int8", "int4"):
        for dtype in (torch.bfloat16, torch.float32):
            kv = (torch.randn(L, 2, H, T, D, device=dev) * 2).to(dtype)
            src = QuantKV.from_tensors(get_codec(codec).encode(kv), codec, dtype, kv.shape)
            del kv
            out = {b: torch.zeros(L, 2, H, T + 64, D, device=dev, dtype=dtype) for b in ("torch", "triton")}
            for b, buf in out.items():
                decode_rerotate_scatter(src, buf[:, 0], buf[:, 1], rows=64, delta=64, inv_freq=w, backend=b)
            record("decode_rerotate_scatter", f"{codec} prompt buffer", dtype,
                   rel_err(out["triton"], out["torch"]))
            slots = torch.randperm(T + 500, device=dev)[:T]
            pool = {b: (torch.zeros(T + 500, H, D, device=dev, dtype=dtype),
                        torch.zeros(T + 500, H, D, device=dev, dtype=dtype)) for b in ("torch", "triton")}
            for b, (kb, vb) in pool.items():
                decode_rerotate_scatter(src, kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], layers=(3, 4),
                                        rows=slots, delta=500, inv_freq=w, backend=b)
            record("decode_rerotate_scatter", f"{codec} pool slots (layer 3)", dtype,
                   max(rel_err(pool["triton"][0], pool["torch"][0]), rel_err(pool["triton"][1], pool["torch"][1])))
            if dtype != torch.bfloat16:
                del out, pool
                continue
            buf = out["triton"]
            ref_ms = timed(lambda: decode_rerotate_scatter(src, buf[:, 0], buf[:, 1], rows=64, delta=64,
                                                           inv_freq=w, backend="torch"), reps=10)
            ker_ms = timed(lambda: decode_rerotate_scatter(src, buf[:, 0], buf[:, 1], rows=64, delta=64,
                                                           inv_freq=w, backend="triton"))
            dst = buf[:, :, :, 64:]
            same_bytes = torch.empty_like(dst)
            copy_ms = timed(lambda: dst.copy_(same_bytes))
            speedup, vs_copy = ref_ms / ker_ms, ker_ms / copy_ms
            record("decode_rerotate_scatter", f"timing {codec} {T} tokens x {L} layers", dtype, None, ref_ms, ker_ms,
                   f"{speedup:.1f}x ref (target >= 3x: {'met' if speedup >= 3 else 'MISSED'}); "
                   f"copy {copy_ms:.3f} ms, kernel {vs_copy:.2f}x copy (target <= 2x: "
                   f"{'met' if vs_copy <= 2 else 'MISSED'})")
            del out, pool, buf, dst, same_bytes
        torch.cuda.empty_cache()


def _flex(q, k, v, q_pos, scale, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_pos[q_idx]
        seen = kv_idx <= p
        if window is not None:
            seen = seen & (kv_idx > p - window)
        return seen

    block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def check_attention(quick: bool) -> None:
    from kdn_hf.kernels import selected_attention

    dev = "cuda"
    print("selected_attention", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for B, Hq, Hkv, rows, keys, D, window in ((1, 4, 2, 9, 50, 19, None), (2, 8, 2, 300, 1500, 64, 256),
                                                  (1, 6, 6, 77, 700, 128, None)):
            q = torch.randn(B, Hq, rows, D, device=dev, dtype=dtype)
            k, v = (torch.randn(B, Hkv, keys, D, device=dev, dtype=dtype) for _ in range(2))
            q_pos = torch.randperm(keys, device=dev)[:rows].sort().values
            ref = selected_attention(q.float(), k.float(), v.float(), q_pos, window=window, backend="torch")
            got = selected_attention(q, k, v, q_pos, window=window, backend="triton")
            record("selected_attention", f"B{B} H{Hq}/{Hkv} rows {rows} keys {keys} D{D} window {window}",
                   dtype, rel_err(got, ref))
    keys = 2048 if quick else 8192
    rows = int(keys * 0.15)
    q = torch.randn(1, 32, rows, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, keys, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q_pos = torch.randperm(keys, device=dev)[:rows].sort().values
    for window in (None, 4096):
        ref_ms = timed(lambda: selected_attention(q, k, v, q_pos, window=window, backend="torch"))
        ker_ms = timed(lambda: selected_attention(q, k, v, q_pos, window=window, backend="triton"))
        note = f"{ref_ms / ker_ms:.1f}x SDPA+mask"
        try:
            flex = _flex(q, k, v, q_pos, 128 ** -0.5, window)
            flex_err = rel_err(flex(), selected_attention(q, k, v, q_pos, window=window, backend="torch"))
            flex_ms = timed(flex)
            verdict = "keep the kernel" if ker_ms <= flex_ms * 1.05 else "flex is faster: drop the kernel"
            note += f"; flex {flex_ms:.3f} ms (err vs ref {flex_err:.1e}): {verdict}"
        except Exception as e:  # flex needs a working torch.compile; report and go on
            note += f"; flex failed: {type(e).__name__}: {str(e)[:200]}"
        record("selected_attention", f"timing 15% of {keys} rows, H32/8 D128 window {window}", torch.bfloat16,
               None, ref_ms, ker_ms, note)


def check_causal() -> None:
    from kdn_hf.kernels import attention_backend, causal_attention, selected_attention

    print("causal_attention", flush=True)
    dev = "cuda"
    which = attention_backend(dev, torch.bfloat16)
    for rows, keys in ((512, 512), (37, 900)):
        q = torch.randn(1, 8, rows, 64, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, keys, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
        ref = selected_attention(q.float(), k.float(), v.float(), torch.arange(keys - rows, keys, device=dev),
                                 backend="torch")
        record("causal_attention", f"{which} rows {rows} keys {keys}", torch.bfloat16, rel_err(causal_attention(q, k, v), ref))


def print_table() -> None:
    print()
    head = f"{'op':24s} {'case':52s} {'dtype':8s} {'rel err':>9s} {'tol':>6s} {'ok':>4s} {'ref ms':>9s} {'kernel ms':>9s} {'speedup':>7s}  note"
    print(head)
    print("-" * len(head))
    for r in ROWS:
        err = "-" if r["err"] is None else f"{r['err']:.2e}"
        tol = "-" if r["err"] is None else f"{r['tol']:.0e}"
        ref = "-" if r["ref_ms"] is None else f"{r['ref_ms']:.3f}"
        ker = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.3f}"
        sp = "-" if r["ref_ms"] is None else f"{r['ref_ms'] / r['kernel_ms']:.1f}x"
        print(f"{r['op']:24s} {r['case'][:52]:52s} {r['dtype']:8s} {err:>9s} {tol:>6s} {'yes' if r['ok'] else 'NO':>4s} "
              f"{ref:>9s} {ker:>9s} {sp:>7s}  {r['note']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller timing shapes")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    from kdn_hf.kernels import describe

    if not torch.cuda.is_available():
        print(f"no CUDA device ({describe('cpu')}, kdn_hf.kernels from {Path(sys.modules['kdn_hf.kernels'].__file__).parent}): "
              "nothing to check; the CPU tests cover the kernels under TRITON_INTERPRET=1")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{describe('cuda')}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    for check in (check_rerotate, check_decode, check_attention):
        try:
            check(a.quick)
        except Exception as e:  # one broken op must not hide the others' results
            record(check.__name__.removeprefix("check_"), "crashed", None, float("nan"), note=f"{type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    try:
        check_causal()
    except Exception as e:
        record("causal_attention", "crashed", None, float("nan"), note=f"{type(e).__name__}: {e}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(ROWS, indent=1))
    print_table()
    return 0 if all(r["ok"] for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
