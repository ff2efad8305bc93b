"""Debian's gdb in batch mode against ``pyvmm boot --gdb`` with our test guests, on KVM and the interpreter.

Our guests are 32-bit ELFs entered through PVH, while the stub describes an x86-64 target (as QEMU
does): gdb takes the guest's symbols with ``symbol-file`` once connected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import GUESTS
from pyvmm import accel

GDB = shutil.which("gdb")
pytestmark = pytest.mark.skipif(GDB is None, reason="no gdb binary (Debian: apt-get install gdb)")

# exitcode.elf, from its disassembly: main's last two instructions
EXITCODE_STATUS = 0x100073  # mov %ebx, %eax (the status it returns)
COUNTER = 0x7000


@pytest.fixture(params=["interp", "kvm"])
def accel_name(request):
    probe = accel.probe(request.param)
    if not probe.usable:
        pytest.skip(f"{request.param} not usable here: {probe.reason}")
    return request.param


def boot_with_gdb(tmp_path, accel_name, guest, *, vcpus=1, cmdline="console=ttyS0"):
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nvcpus = {vcpus}\nmemory_mib = 64\naccel = "{accel_name}"\n'
                      f'[boot]\nkernel = "{GUESTS / guest}"\ncmdline = "{cmdline}"\n')  # fmt: skip
    sock = tmp_path / "gdb.sock"
    child = subprocess.Popen([sys.executable, "-m", "pyvmm", "boot", str(config), "--gdb", str(sock), "--gdb-wait"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert child.poll() is None, child.communicate()[1].decode()
        assert time.monotonic() < deadline, "the gdb socket did not appear"
        time.sleep(0.05)
    return child, sock


def gdb(sock, guest, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off", "-ex", f"target remote {sock}",
            "-ex", f"symbol-file {GUESTS / guest}"]  # fmt: skip
    for command in commands:
        args += ["-ex", command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def finish(child) -> tuple[int, str]:
    out, err = child.communicate(timeout=60)
    return child.returncode, out.decode() + err.decode()


def test_break_at_a_symbol_step_set_a_register_and_detach(tmp_path, accel_name):
    child, sock = boot_with_gdb(tmp_path, accel_name, "exitcode.elf", cmdline="console=ttyS0 exit=5")
    try:
        out = gdb(sock, "exitcode.elf", [
            "info registers rip",  # held before the first instruction: the PVH entry
            "break main", "continue", "info registers rip", "x/8i $pc",
            "stepi", "info registers rip", "stepi", "info registers rip", "stepi", "info registers rip",
            "delete", f"break *{EXITCODE_STATUS:#x}", "continue", "info registers rip",
            "set $rbx = 42", "detach",
        ])  # fmt: skip
    finally:
        status, console = finish(child)
    assert "rip            0x100000" in out, out  # pvh_start
    assert "Breakpoint 1, 0x0000000000100039 in main ()" in out, out
    assert re.search(r"=> 0x100039 <main>:\s+call\s+0x1001b3 <check_start_info>", out), out
    assert len(re.findall(r"^   0x[0-9a-f]+ <[a-z_+0-9]+>:", out, re.M)) >= 7  # x/8i: the other seven
    rips = [int(r, 16) for r in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert rips[:2] == [0x100000, 0x100039], out
    assert rips[2:5] == [0x1001B3, 0x1001B4, 0x1001B5], out  # into check_start_info, one instruction at a time
    assert rips[5] == EXITCODE_STATUS, out
    assert "[Inferior 1 (Remote target) detached]" in out, out
    assert status == 42, console  # the register gdb set is the guest's exit status
    assert "exit: 5" in console


def test_a_hardware_watchpoint_triggers_on_a_store(tmp_path, accel_name):
    if accel_name == "kvm" and __import__("os").path.exists("/sys/module/kvm_pvm"):
        pytest.xfail("KVM on a PVM host: guest kernel code runs in KVM's instruction emulator, which raises no "
                     "data breakpoints")  # fmt: skip
    child, sock = boot_with_gdb(tmp_path, accel_name, "counter.elf")
    try:
        out = gdb(sock, "counter.elf", [f"watch *(int *){COUNTER:#x}", "continue", "continue",
                                        "info registers rip", "delete", "set *(char *)0x7008 = 0x21", "detach"])  # fmt: skip
    finally:
        status, console = finish(child)
    assert "Hardware watchpoint 1: *(int *)0x7000" in out, out
    values = re.findall(r"New value = (\d+)", out)
    assert len(values) == 2 and int(values[1]) == int(values[0]) + 1, out  # two stores, one increment each
    assert status == 0x21, console  # the byte gdb wrote stops the counter


def test_info_threads_lists_one_thread_per_vcpu(tmp_path, accel_name):
    child, sock = boot_with_gdb(tmp_path, accel_name, "smp.elf", vcpus=2)
    try:
        out = gdb(sock, "smp.elf", ["info threads", "thread 2", "info registers rip", "detach"])
    finally:
        status, console = finish(child)
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0\)", out) and re.search(r"\s2\s+Thread 2 \(vCPU 1\)", out), out
    assert "[Switching to thread 2 (Thread 2)]" in out or "Switching to thread 2" in out, out
    assert status == 0, console  # the application processor still starts by INIT/SIPI after the detach
