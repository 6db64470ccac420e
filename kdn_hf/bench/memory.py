"""Peak memory of one request, as the bench reports it next to TTFT.

    with PeakMemory(device) as peak:
        kdn.generate(...)
    peak.bytes            # peak growth of live tensor memory over the start of the block

- CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at the start (the
  allocator's own count: exact for tensors, blind to the CUDA context and cuBLAS workspaces).
- CPU: torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see it; the
  process RSS is no measure either (glibc keeps freed blocks, so a request reuses what an earlier
  one left, and fixing its thresholds with ``mallopt`` slows every later request). So the block
  runs under ``torch.profiler`` with ``profile_memory``: every op's own allocations and frees
  (and frees outside ops) are put in time order and summed; the peak of that running sum is the
  peak growth of live tensor memory. Two limits: what an op allocates and frees inside itself
  nets out (its scratch buffers do not show), and only the calling thread is seen (the
  layer-wise composer's thread decodes one chunk layer at a time, a few hundred KiB for
  SmolLM2; the buffer it writes into is allocated by the calling thread and counted).

Run it around an untimed request: the profiler slows the request down.
"""

from __future__ import annotations

import torch


def peak_from_events(events) -> int:
    """Peak of the running sum of the allocations (+) and frees (-) of ``events`` (the profiler's
    FunctionEvents with ``profile_memory``) in time order: bytes >= 0."""
    timeline = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in timeline:
        live += delta
        peak = max(peak, live)
    return peak


class PeakMemory:
    """Peak growth of live tensor memory during a ``with`` block on ``device`` (see the module docstring).

    bytes: int (>= 0) after the block. method: "cuda_allocator" or "cpu_profiler".
    """

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.method = "cuda_allocator" if self.device.type == "cuda" else "cpu_profiler"
        self._base = 0
        self._prof = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.bytes = peak_from_events(self._prof.events())
