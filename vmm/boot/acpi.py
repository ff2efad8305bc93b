"""Minimal ACPI tables (RSDP, XSDT, MADT) so kernels without MP-table support find the CPUs and the IOAPIC.

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
default GSI routing), and NMI on LINT1 of every CPU. There is no FADT/DSDT:
nothing in pyvmm implements ACPI hardware, so the kernel's late ACPI
interpreter start-up finds no namespace and leaves ACPI off, after the
MADT has been used.
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
XSDT_ADDR = ACPI_START + 0x40
MADT_ADDR = ACPI_START + 0x80

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


def madt(vcpu_count: int) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT))
    for cpu in range(vcpu_count):
        body += MADT_LOCAL_APIC.pack(0, MADT_LOCAL_APIC.size, cpu, cpu, LAPIC_ENABLED)
    body += MADT_IO_APIC.pack(1, MADT_IO_APIC.size, vcpu_count, 0, layout.IOAPIC_BASE, 0)
    body += MADT_LOCAL_APIC_NMI.pack(4, MADT_LOCAL_APIC_NMI.size, ALL_PROCESSORS, 0, 1)
    return _table(b"APIC", MADT_REVISION, bytes(body))


def write_acpi_tables(mem: GuestMemory, vcpu_count: int) -> int:
    """Write RSDP, XSDT and MADT for ``vcpu_count`` vCPUs; returns the RSDP address."""
    if not 1 <= vcpu_count <= 254:
        raise BootError(f"ACPI MADT: {vcpu_count} vCPUs, an xAPIC machine takes 1 to 254")
    madt_table = madt(vcpu_count)
    if MADT_ADDR + len(madt_table) > ACPI_END:
        raise BootError(f"ACPI MADT of {len(madt_table)} bytes does not fit below 1 MiB")
    xsdt = _table(b"XSDT", 1, struct.pack("<Q", MADT_ADDR))

    def rsdp(csum: int, ext_csum: int) -> bytes:
        return RSDP.pack(b"RSD PTR ", csum, OEM_ID, 2, 0, RSDP.size, XSDT_ADDR, ext_csum, bytes(3))

    first20 = checksum(rsdp(0, 0)[:20])
    table = rsdp(first20, checksum(rsdp(first20, 0)))
    mem.write(RSDP_ADDR, table)
    mem.write(XSDT_ADDR, xsdt)
    mem.write(MADT_ADDR, madt_table)
    return RSDP_ADDR
