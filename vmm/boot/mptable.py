"""Intel MultiProcessor Specification 1.4 tables, so Linux finds the vCPUs and the IOAPIC without ACPI.

Written at ``layout.EBDA_START`` (the last KiB of base memory, which Linux
scans): the MP floating pointer, then the configuration table with one
processor entry per vCPU, the ISA bus, the IOAPIC, an I/O interrupt entry for
each IOAPIC pin and the two local interrupt entries. Interrupt routing is the
identity (IRQ n -> pin n, IRQ0 included), as Firecracker does it to match
KVM's default GSI routing.
"""

from __future__ import annotations

import struct

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.memory import GuestMemory

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # 1.4
MPC_OEM = b"PYVMM   "
MPC_PRODUCT_ID = b"000000000000"
APIC_VERSION = 0x14
CPU_SIGNATURE = 0x600  # family 6, model 0, stepping 0
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
BUS_TYPE_ISA = b"ISA   "
ISA_BUS_ID = 0

# entry types
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
# processor flags
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
MPC_APIC_USABLE = 1 << 0
# interrupt types
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = range(4)
MP_IRQPOL_DEFAULT = 0  # polarity and trigger conform to the bus (ISA: edge, active high)
ALL_LOCAL_APICS = 0xFF

# struct mpf_intel: signature, physptr, length (16-byte units), specification, checksum, feature1..5
MPF = struct.Struct("<4sIBBB5s")
# struct mpc_table: signature, length, spec, checksum, oem, productid, oemptr, oemsize, oemcount,
# lapic, reserved (extended table length/checksum)
MPC = struct.Struct("<4sHBB8s12sIHHII")
MPC_CPU = struct.Struct("<BBBBII8s")
MPC_BUS = struct.Struct("<BB6s")
MPC_IOAPIC = struct.Struct("<BBBBI")
MPC_INTSRC = struct.Struct("<BBHBBBB")
MPC_LINTSRC = struct.Struct("<BBHBBBB")

MP_TABLE_END = layout.LOW_RAM_END  # the EBDA ends where the VGA hole starts
MAX_VCPUS_APIC = 254  # xAPIC IDs are 8 bits and the IOAPIC takes one


def mptable_size(vcpu_count: int) -> int:
    return (
        MPF.size
        + MPC.size
        + MPC_CPU.size * vcpu_count
        + MPC_BUS.size
        + MPC_IOAPIC.size
        + MPC_INTSRC.size * layout.IOAPIC_PINS
        + MPC_LINTSRC.size * 2
    )


def max_vcpus() -> int:
    """The most vCPUs whose MP table fits in the EBDA."""
    room = MP_TABLE_END - layout.EBDA_START - mptable_size(0)
    return min(room // MPC_CPU.size, MAX_VCPUS_APIC)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with a zero checksum byte) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def write_mptable(mem: GuestMemory, vcpu_count: int) -> int:
    """Write the MP tables for ``vcpu_count`` vCPUs; returns the floating pointer's address."""
    if not 1 <= vcpu_count <= max_vcpus():
        raise BootError(f"MP table: {vcpu_count} vCPUs do not fit in the EBDA (1 to {max_vcpus()} supported)")
    ioapic_id = vcpu_count  # APIC IDs 0..vcpu_count-1 are the vCPUs

    entries = bytearray()
    for cpu in range(vcpu_count):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += MPC_CPU.pack(MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURE_APIC | CPU_FEATURE_FPU, bytes(8))
    entries += MPC_BUS.pack(MP_BUS, ISA_BUS_ID, BUS_TYPE_ISA)
    entries += MPC_IOAPIC.pack(MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE, layout.IOAPIC_BASE)
    for irq in range(layout.IOAPIC_PINS):
        entries += MPC_INTSRC.pack(MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, ISA_BUS_ID, irq, ioapic_id, irq)
    # LINT0 of the BSP: the 8259 PIC (ExtINT); LINT1 of every CPU: NMI
    entries += MPC_LINTSRC.pack(MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, ISA_BUS_ID, 0, 0, 0)
    entries += MPC_LINTSRC.pack(MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1)
    entry_count = vcpu_count + 2 + layout.IOAPIC_PINS + 2

    table_addr = layout.EBDA_START + MPF.size
    length = MPC.size + len(entries)

    def header(csum: int) -> bytes:
        return MPC.pack(MPC_SIGNATURE, length, MP_SPEC_REV, csum, MPC_OEM, MPC_PRODUCT_ID, 0, 0, entry_count, layout.LAPIC_BASE, 0)

    table = header(checksum(header(0) + entries)) + entries

    def floating(csum: int) -> bytes:
        # feature bytes all zero: the configuration table is present (no default configuration)
        return MPF.pack(MPF_SIGNATURE, table_addr, 1, MP_SPEC_REV, csum, bytes(5))

    mem.write(layout.EBDA_START, floating(checksum(floating(0))))
    mem.write(table_addr, table)
    return layout.EBDA_START
