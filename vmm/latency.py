"""Exit-handling latency histograms: how long the VMM took to serve each I/O exit.

One histogram per exit kind per vCPU, filled on the vCPU thread with no lock
(a list of counters; readers tolerate a count in flight). A duration of ``ns``
nanoseconds falls in a quarter-octave bucket: its power of two (``bit_length``)
and the two bits below the leading one, so a bucket spans at most 25% of its
lower bound and percentiles read from it are within that. The run loop inlines
``bucket_of`` (it runs for every exit); ``test_latency.py`` checks the two agree.
"""

from __future__ import annotations

#: bucket indices reach (64 << 2) for durations below 2^64 ns
BUCKETS = 64 << 2


def new_histogram() -> list[int]:
    return [0] * BUCKETS


def bucket_of(ns: int) -> int:
    bits = ns.bit_length()
    return bits << 2 | (ns >> (bits - 3) & 3) if bits > 3 else bits << 2


def bucket_bounds(index: int) -> tuple[int, int]:
    """The durations ``[low, high)`` in ns that land in bucket ``index``."""
    bits, quarter = index >> 2, index & 3
    if bits <= 3:
        low = 0 if bits == 0 else 1 << (bits - 1)
        return low, 1 << bits
    step = 1 << (bits - 3)
    low = (1 << (bits - 1)) + quarter * step
    return low, low + step


def summary(histogram: list[int], percentiles=(50, 90, 99)) -> dict | None:
    """Count, the given percentiles and the maximum in microseconds (each the upper bound of its
    bucket, so never an underestimate); None when nothing was recorded."""
    total = sum(histogram)
    if not total:
        return None
    out: dict = {"count": total}
    wanted = sorted(percentiles)
    seen, index = 0, 0
    for bucket, n in enumerate(histogram):
        if not n:
            continue
        seen += n
        while index < len(wanted) and seen * 100 >= wanted[index] * total:
            out[f"p{wanted[index]}_us"] = round(bucket_bounds(bucket)[1] / 1000, 3)
            index += 1
        out["max_us"] = round(bucket_bounds(bucket)[1] / 1000, 3)
    return out
