"""pyvmm's own PVH test guests (tests/guests/*.elf) on the interpreter backend.

The guest is loaded with pyvmm's loaders at its PT_LOAD addresses, started per
PVH (32-bit flat protected mode, paging off, EBX = start_info) and driven by a
minimal run loop over the real port-I/O bus with pyvmm's 16550A model, so the
interpreter's exits are exercised exactly as the VMM consumes them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.interp import InterpVm, probe  # noqa: E402
from pyvmm.accel.core import Interrupted, IoIn, IoOut, MmioRead, MmioWrite  # noqa: E402
from pyvmm.devices.irq import IrqLine  # noqa: E402
from pyvmm.devices.legacy.serial import Serial  # noqa: E402
from pyvmm.vmm import layout  # noqa: E402
from pyvmm.vmm.boot.cmdline import write_cmdline  # noqa: E402
from pyvmm.vmm.boot.e820 import e820_map  # noqa: E402
from pyvmm.vmm.boot.kernel import load_kernel  # noqa: E402
from pyvmm.vmm.boot.mptable import write_mptable  # noqa: E402
from pyvmm.vmm.boot.pvh import write_pvh_start_info  # noqa: E402
from pyvmm.vmm.bus import MmioBus, PioBus  # noqa: E402
from pyvmm.vmm.memory import GuestMemory  # noqa: E402
from pyvmm.vmm.x86.regs import boot_cpu_state  # noqa: E402

GUESTS = Path(__file__).resolve().parent.parent / "guests"


class ExitPort:
    """The debug-exit port: records the status byte."""

    def __init__(self):
        self.status = None

    def read(self, offset, data):
        data[:] = b"\xff" * len(data)

    def write(self, offset, data):
        self.status = data[0]


class RamDevice:
    """The scratch MMIO device mmio.elf expects: 4 KiB that behave as RAM."""

    def __init__(self):
        self.ram = bytearray(0x1000)

    def read(self, offset, data):
        data[:] = self.ram[offset : offset + len(data)]

    def write(self, offset, data):
        self.ram[offset : offset + len(data)] = data


def boot_pvh(name: str, cmdline: str = "", vcpus: int = 1, timeout: float = 60.0):
    """Boot a PVH guest; returns (console output, debug-exit status, unexpected exits)."""
    path = GUESTS / name
    if not path.exists():
        pytest.skip(f"{name} is not built (tests/guests)")
    usable, reason, _ = probe()
    if not usable:
        pytest.skip(f"interpreter not usable: {reason}")
    memory = GuestMemory.anonymous(layout.ram_layout(64 << 20))
    vm = InterpVm(vcpus)
    try:
        for slot, region in enumerate(memory.regions):
            vm.map_memory(slot, region.guest_addr, region.buffer)
        output = bytearray()
        lock = threading.Lock()

        def console(data: bytes) -> None:
            with lock:
                output.extend(data)

        pio, mmio = PioBus(), MmioBus()
        pio.insert(Serial(IrqLine(layout.IRQ_COM1, vm.set_irq_line), console), layout.PORT_COM1, 8)
        exit_port = ExitPort()
        pio.insert(exit_port, layout.PORT_DEBUG_EXIT, 1)
        mmio.insert(RamDevice(), 0xD8000000, 0x1000)
        kernel = load_kernel(memory, str(path))
        cmdline_addr, _ = write_cmdline(memory, cmdline, kernel)
        info = write_pvh_start_info(memory, cmdline_addr=cmdline_addr, e820=e820_map(memory))
        write_mptable(memory, vcpus)
        regs, sregs = boot_cpu_state(memory, "pvh32", kernel.pvh_entry, info)
        cpus = [vm.create_vcpu(i) for i in range(vcpus)]
        cpus[0].set_sregs(sregs)
        cpus[0].set_regs(regs)
        done = threading.Event()
        other = []

        def loop(vcpu):
            while not done.is_set():
                exit_value = vcpu.run()
                if isinstance(exit_value, IoIn):
                    pio.read(exit_value.port, exit_value.data)
                elif isinstance(exit_value, IoOut):
                    pio.write(exit_value.port, exit_value.data)
                    if exit_value.port == layout.PORT_DEBUG_EXIT:
                        break
                elif isinstance(exit_value, MmioRead):
                    mmio.read(exit_value.addr, exit_value.data)
                elif isinstance(exit_value, MmioWrite):
                    mmio.write(exit_value.addr, exit_value.data)
                elif not isinstance(exit_value, Interrupted):
                    other.append((vcpu.index, exit_value))
                    break
            done.set()
            for cpu in cpus:
                cpu.request_stop()

        threads = [threading.Thread(target=loop, args=(cpu,), daemon=True) for cpu in cpus]
        for thread in threads:
            thread.start()
        finished = done.wait(timeout)
        for thread in threads:
            thread.join(5)
        assert finished, f"{name} did not finish in {timeout}s; console: {bytes(output)!r}"
        return bytes(output), exit_port.status, other
    finally:
        vm.close()
        memory.close()


def test_hello_prints_through_com1_and_exits_ok():
    output, status, other = boot_pvh("hello.elf")
    assert other == []
    assert b"Hello from pyvmm guest\n" in output
    assert b"hello ok\n" in output
    assert status == 0


def test_pio_guest():
    output, status, other = boot_pvh("pio.elf")
    assert other == [] and status == 0, output.decode(errors="replace")


def test_mmio_guest():
    output, status, other = boot_pvh("mmio.elf")
    assert other == [] and status == 0, output.decode(errors="replace")
    assert b"mmio ok" in output


@pytest.mark.parametrize("vcpus", [2, 3])
def test_smp_guest_starts_aps_with_init_sipi(vcpus):
    output, status, other = boot_pvh("smp.elf", vcpus=vcpus)
    text = output.decode(errors="replace")
    assert other == [] and status == 0, text
    assert f"cpus: {vcpus}" in text and "smp ok" in text
    assert sorted(line for line in text.splitlines() if line.startswith("ap ")) == [
        f"ap {i} up" for i in range(1, vcpus)
    ]
