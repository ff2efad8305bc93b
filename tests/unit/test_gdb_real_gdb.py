"""Debian's gdb, in batch mode, against the stub served on a socket with the fake target: gdb must
take the target description (its register numbers and g-packet offsets are compared with ours),
the packets, breakpoints, stepping, watchpoints, threads and detach."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import pytest
from gdb_fake import CODE, VIRTUAL_BASE, FakeTarget

from pyvmm.gdb.server import GdbServer
from pyvmm.gdb.target import REGISTERS

GDB = shutil.which("gdb")
pytestmark = pytest.mark.skipif(GDB is None, reason="no gdb binary (apt-get install gdb)")


def run_gdb(address: str, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off",
            "-ex", f"target remote {address}"]  # fmt: skip
    for command in commands:
        args += ["-ex", command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.fixture
def served():
    target = FakeTarget(2, threaded=True)
    server = GdbServer(target, "127.0.0.1:0")
    server.start()
    yield target, server
    server.close()


def test_gdb_session(served):
    target, server = served
    target.memory[0x2000:0x2004] = b"\xde\xad\xbe\xef"
    stosb = CODE + 0x20  # vCPU 0 stores al (0x11) at rdi (VIRTUAL_BASE + 0x6000) when it gets there
    out = run_gdb(server.address, [
        "echo @@rip\\n", "info registers rip",
        "echo @@x\\n", f"x/4xb {VIRTUAL_BASE + 0x2000:#x}",
        "echo @@threads\\n", "info threads",
        f"break *{CODE + 4:#x}",
        "echo @@continue\\n", "continue",
        "echo @@after-break\\n", "info registers rip",
        "echo @@stepi\\n", "stepi", "info registers rip",
        "echo @@mem\\n", f"x/1xb {CODE + 4:#x}",
        f"set {{unsigned char}}{stosb:#x} = 0xaa",
        f"watch *(unsigned char *){VIRTUAL_BASE + 0x6000:#x}",
        "echo @@watch\\n", "continue",
        "info registers rip",
        "echo @@cr\\n", "info registers cr0 efer fs_base gs_base k_gs_base",
        "echo @@thread2\\n", "thread 2", "info registers rip rax",
        "echo @@set\\n", "set $rax = 0x4242", "info registers rax",
        "echo @@detach\\n", "detach",
    ])  # fmt: skip
    sections = dict(re.findall(r"@@(\S+)\n(.*?)(?=@@|\Z)", out, re.S))
    assert f"rip            {CODE:#x}" in sections["rip"], out
    assert "0xde\t0xad\t0xbe\t0xef" in sections["x"], out
    threads = sections["threads"]
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0\)", threads) and re.search(r"2\s+Thread 2 \(vCPU 1\)", threads), out
    assert f"Breakpoint 1, {CODE + 4:#018x}" in sections["continue"], out
    assert f"rip            {CODE + 4:#x}" in sections["after-break"], out
    assert f"rip            {CODE + 5:#x}" in sections["stepi"], out
    assert "0x90" in sections["mem"], out  # the int3 there is invisible to gdb
    assert "Hardware watchpoint 2" in sections["watch"] and "New value = 17" in sections["watch"], out
    assert f"rip            {stosb + 1:#x}" in sections["watch"], out
    assert "[ PE MP ET NE WP AM PG ]" in sections["cr"] and "[ SCE LME LMA NXE ]" in sections["cr"], out
    assert re.search(r"fs_base\s+0x70000000\b", sections["cr"]), out
    assert re.search(r"gs_base\s+0xffff888000000000\b", sections["cr"]), out
    assert re.search(r"k_gs_base\s+0x12345678\b", sections["cr"]), out
    assert f"rip            {CODE + 0x100:#x}" in sections["thread2"] and "0x2222" in sections["thread2"], out
    assert "rax            0x4242" in sections["set"], out
    assert "detached" in sections["detach"], out
    # what gdb did reached the target: rax of vCPU 1, the stored byte, and detach took the int3 out
    assert target.vcpus[1].regs.rax == 0x4242
    assert target.memory[0x6000] == 0x11
    assert target.memory[CODE + 4 - VIRTUAL_BASE] == 0x90 and not target.breakpoints
    assert target.detached


def test_gdb_register_layout_matches(served):
    """gdb's own view of the description: remote register numbers and g-packet offsets."""
    target, server = served
    out = run_gdb(server.address, ["maint print remote-registers", "detach"])
    seen = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 8 and fields[6].isdigit() and fields[7].isdigit():
            seen[fields[0]] = (int(fields[6]), int(fields[7]), int(fields[4]))
    offset = 0
    for number, reg in enumerate(REGISTERS):
        assert seen.get(reg.name) == (number, offset, reg.size), (reg.name, out)
        offset += reg.size


def test_gdb_monitor_and_unmapped(served):
    target, server = served
    target.memory[0x10:0x14] = b"\x01\x02\x03\x04"
    out = run_gdb(server.address, ["monitor help", "monitor xp 0x10 4", "x/2xb 0x10", "detach"])
    assert "xp ADDR [LEN]" in out, out
    assert "0x0000000000000010: 01 02 03 04" in out, out
    assert "Cannot access memory at address 0x10" in out, out


def test_gdb_interrupt_a_spinning_guest(served):
    """Ctrl-C: gdb turns SIGINT during 'continue' into 0x03 while the vCPUs spin; the stop is SIGINT."""
    target, server = served
    for vcpu in range(2):
        offset = CODE + 0x100 * vcpu - VIRTUAL_BASE
        target.memory[offset : offset + 2] = b"\xeb\xfe"  # jmp $
    args = [GDB, "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote {server.address}",
            "-ex", "continue", "-ex", "info registers rip", "-ex", "detach"]  # fmt: skip
    gdb = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not target.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.running, "gdb never resumed the target"
        gdb.send_signal(signal.SIGINT)
        out, _ = gdb.communicate(timeout=30)
    finally:
        gdb.kill()
    assert "SIGINT" in out, out
    assert f"rip            {CODE:#x}" in out, out
    assert target.interrupts == 1 and target.detached


def test_gdb_over_a_unix_socket_disassembles_at_pc(tmp_path):
    target = FakeTarget(1, threaded=True)
    target.memory[CODE - VIRTUAL_BASE : CODE - VIRTUAL_BASE + 3] = b"\x90\xaa\xcc"
    server = GdbServer(target, str(tmp_path / "gdb.sock"))
    server.start()
    try:
        out = run_gdb(server.address, ["x/3i $pc", "detach"])
    finally:
        server.close()
    assert re.search(r"=> 0x401000:\s+nop\n\s+0x401001:\s+stos\s+%al,%es:\(%rdi\)\n\s+0x401002:\s+int3", out), out
    assert target.detached


def test_gdb_moves_big_blocks_of_memory(served, tmp_path):
    """dump and restore: gdb's largest m reads and X writes (as big as PacketSize allows)."""
    target, server = served
    pattern = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(0x6000))
    target.memory[0x8000:0xE000] = pattern
    dumped, restored = tmp_path / "dump.bin", tmp_path / "restore.bin"
    restored.write_bytes(pattern[::-1])
    start = VIRTUAL_BASE + 0x8000
    out = run_gdb(server.address, [
        f"dump binary memory {dumped} {start:#x} {start + 0x6000:#x}",
        f"restore {restored} binary {start:#x}",
        "detach",
    ])  # fmt: skip
    assert dumped.read_bytes() == pattern, out
    assert target.memory[0x8000:0xE000] == pattern[::-1], out
