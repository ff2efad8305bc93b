"""Minimal ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT and MADT.

Debian's cloud kernels are built without ``CONFIG_X86_MPPARSE``: they never
look at the MP table and learn the local APICs and the IOAPIC only from the
ACPI MADT. With neither, Linux runs on the boot CPU alone behind the 8259
("Boot CPU (id 0) not listed by BIOS").

The tables go in the BIOS area at ``ACPI_START`` (0xE0000), which the e820
map reserves and where Linux also scans for the RSDP; the RSDP address is
handed over explicitly as well (PVH ``rsdp_paddr``, zero page
``acpi_rsdp_addr``). They describe the same machine as the MP table:
APIC IDs 0..n-1, the IOAPIC with ID n at ``layout.IOAPIC_BASE`` serving
GSIs 0-23, identity ISA routing (no interrupt source overrides, as KVM's
default GSI routing), and NMI on LINT1 of every CPU.

The FADT declares a *hardware-reduced* ACPI platform (no PM timer, SCI or
fixed-feature registers, as Firecracker does) with an i8042 and a CMOS RTC.
Its DSDT describes the virtio-mmio devices as ``LNRO0005`` devices with their
MMIO window and interrupt: that is how an x86 kernel whose ``virtio_mmio``
lacks ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` (Debian's, for one) finds them.
A hardware-reduced platform has no legacy PIC, so Linux maps no ISA IRQ by
itself: the DSDT also lists COM1, the i8042 keyboard port and the RTC with
their ports and IRQs, or their drivers could not get an interrupt.
"""

from __future__ import annotations

import struct

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.mptable import checksum
from pyvmm.vmm.memory import GuestMemory

ACPI_START = 0xE0000  # in the reserved BIOS area; 16-byte aligned as the RSDP must be
ACPI_END = layout.HIGH_MEMORY
RSDP_ADDR = ACPI_START
XSDT_ADDR = ACPI_START + 0x40  # the other tables follow it, 16-byte aligned

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMTBL"
CREATOR_ID = b"PYVM"

# RSDP (ACPI 2.0+): signature, checksum, OEM ID, revision, RSDT address, length, XSDT address,
# extended checksum, reserved
RSDP = struct.Struct("<8sB6sBIIQB3s")
# system description table header
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")

MADT_REVISION = 5  # ACPI 6.x
MADT_PCAT_COMPAT = 1 << 0  # a dual 8259 is present too (Linux then masks it when using the IOAPIC)
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0: ACPI processor UID, APIC ID, flags
MADT_IO_APIC = struct.Struct("<BBBBII")  # type 1: IOAPIC ID, reserved, address, GSI base
MADT_LOCAL_APIC_NMI = struct.Struct("<BBBHB")  # type 4: processor UID (0xFF = all), flags, LINT#
LAPIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    def header(csum: int) -> bytes:
        return SDT_HEADER.pack(signature, SDT_HEADER.size + len(body), revision, csum, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)

    return header(checksum(header(0) + body)) + body


# FADT (ACPI 6.x, revision 6: 276 bytes)
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_SIZE = 276
FADT_DSDT = 40  # offsets from the start of the table
FADT_CENTURY = 108
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_MINOR = 131
FADT_X_DSDT = 140
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5
FADT_HW_REDUCED_ACPI = 1 << 20
CMOS_CENTURY_INDEX = 0x32  # devices/legacy/cmos.py keeps the century there

DSDT_REVISION = 2  # 64-bit AML integers
VIRTIO_MMIO_HID = "LNRO0005"


def fadt(dsdt_addr: int) -> bytes:
    body = bytearray(FADT_SIZE - SDT_HEADER.size)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER.size, value)

    put(FADT_DSDT, "<I", dsdt_addr)
    put(FADT_CENTURY, "<B", CMOS_CENTURY_INDEX)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED)
    put(FADT_FLAGS, "<I", FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put(FADT_MINOR, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    return _table(b"FACP", FADT_REVISION, bytes(body))


# --- AML, just what the DSDT needs ----------------------------------------


def _pkg_length(content_length: int) -> bytes:
    """AML PkgLength for a package whose contents (after the PkgLength) are ``content_length`` bytes."""
    for extra in range(4):
        total = content_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise BootError("AML package too large")


def _name_seg(name: str) -> bytes:
    seg = name.encode("ascii").ljust(4, b"_")
    if len(seg) != 4:
        raise BootError(f"AML name {name!r} longer than 4 characters")
    return seg


def _aml_integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])  # ZeroOp / OneOp
    if value < 0x100:
        return b"\x0a" + bytes([value])
    if value < 0x10000:
        return b"\x0b" + value.to_bytes(2, "little")
    return b"\x0c" + value.to_bytes(4, "little")


def _aml_name(name: str, data: bytes) -> bytes:
    return b"\x08" + _name_seg(name) + data


def _aml_string(text: str) -> bytes:
    return b"\x0d" + text.encode("ascii") + b"\x00"


def _aml_buffer(data: bytes) -> bytes:
    content = _aml_integer(len(data)) + data
    return b"\x11" + _pkg_length(len(content)) + content


def _aml_device(name: str, body: bytes) -> bytes:
    content = _name_seg(name) + body
    return b"\x5b\x82" + _pkg_length(len(content)) + content


def _aml_scope(path: bytes, body: bytes) -> bytes:
    content = path + body
    return b"\x10" + _pkg_length(len(content)) + content


# resource descriptors for _CRS
_END_TAG = b"\x79\x00"
_IRQ_EDGE = 0x03  # Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive): ISA devices
_IRQ_LEVEL = 0x01  # Interrupt(ResourceConsumer, Level, ActiveHigh, Exclusive): virtio-mmio


def _res_io(port: int, length: int) -> bytes:
    """IO(Decode16, port, port, 1, length)."""
    return struct.pack("<BBHHBB", 0x47, 1, port, port, 1, length)


def _res_memory32(base: int, size: int) -> bytes:
    """Memory32Fixed(ReadWrite, base, size)."""
    return struct.pack("<BHBII", 0x86, 9, 1, base, size)


def _res_interrupt(flags: int, gsi: int) -> bytes:
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def _aml_pnp_device(name: str, hid: str, uid: int, resources: bytes) -> bytes:
    body = (
        _aml_name("_HID", _aml_string(hid))
        + _aml_name("_UID", _aml_integer(uid))
        + _aml_name("_CRS", _aml_buffer(resources + _END_TAG))
    )
    return _aml_device(name, body)


def _legacy_devices() -> bytes:
    """COM1, the i8042 keyboard port and the CMOS RTC, as the PC has them (vmm/layout.py)."""
    return (
        _aml_pnp_device("COM1", "PNP0501", 0, _res_io(layout.PORT_COM1, 8) + _res_interrupt(_IRQ_EDGE, layout.IRQ_COM1))
        + _aml_pnp_device(
            "KBD_",
            "PNP0303",
            0,
            _res_io(layout.PORT_I8042, 1) + _res_io(layout.PORT_I8042 + 4, 1) + _res_interrupt(_IRQ_EDGE, layout.IRQ_KEYBOARD),
        )
        + _aml_pnp_device("RTC_", "PNP0B00", 0, _res_io(layout.PORT_CMOS, 2) + _res_interrupt(_IRQ_EDGE, layout.IRQ_RTC))
    )


def dsdt(virtio_devices: list[tuple[int, int, int]]) -> bytes:
    """The namespace under ``\\_SB``: the legacy devices, and one ``LNRO0005`` device per
    virtio-mmio window ``(base, size, gsi)``."""
    devices = _legacy_devices()
    for index, (base, size, gsi) in enumerate(virtio_devices):
        resources = _res_memory32(base, size) + _res_interrupt(_IRQ_LEVEL, gsi)
        devices += _aml_pnp_device(f"V{index:03X}", VIRTIO_MMIO_HID, index, resources)
    return _table(b"DSDT", DSDT_REVISION, _aml_scope(b"\\_SB_", devices))


def madt(vcpu_count: int) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT))
    for cpu in range(vcpu_count):
        body += MADT_LOCAL_APIC.pack(0, MADT_LOCAL_APIC.size, cpu, cpu, LAPIC_ENABLED)
    body += MADT_IO_APIC.pack(1, MADT_IO_APIC.size, vcpu_count, 0, layout.IOAPIC_BASE, 0)
    body += MADT_LOCAL_APIC_NMI.pack(4, MADT_LOCAL_APIC_NMI.size, ALL_PROCESSORS, 0, 1)
    return _table(b"APIC", MADT_REVISION, bytes(body))


def write_acpi_tables(mem: GuestMemory, vcpu_count: int, virtio_devices: list[tuple[int, int, int]] = ()) -> int:
    """Write the ACPI tables for ``vcpu_count`` vCPUs and the virtio-mmio windows ``(base, size, gsi)``.

    Returns the RSDP address.
    """
    if not 1 <= vcpu_count <= 254:
        raise BootError(f"ACPI MADT: {vcpu_count} vCPUs, an xAPIC machine takes 1 to 254")
    listed_in_xsdt = 2  # FADT and MADT; the DSDT is reached through the FADT only
    xsdt_size = SDT_HEADER.size + 8 * listed_in_xsdt
    addr = _align16(XSDT_ADDR + xsdt_size)
    dsdt_table = dsdt(list(virtio_devices))
    placed = []
    for table in (None, dsdt_table, madt(vcpu_count)):  # the FADT needs the DSDT's address
        placed.append(addr)
        addr = _align16(addr + (FADT_SIZE if table is None else len(table)))
    if addr > ACPI_END:
        raise BootError(f"ACPI tables of {addr - ACPI_START} bytes do not fit below 1 MiB")
    fadt_addr, dsdt_addr, madt_addr = placed
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr))

    def rsdp(csum: int, ext_csum: int) -> bytes:
        return RSDP.pack(b"RSD PTR ", csum, OEM_ID, 2, 0, RSDP.size, XSDT_ADDR, ext_csum, bytes(3))

    first20 = checksum(rsdp(0, 0)[:20])
    table = rsdp(first20, checksum(rsdp(first20, 0)))
    mem.write(RSDP_ADDR, table)
    mem.write(XSDT_ADDR, xsdt)
    mem.write(fadt_addr, fadt(dsdt_addr))
    mem.write(dsdt_addr, dsdt_table)
    mem.write(madt_addr, madt(vcpu_count))
    return RSDP_ADDR


def _align16(value: int) -> int:
    return (value + 15) & ~15
