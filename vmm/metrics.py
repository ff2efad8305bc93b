"""Metrics of a running machine as one JSON object (Firecracker writes one per line to its metrics file).

Per vCPU: exits by kind, and for the I/O exits the time the VMM took to serve them
(count, p50/p90/p99 and max in µs, from vmm/latency.py's histograms). Per virtio
device: requests, bytes, errors, resets (the transport's counters). Interpreter
fallbacks by instruction. The process: RSS and CPU seconds (psutil).
"""

from __future__ import annotations

import json
import threading
import time

import psutil

from pyvmm.vmm.latency import summary


def machine_metrics(machine) -> dict:
    process = psutil.Process()
    cpu = process.cpu_times()
    out = {
        "utc_timestamp_ms": int(time.time() * 1000),
        "vcpus": {f"vcpu{loop.vcpu.index}": _vcpu_metrics(loop) for loop in machine.loops},
        "devices": machine.device_metrics(),
        "process": {"rss_bytes": process.memory_info().rss, "cpu_user_s": round(cpu.user, 3),
                    "cpu_system_s": round(cpu.system, 3), "threads": process.num_threads()},  # fmt: skip
    }
    if machine.fallback is not None:
        out["fallbacks"] = machine.fallback.counts()
    return out


def _vcpu_metrics(loop) -> dict:
    """``exits``: counts by kind; ``latency``: per served I/O exit kind, its summary."""
    exits = {kind.__name__: count for kind, count in sorted(loop.exit_counts.items(), key=lambda kv: kv[0].__name__)}
    latency = {kind.__name__: figures for kind, histogram in loop.exit_latency.items()
               if (figures := summary(list(histogram))) is not None}  # fmt: skip
    return {"exits": exits, "latency": latency}


class MetricsWriter:
    """Appends ``machine_metrics`` as a JSON line to ``path``: on ``flush()`` and every ``interval`` s."""

    def __init__(self, path, machine_of, interval: float = 60.0):
        self.path, self.machine_of, self.interval = path, machine_of, interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._periodic, name="metrics", daemon=True)
        self._thread.start()

    def flush(self) -> dict | None:
        machine = self.machine_of()
        if machine is None:
            return None
        record = machine_metrics(machine)
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return record

    def _periodic(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
