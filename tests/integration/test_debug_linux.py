"""Debugging Debian's kernel on the interpreter: gdb from the first instruction, coverage of one command.

One boot, in this process (``VM`` with ``[debug] gdb``, Debian's gdb in batch mode as a child):

1. the vCPU is held at the PVH entry; gdb breaks at the kernel's 64-bit entry (the vmlinux ELF's
   e_entry), continues to it, shows the backtrace, steps, and detaches: Linux boots on;
2. at the guest script's prompt the VM is paused and the syscall entry is read (MSR LSTAR); coverage
   is turned on around one console command, and the drcov file has blocks in that entry;
3. gdb attaches again, breaks at that address (a function found by address), a console command makes
   the guest take a syscall, gdb stops there with a backtrace, and detaches; the guest then ends.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import threading
import time

import pytest
from elftools.elf.elffile import ELFFile

from conftest import ASSETS
from drcov import read_drcov
from pyvmm import accel
from pyvmm.api import VM
from pyvmm.run.cpio import Cpio

pytestmark = pytest.mark.slow

GDB = shutil.which("gdb")
MSR_LSTAR = 0xC0000082
SCRIPT = r"""
echo "pyvmm-dbg: ready"
while read line; do
    case "$line" in
        run) ls /etc > /dev/null; echo "pyvmm-dbg: ran" ;;
        stop) break ;;
    esac
done
echo "pyvmm-dbg: stopped"
"""


def gdb(sock, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off", "-ex", f"target remote {sock}"]
    for command in commands:
        args += ["-ex", command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    return done.stdout + done.stderr


def test_gdb_and_coverage_on_debians_kernel(tmp_path):
    if GDB is None:
        pytest.skip("no gdb binary (Debian: apt-get install gdb)")
    for name in ("vmlinux", "initramfs.cpio.gz"):
        if not (ASSETS / name).exists():
            pytest.skip(f"{ASSETS / name} missing: run scripts/fetch-test-kernel")
    if not accel.probe("interp").usable:
        pytest.skip("the interpreter is not usable here")
    with open(ASSETS / "vmlinux", "rb") as f:
        entry = ELFFile(f).header["e_entry"]
    cpio = Cpio()
    cpio.file("etc/pyvmm/dbg.sh", SCRIPT.encode(), 0o755)
    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes((ASSETS / "initramfs.cpio.gz").read_bytes() + gzip.compress(cpio.finish(), mtime=0))
    sock = tmp_path / "gdb.sock"
    vm = VM.from_dict({
        "machine": {"memory_mib": 256, "accel": "interp"},
        "boot": {"kernel": str(ASSETS / "vmlinux"), "initrd": str(initrd),
                 "cmdline": "console=ttyS0 reboot=k panic=-1 pyvmm.cmd=dbg"},
        "debug": {"gdb": str(sock), "gdb_wait": True},
    })  # fmt: skip
    with vm:
        vm.start()
        # 1: from the first instruction to the kernel's 64-bit entry
        out = gdb(sock, ["info registers rip", f"hbreak *{entry:#x}", "continue", "info registers rip", "bt",
                         "stepi", "info registers rip", "delete", "detach"])  # fmt: skip
        rips = [int(r, 16) for r in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
        assert rips[0] != entry and rips[1] == entry and rips[2] != entry, out
        assert re.search(rf"#0\s+0x0*{entry:x} in \?\? \(\)", out), out
        vm.console.wait_for("pyvmm-dbg: ready", timeout=300)

        # 2: coverage of one command reaches the syscall entry
        vm.pause()
        lstar = vm.vcpu(0).msrs([MSR_LSTAR])[MSR_LSTAR]
        vm.resume()
        assert lstar >= 0xFFFF_FFFF_8000_0000
        vm.start_coverage(tmp_path / "command.drcov")
        vm.console.write("run\n")
        vm.console.wait_for("pyvmm-dbg: ran", timeout=120)
        blocks = vm.stop_coverage()
        modules, bbs = read_drcov(tmp_path / "command.drcov")
        base = int(modules[0]["base"], 16)
        in_entry = [b for b in bbs if b[2] == 0 and 0 <= base + b[0] - lstar < 0x100]
        assert blocks > 100 and in_entry, f"{blocks} blocks, none in the syscall entry at {lstar:#x}"

        # 3: a breakpoint at an address found at run time, hit by the guest's next system call
        typist = threading.Timer(3.0, vm.console.write, ("run\n",))
        typist.start()
        out = gdb(sock, [f"hbreak *{lstar:#x}", "continue", "info registers rip", "bt", "delete", "detach"])
        typist.join()
        assert re.search(rf"^rip\s+{lstar:#x}", out, re.M), out
        assert re.search(rf"#0\s+0x{lstar:016x} in \?\? \(\)", out), out
        vm.console.wait_for("pyvmm-dbg: ran", timeout=120)
        vm.console.write("stop\n")
        status = vm.wait(timeout=180)
        assert status is not None and status.code == 0, (status, vm.console.tail(2000))
