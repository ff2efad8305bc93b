"""QEMU's ``pc-testdev``: the test device kvm-unit-tests' x86 suite expects beside the debug exit.

After QEMU's hw/misc/pc-testdev.c (the device ``-device pc-testdev`` in kvm-unit-tests' x86/run):

* ports 0xe0-0xe3: a 32-bit scratch register, read back as written (any width, any byte);
* ports 0xe4-0xe7: "flush page": QEMU re-protects the guest page named by the written address so
  that KVM drops its mapping. pyvmm keeps no mapping to drop (the hypervisor's view of guest RAM is
  the RAM itself), so the write is counted and nothing else happens;
* ports 0xe8-0xeb: the same scratch register, byte by byte;
* ports 0x2000-0x2017: writing byte V at 0x2000 + N sets ISA interrupt line N to V != 0;
* MMIO 0xff000000-0xff00ffff: 64 KiB of device memory read back as written. kvm-unit-tests'
  emulator test maps its operands here so every access is an MMIO exit, which makes the VMM's
  instruction emulation (the fallback, or the interpreter's MMIO path) do the work.

Only ``[debug] test_device = true`` adds it: nothing but test guests has a use for it.
"""

from __future__ import annotations

from typing import Callable

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_PORTS = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000


class PcTestdev:
    def __init__(self, set_irq_line: Callable[[int, bool], None]):
        self._set_irq_line = set_irq_line
        self.scratch = 0
        self.flushes = 0
        self.iomem = bytearray(IOMEM_SIZE)
        self.scratch_port = _Scratch(self)
        self.scratch_byte_port = _Scratch(self)
        self.flush_port = _Flush(self)
        self.irq_ports = _IrqLines(self)
        self.iomem_window = _IoMem(self)

    def regions(self) -> dict[str, tuple[object, str, int, int]]:
        """name -> (device, bus, base, size), as the builder inserts legacy devices."""
        return {
            "pc-testdev.scratch": (self.scratch_port, "pio", SCRATCH_PORT, 4),
            "pc-testdev.flush": (self.flush_port, "pio", FLUSH_PORT, 4),
            "pc-testdev.scratch-byte": (self.scratch_byte_port, "pio", SCRATCH_BYTE_PORT, 4),
            "pc-testdev.irq": (self.irq_ports, "pio", IRQ_PORTS, IRQ_LINES),
            "pc-testdev.iomem": (self.iomem_window, "mmio", IOMEM_BASE, IOMEM_SIZE),
        }


class _Scratch:
    def __init__(self, dev: PcTestdev):
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        value = self.dev.scratch.to_bytes(4, "little") + bytes(4)  # a read past byte 3 gives zeros
        data[:] = value[offset : offset + len(data)]

    def write(self, offset: int, data) -> None:
        value = bytearray(self.dev.scratch.to_bytes(4, "little"))
        width = min(len(data), 4 - offset)
        value[offset : offset + width] = bytes(data[:width])
        self.dev.scratch = int.from_bytes(value, "little")


class _Flush:
    def __init__(self, dev: PcTestdev):
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data) -> None:
        self.dev.flushes += 1


class _IrqLines:
    def __init__(self, dev: PcTestdev):
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data) -> None:
        if len(data):
            self.dev._set_irq_line(offset, data[0] != 0)


class _IoMem:
    def __init__(self, dev: PcTestdev):
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        chunk = self.dev.iomem[offset : offset + len(data)]
        data[:] = chunk + bytes(len(data) - len(chunk))

    def write(self, offset: int, data) -> None:
        end = min(offset + len(data), IOMEM_SIZE)
        self.dev.iomem[offset:end] = bytes(data[: end - offset])
