"""pc-testdev (devices/legacy/testdev.py) on the buses as kvm-unit-tests drives it, after QEMU's
hw/misc/pc-testdev.c: the scratch register at 0xe0 (any width) and 0xe8 (bytes), the flush port,
interrupt lines at 0x2000 + N, and 64 KiB of device memory at 0xff000000."""

from __future__ import annotations

from pyvmm.config import config_from_dict
from pyvmm.devices.legacy.testdev import IOMEM_BASE, IOMEM_SIZE, PcTestdev
from pyvmm.vmm.bus import MmioBus, PioBus

from conftest import GUESTS


def _buses():
    lines = []
    dev = PcTestdev(lambda irq, level: lines.append((irq, level)))
    pio, mmio = PioBus(), MmioBus()
    for device, bus, base, size in dev.regions().values():
        (pio if bus == "pio" else mmio).insert(device, base, size)
    return dev, pio, mmio, lines


def _read(bus, addr, size):
    data = memoryview(bytearray(size))
    bus.read(addr, data)
    return int.from_bytes(data, "little")


def test_the_scratch_register_reads_back_what_any_width_wrote():
    dev, pio, _, _ = _buses()
    pio.write(0xE0, (0x12345678).to_bytes(4, "little"))
    assert _read(pio, 0xE0, 4) == 0x12345678 and _read(pio, 0xE2, 2) == 0x1234 and _read(pio, 0xE1, 1) == 0x56
    pio.write(0xE9, b"\xab")  # the byte-wide window is the same register
    assert _read(pio, 0xE0, 4) == 0x1234AB78 and _read(pio, 0xEB, 1) == 0x12


def test_the_irq_ports_set_each_line_and_the_flush_port_is_counted():
    dev, pio, _, lines = _buses()
    pio.write(0x2000 + 10, b"\x01")
    pio.write(0x2000 + 10, b"\x00")
    pio.write(0x2000 + 23, b"\x05")
    assert lines == [(10, True), (10, False), (23, True)]
    pio.write(0xE4, (0x401000).to_bytes(4, "little"))
    assert dev.flushes == 1


def test_the_device_memory_keeps_what_was_written_at_every_width_to_its_last_byte():
    dev, _, mmio, _ = _buses()
    mmio.write(IOMEM_BASE + 0x10, (0x1122334455667788).to_bytes(8, "little"))
    assert _read(mmio, IOMEM_BASE + 0x10, 8) == 0x1122334455667788
    assert _read(mmio, IOMEM_BASE + 0x13, 2) == 0x4455
    mmio.write(IOMEM_BASE + IOMEM_SIZE - 1, b"\x99")
    assert _read(mmio, IOMEM_BASE + IOMEM_SIZE - 1, 1) == 0x99 and dev.iomem[-1] == 0x99


def test_only_the_debug_table_adds_it(tmp_path):
    base = {"boot": {"kernel": str(GUESTS / "hello.elf")}}
    assert config_from_dict(base).debug.test_device is False
    assert config_from_dict({**base, "debug": {"test_device": True}}).debug.test_device is True
