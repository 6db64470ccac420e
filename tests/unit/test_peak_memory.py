"""kdn_hf.bench.memory: the peak of live tensor memory during a block, on CPU (profiler accounting)."""

from __future__ import annotations

import torch

from kdn_hf.bench.memory import PeakMemory

MIB = 2**20
#: scalars the ops allocate on the side (the ``2`` of ``a * 2``: a few bytes)
SLACK = 4096


def test_peak_counts_tensors_live_at_once_not_their_sum():
    with PeakMemory("cpu") as peak:
        a = torch.ones(4 * MIB // 4)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # 8 MiB live again: the peak stays 8 MiB
        del b, c
    assert peak.method == "cpu_profiler"
    assert 8 * MIB <= peak.bytes <= 8 * MIB + SLACK


def test_peak_is_growth_over_what_lived_before_and_repeats():
    keep = torch.ones(16 * MIB // 4)  # allocated before the block: not counted
    sizes = []
    for _ in range(2):  # memory an earlier block freed is no discount for the next one
        with PeakMemory("cpu") as peak:
            x = torch.empty(3 * MIB // 4)
            del x
        sizes.append(peak.bytes)
    assert all(3 * MIB <= s <= 3 * MIB + SLACK for s in sizes)
    assert keep.numel() > 0
