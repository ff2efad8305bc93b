"""Debian's 6.1 kernel on the interpreter backend, through pyvmm's loaders and device models.

Needs tests/assets (scripts/fetch-test-kernel): vmlinux and the busybox
initramfs whose /init prints "pyvmm-init: ..." and reboots. The run loop here
is a minimal stand-in for vmm/vcpu.py (port I/O and MMIO to the buses, one
thread per vCPU), so only the interpreter and the device models are exercised.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.interp import InterpVm, probe  # noqa: E402
from pyvmm.accel.core import Interrupted, IoIn, IoOut, MmioRead, MmioWrite  # noqa: E402
from pyvmm.devices.irq import IrqLine  # noqa: E402
from pyvmm.devices.legacy.cmos import Cmos  # noqa: E402
from pyvmm.devices.legacy.i8042 import I8042  # noqa: E402
from pyvmm.devices.legacy.serial import Serial  # noqa: E402
from pyvmm.vmm import layout  # noqa: E402
from pyvmm.vmm.boot.acpi import write_acpi_tables  # noqa: E402
from pyvmm.vmm.boot.bootparams import write_boot_params  # noqa: E402
from pyvmm.vmm.boot.cmdline import write_cmdline  # noqa: E402
from pyvmm.vmm.boot.e820 import e820_map  # noqa: E402
from pyvmm.vmm.boot.initrd import load_initrd  # noqa: E402
from pyvmm.vmm.boot.kernel import load_kernel  # noqa: E402
from pyvmm.vmm.boot.mptable import write_mptable  # noqa: E402
from pyvmm.vmm.boot.pvh import write_pvh_start_info  # noqa: E402
from pyvmm.vmm.bus import MmioBus, PioBus  # noqa: E402
from pyvmm.vmm.memory import GuestMemory  # noqa: E402
from pyvmm.vmm.x86.msrs import boot_msrs  # noqa: E402
from pyvmm.vmm.x86.regs import boot_cpu_state  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def boot_linux(mode: str = "linux64", vcpus: int = 1, memory_mib: int = 256, timeout: float = 120.0):
    """Boot vmlinux + initramfs; returns (console text, seconds, unexpected exits)."""
    vmlinux, initramfs = ASSETS / "vmlinux", ASSETS / "initramfs.cpio.gz"
    if not vmlinux.exists() or not initramfs.exists():
        pytest.skip("tests/assets has no vmlinux/initramfs (run scripts/fetch-test-kernel)")
    usable, reason, _ = probe()
    if not usable:
        pytest.skip(f"interpreter not usable: {reason}")
    memory = GuestMemory.anonymous(layout.ram_layout(memory_mib << 20))
    vm = InterpVm(vcpus)
    output = bytearray()
    lock = threading.Lock()
    done = threading.Event()
    try:
        for slot, region in enumerate(memory.regions):
            vm.map_memory(slot, region.guest_addr, region.buffer)

        def console(data: bytes) -> None:
            with lock:
                output.extend(data)

        def reset(*_args) -> None:
            done.set()

        pio, mmio = PioBus(), MmioBus()
        pio.insert(Serial(IrqLine(layout.IRQ_COM1, vm.set_irq_line), console), layout.PORT_COM1, 8)
        pio.insert(Cmos(memory.size), layout.PORT_CMOS, 2)
        i8042 = I8042(reset, IrqLine(layout.IRQ_KEYBOARD, vm.set_irq_line))
        pio.insert(i8042.data_port, layout.PORT_I8042, 1)
        pio.insert(i8042.command_port, layout.PORT_I8042 + 4, 1)

        kernel = load_kernel(memory, str(vmlinux))
        initrd = load_initrd(memory, str(initramfs), kernel)
        cmdline = "earlyprintk=ttyS0 console=ttyS0 panic=-1 reboot=k"
        cmdline_addr, cmdline_size = write_cmdline(memory, cmdline, kernel)
        e820 = e820_map(memory)
        write_mptable(memory, vcpus)
        rsdp = write_acpi_tables(memory, vcpus)
        if mode == "linux64":
            info = write_boot_params(
                memory, kernel=kernel, cmdline_addr=cmdline_addr, cmdline_size=cmdline_size,
                initrd=initrd, e820=e820, rsdp_addr=rsdp,
            )  # fmt: skip
            regs, sregs = boot_cpu_state(memory, "linux64", kernel.linux64_entry, info)
        else:
            info = write_pvh_start_info(memory, cmdline_addr=cmdline_addr, e820=e820, modules=[initrd], rsdp_addr=rsdp)
            regs, sregs = boot_cpu_state(memory, "pvh32", kernel.pvh_entry, info)
        cpus = [vm.create_vcpu(i) for i in range(vcpus)]
        for cpu in cpus:
            cpu.set_msrs(boot_msrs())
        cpus[0].set_sregs(sregs)
        cpus[0].set_regs(regs)
        other = []

        def loop(vcpu):
            while not done.is_set():
                exit_value = vcpu.run()
                if isinstance(exit_value, IoIn):
                    pio.read(exit_value.port, exit_value.data)
                elif isinstance(exit_value, IoOut):
                    pio.write(exit_value.port, exit_value.data)
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

        start = time.monotonic()
        threads = [threading.Thread(target=loop, args=(cpu,), daemon=True) for cpu in cpus]
        for thread in threads:
            thread.start()
        finished = done.wait(timeout)
        elapsed = time.monotonic() - start
        for cpu in cpus:
            cpu.request_stop()
        for thread in threads:
            thread.join(10)
        text = bytes(output).decode(errors="replace")
        assert finished, f"no reset within {timeout}s; console tail:\n{text[-3000:]}"
        return text, elapsed, other
    finally:
        vm.close()
        memory.close()


def check_boot(text: str, other: list) -> None:
    assert other == [], other
    for marker in ("Linux version 6.1", "tsc: Detected", "Run /init as init process", "pyvmm-init: done"):
        assert marker in text, f"{marker!r} missing; console tail:\n{text[-3000:]}"
    for bad in ("BUG:", "Oops", "Kernel panic", "WARNING:", "Marking TSC unstable"):
        assert bad not in text, f"{bad!r} on the console:\n{text[-3000:]}"
    assert "reboot: Restarting system" in text


def test_debian_kernel_boots_to_init_through_the_64bit_entry():
    text, elapsed, other = boot_linux("linux64")
    check_boot(text, other)
    # the frequency came from CPUID 0x15/0x16, not a calibration; Linux prints the
    # "MHz TSC" line only when the TSC and CPU frequencies differ (rounded to kHz)
    assert "tsc: Detected" in text and "MHz processor" in text
    assert "calibrat" not in text.split("Linux version", 1)[1].split("Run /init", 1)[0].lower().replace("calibrating delay loop (skipped)", "")
    print(f"linux64 boot to reboot: {elapsed:.1f} s")


def test_debian_kernel_boots_to_init_through_pvh():
    text, elapsed, other = boot_linux("pvh32")
    check_boot(text, other)
    print(f"PVH boot to reboot: {elapsed:.1f} s")


@pytest.mark.slow
def test_debian_kernel_boots_with_two_vcpus():
    text, elapsed, other = boot_linux("linux64", vcpus=2)
    check_boot(text, other)
    assert "smp: Brought up 1 node, 2 CPUs" in text
    print(f"2-vCPU boot to reboot: {elapsed:.1f} s")
