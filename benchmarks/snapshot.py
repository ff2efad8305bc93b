#!/usr/bin/env python3
"""Snapshot create and restore latency, against floors measured in the same run.

For each backend and guest size (the counter guest, 2 vCPUs, ``cpu = "portable"``):

* create (Full): ``vm.snapshot`` of the paused VM; the floor is writing the same
  number of bytes to a file and fsyncing it, which every Full snapshot must do;
* restore: from the load call to the guest's first instruction (``VM.restore`` with
  resume, until the last vCPU thread leaves its park for the guest; the guest's
  counter must then move); the floor is mapping the memory file and reading the
  state file, which every restore must do.

Firecracker's published figures for reference (its performance tests, 2 vCPUs and
256 MiB): create Full ~180 ms, Diff ~70 ms; restore: a few ms. The target here is
restore under 10 ms for a 128 MiB guest.

    python3 benchmarks/snapshot.py [--sizes 128,512] [--backends interp,kvm] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "tests" / "guests" / "counter.elf"


def floor_write(path: Path, size: int) -> float:
    chunk = bytes(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as out:
        for _ in range(size >> 20):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start


def floor_map(state: Path, mem: Path) -> float:
    start = time.perf_counter()
    state.read_bytes()
    with open(mem, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[0:1]
    elapsed = time.perf_counter() - start
    m.close()
    return elapsed


def one_round(backend: str, size_mib: int, work: Path) -> tuple[float, float, float, float]:
    from pyvmm.api import VM

    vm = VM.from_dict({"machine": {"vcpus": 2, "memory_mib": size_mib, "accel": backend, "cpu": "portable"},
                       "boot": {"kernel": str(COUNTER), "cmdline": "console=ttyS0"}})  # fmt: skip
    try:
        vm.start()
        vm.console.wait_for("counter: start", timeout=60)
        vm.pause()
        start = time.perf_counter()
        vm.snapshot(work / "vm.snap", work / "vm.mem")
        create = time.perf_counter() - start
    finally:
        vm.close()
    write_floor = floor_write(work / "floor.bin", size_mib << 20)
    map_floor = floor_map(work / "vm.snap", work / "vm.mem")
    start = time.perf_counter()
    vm = VM.restore(work / "vm.snap", work / "vm.mem", accel=backend, resume=True)
    try:
        # Restore latency ends when the last vCPU leaves its park for the guest (its next step is
        # the guest's instruction). Polling sleeps, so this thread does not hold the GIL the vCPU
        # threads need; the counter moving proves the guest really runs.
        loops = vm.machine.loops
        while not all(loop.resumed_at and loop.resumed_at > start for loop in loops):
            time.sleep(0.0001)
        restore = max(loop.resumed_at for loop in loops) - start
        memory = vm.machine.memory
        held = memory.read_int(0x7000, 4)
        deadline = time.monotonic() + 10
        while memory.read_int(0x7000, 4) == held:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the restored {backend} guest does not run")
            time.sleep(0.0005)
    finally:
        vm.close()
    return create, write_floor, restore, map_floor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--backends", default="interp,kvm")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from pyvmm import accel

    print(f"{'backend':8} {'MiB':>5} {'create ms':>10} {'write floor':>12} {'ratio':>6} {'restore ms':>11} "
          f"{'map floor':>10} {'ratio':>6}")  # fmt: skip
    for backend in args.backends.split(","):
        probe = accel.probe(backend)
        if not probe.usable:
            print(f"{backend}: skipped ({probe.reason})")
            continue
        for size in (int(s) for s in args.sizes.split(",")):
            results = []
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
                for _ in range(args.rounds):
                    results.append(one_round(backend, size, Path(tmp)))
            create, floor_w, restore, floor_m = (statistics.median(r[i] for r in results) for i in range(4))
            print(f"{backend:8} {size:>5} {create * 1e3:>10.1f} {floor_w * 1e3:>12.1f} {create / floor_w:>6.2f} "
                  f"{restore * 1e3:>11.1f} {floor_m * 1e3:>10.2f} {restore / floor_m:>6.0f}")  # fmt: skip
    print("reference (Firecracker's tests, 2 vCPUs, 256 MiB): create Full ~180 ms, Diff ~70 ms; target here: "
          "restore < 10 ms at 128 MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
