#!/usr/bin/env python3
"""Boot time of stock Linux on pyvmm's interpreter vs QEMU's TCG, in the same run.

Both boot Debian's cloud kernel (the ELF vmlinux through PVH) with the test
busybox initramfs, whose init runs `pyvmm.cmd=hello` and `reboot -f`.
Measured per boot: wall time from process start to the "Run /init" line
(init reached) and to the process end. Rounds alternate pyvmm and QEMU so
outside load hits both alike. A boot that does not finish within --timeout
is counted as a hang (QEMU's TCG hung at TSC calibration in 5 of 7 boots on
these machines).

Also prints the interpreter's guest instructions per second on a tight loop.

    python3 benchmarks/boot_interp.py [--rounds 3] [--timeout 120]
Needs tests/assets (scripts/fetch-test-kernel); QEMU from Debian's qemu-system-x86.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("PYVMM_TEST_ASSETS", ROOT / "tests" / "assets"))
CMDLINE = "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=hello"
sys.path.insert(0, str(ROOT / "tests"))


def timed_boot(command: list[str], timeout: float) -> tuple[float | None, float | None, str]:
    """(seconds to 'Run /init', seconds to exit, output); None where it did not get there."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    init_at = None
    output = bytearray()
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        chunk = proc.stdout.read()
        if chunk:
            output += chunk
            if init_at is None and b"Run /init as init process" in output:
                init_at = time.perf_counter() - start
        if proc.poll() is not None:
            rest = proc.stdout.read()
            if rest:
                output += rest
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
            proc.wait()
            return init_at, None, output.decode("latin1")
        time.sleep(0.005)
    ok = proc.returncode == 0 and b"pyvmm-init: done" in output
    return init_at, (time.perf_counter() - start) if ok else None, output.decode("latin1")


def pyvmm_command(workdir: Path) -> list[str]:
    config = workdir / "linux.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 256\naccel = "interp"\n'
        f'[boot]\nkernel = "{ASSETS / "vmlinux"}"\ninitrd = "{ASSETS / "initramfs.cpio.gz"}"\ncmdline = "{CMDLINE}"\n'
    )
    return [sys.executable, "-m", "pyvmm", "boot", str(config)]


def qemu_command() -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return [
        qemu, "-accel", "tcg", "-M", "microvm", "-cpu", "max", "-m", "256", "-smp", "1",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-net", "none",
        "-kernel", str(ASSETS / "vmlinux"), "-initrd", str(ASSETS / "initramfs.cpio.gz"), "-append", CMDLINE,
    ]  # fmt: skip


def interp_instructions_per_second(iterations: int = 20_000_000) -> float:
    """Guest instructions/s of the interpreter on a CPL0 `dec ecx; jnz` loop (2 instructions per iteration)."""
    from elfgen import OUT_F4_AL, mov_al, pvh_elf

    from pyvmm.api import VM

    code = b"\xb9" + struct.pack("<I", iterations) + b"\x49\x75\xfd" + mov_al(0) + OUT_F4_AL
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "loop.elf"
        kernel.write_bytes(pvh_elf(code))
        vm = VM.from_dict({"machine": {"memory_mib": 16, "accel": "interp"}, "boot": {"kernel": str(kernel)}})
        with vm:
            vm.machine  # build outside the timed part
            start = time.perf_counter()
            status = vm.run(timeout=300)
            elapsed = time.perf_counter() - start
        assert status.code == 0, status
    return 2 * iterations / elapsed


def summary(name: str, results: list[tuple[float | None, float | None]]) -> tuple[float | None, str]:
    inits = [r[0] for r in results if r[0] is not None and r[1] is not None]
    ends = [r[1] for r in results if r[1] is not None]
    hangs = len(results) - len(ends)
    if not ends:
        return None, f"{name:10} no boot finished ({hangs} of {len(results)} hung or failed)"
    init_median = statistics.median(inits)
    return init_median, (
        f"{name:10} to init: median {init_median:6.2f} s (best {min(inits):6.2f}); "
        f"to exit: median {statistics.median(ends):6.2f} s; hangs/failures: {hangs} of {len(results)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a boot counts as hung")
    args = parser.parse_args()
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            print(f"boot_interp: skipped: {ASSETS / name} missing (run scripts/fetch-test-kernel)")
            return 0
    qemu = qemu_command()
    if qemu is None:
        print("QEMU reference: skipped (install Debian's qemu-system-x86 for qemu-system-x86_64)")
    pyvmm_results, qemu_results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pyvmm = pyvmm_command(Path(tmp))
        for _ in range(args.rounds):
            init_at, end_at, out = timed_boot(pyvmm, args.timeout)
            pyvmm_results.append((init_at, end_at))
            if end_at is None:
                print(f"pyvmm boot did not finish; tail: {out[-500:]!r}")
            if qemu:
                init_at, end_at, _ = timed_boot(qemu, args.timeout)
                qemu_results.append((init_at, end_at))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; Debian {(ASSETS / 'kernel-version').read_text().strip()}")
    py_init, line = summary("pyvmm", pyvmm_results)
    print(line)
    if qemu:
        qemu_init, line = summary("QEMU TCG", qemu_results)
        print(line)
        if py_init is not None and qemu_init is not None:
            ratio = py_init / qemu_init
            verdict = "meets target 1.5x" if ratio <= 1.5 else ("within limit 3x" if ratio <= 3 else "OVER LIMIT 3x")
            print(f"ratio pyvmm/QEMU to init: {ratio:.2f}x ({verdict})")
    print(f"interpreter: {interp_instructions_per_second() / 1e6:.0f} M guest instructions/s (CPL0 dec/jnz loop)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
