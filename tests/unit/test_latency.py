"""Exit-handling latency histograms (vmm/latency.py) and the run loop's inlined bucket arithmetic."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.accel.core import IoIn, IoOut, SystemEvent
from pyvmm.vmm.bus import MmioBus, PioBus
from pyvmm.vmm.latency import bucket_bounds, bucket_of, new_histogram, summary
from pyvmm.vmm.vcpu import Lifecycle, VcpuLoop


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_every_duration_falls_inside_its_bucket_and_buckets_are_a_quarter_octave(ns):
    low, high = bucket_bounds(bucket_of(ns))
    assert low <= ns < high
    if ns >= 8:
        assert (high - low) * 4 <= low  # percentiles read from a bucket are within 25%


def test_summary_reads_percentiles_as_bucket_upper_bounds():
    histogram = new_histogram()
    for ns in [1000] * 50 + [2000] * 40 + [9000] * 9 + [100_000]:
        histogram[bucket_of(ns)] += 1
    out = summary(histogram)
    assert out["count"] == 100
    assert out["p50_us"] == bucket_bounds(bucket_of(1000))[1] / 1000
    assert out["p90_us"] == bucket_bounds(bucket_of(2000))[1] / 1000
    assert out["p99_us"] == bucket_bounds(bucket_of(9000))[1] / 1000
    assert 100 <= out["max_us"] <= 125
    assert summary(new_histogram()) is None


class ScriptedVcpu:
    """A vCPU whose exits come from a list; the last one ends the loop."""

    index = 0

    def __init__(self, exits):
        self.exits = list(exits)

    def run(self):
        return self.exits.pop(0)

    def request_stop(self):
        pass


class SlowPort:
    def __init__(self, seconds):
        self.seconds = seconds

    def write(self, offset, data):
        time.sleep(self.seconds)

    def read(self, offset, data):
        data[:] = b"\0" * len(data)


def test_the_run_loop_records_each_served_exit_in_its_kinds_histogram():
    pio = PioBus()
    pio.insert(SlowPort(0.004), 0x80, 1)
    exits = [IoOut(0x80, b"x")] * 3 + [IoIn(0x80, memoryview(bytearray(1)))] * 5 + [SystemEvent("reset")]
    loop = VcpuLoop(ScriptedVcpu(exits), pio, MmioBus(), Lifecycle())
    loop.run()
    out = summary(loop.exit_latency[IoOut])
    assert out["count"] == 3 and out["p50_us"] >= 4000  # each write slept 4 ms
    for bucket in (i for i, n in enumerate(loop.exit_latency[IoOut]) if n):
        low, high = bucket_bounds(bucket)  # the loop's inlined arithmetic put it where bucket_of would
        assert 4_000_000 < high and low < 400_000_000
    assert summary(loop.exit_latency[IoIn])["count"] == 5
    assert summary(loop.exit_latency[IoIn])["max_us"] < 4000
