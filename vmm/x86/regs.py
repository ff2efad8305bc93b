"""The boot vCPU's initial register state for the PVH and the 64-bit Linux entries.

``boot_cpu_state`` is a pure function of guest memory and the entry: it writes
the boot GDT (and, for long mode, identity page tables) into guest RAM and
returns the register state, so any backend (KVM, the interpreter) can apply
it with ``set_regs``/``set_sregs``.

Boot GDT at ``layout.BOOT_GDT`` (4 entries, like Firecracker's):

  0x00 null
  0x08 code: 32-bit flat for PVH, 64-bit (L=1) for the Linux entry
  0x10 flat 4 GiB read/write data
  0x18 busy TSS, base 0, limit 0x67 (KVM rejects VM entry without a usable
       TR; the PVH spec asks for a 32-bit TSS). In long mode a TSS descriptor
       takes 16 bytes; its upper half (all zero) falls on ``BOOT_IDT``, which
       holds zeros anyway.
"""

from __future__ import annotations

from pyvmm.accel.x86 import DescriptorTable, Regs, Segment, SpecialRegs
from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.memory import GuestMemory
from pyvmm.arch.x86.msrs import EFER_LMA, EFER_LME

from pyvmm.arch.x86.registers import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    PDE_2MB_PAGE,
    PTE_PRESENT,
    PTE_WRITABLE,
    RFLAGS_RESERVED,
)

HUGE_PAGE_SIZE = 2 << 20

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18
TSS_LIMIT = 0x67  # the architectural minimum for a 32-bit TSS


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from ``flags`` (access byte in bits 0-7, G/DB/L/AVL in bits 12-15)."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


# access byte 0x9B: present, DPL 0, code, execute/read, accessed; 0x93: data read/write accessed;
# 0x8B: present system descriptor, busy 32/64-bit TSS. High nibble: G (8), D/B (4), L (2).
CODE32 = gdt_entry(0xC09B, 0, 0xFFFFF)
CODE64 = gdt_entry(0xA09B, 0, 0xFFFFF)
DATA = gdt_entry(0xC093, 0, 0xFFFFF)
TSS_BUSY = gdt_entry(0x008B, 0, TSS_LIMIT)

BOOT_MODES = ("pvh32", "multiboot", "linux64")
MULTIBOOT_MAGIC = 0x2BADB002  # EAX at a multiboot entry (multiboot spec 3.2)


def write_gdt(mem: GuestMemory, code: int) -> list[int]:
    gdt = [0, code, DATA, TSS_BUSY]
    mem.write(layout.BOOT_GDT, b"".join(e.to_bytes(8, "little") for e in gdt))
    mem.write(layout.BOOT_IDT, bytes(8))  # the (empty) IDT, and the upper half of the 64-bit TSS descriptor
    return gdt


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Map guest-physical [0, 4 GiB) 1:1 with 2 MiB pages; returns the PML4 address (CR3)."""
    mem.write_int(layout.PML4, 8, layout.PDPT | PTE_PRESENT | PTE_WRITABLE)
    mem.fill(layout.PML4 + 8, 0x1000 - 8)
    pdpt = bytearray(0x1000)
    pd = bytearray(0x1000 * layout.PD_COUNT)
    for i in range(layout.PD_COUNT):
        pdpt[i * 8 : i * 8 + 8] = (layout.PD + i * 0x1000 | PTE_PRESENT | PTE_WRITABLE).to_bytes(8, "little")
    for i in range(512 * layout.PD_COUNT):
        pd[i * 8 : i * 8 + 8] = (i * HUGE_PAGE_SIZE | PTE_PRESENT | PTE_WRITABLE | PDE_2MB_PAGE).to_bytes(8, "little")
    mem.write(layout.PDPT, pdpt)
    mem.write(layout.PD, pd)
    return layout.PML4


def boot_cpu_state(mem: GuestMemory, mode: str, entry: int, boot_info: int) -> tuple[Regs, SpecialRegs]:
    """The BSP state for ``mode`` (one of BOOT_MODES) entering at ``entry``.

    ``boot_info`` is the hvm_start_info address (EBX) for "pvh32", the multiboot information
    structure (EBX, with EAX = 0x2BADB002) for "multiboot", and the zero page (RSI) for "linux64".
    Both 32-bit entries are flat protected mode with paging off.
    """
    if mode not in BOOT_MODES:
        raise BootError(f"unknown boot mode {mode!r} (expected one of {', '.join(BOOT_MODES)})")
    protected32 = mode in ("pvh32", "multiboot")
    if protected32 and entry >> 32:
        raise BootError(f"{mode} entry point {entry:#x} is above 4 GiB")

    gdt = write_gdt(mem, CODE32 if protected32 else CODE64)
    data = Segment.from_descriptor(SEL_DATA, gdt[2])
    sregs = SpecialRegs(
        cs=Segment.from_descriptor(SEL_CODE, gdt[1]),
        ds=data,
        es=Segment.from_descriptor(SEL_DATA, gdt[2]),
        fs=Segment.from_descriptor(SEL_DATA, gdt[2]),
        gs=Segment.from_descriptor(SEL_DATA, gdt[2]),
        ss=Segment.from_descriptor(SEL_DATA, gdt[2]),
        tr=Segment.from_descriptor(SEL_TSS, gdt[3]),
        gdt=DescriptorTable(base=layout.BOOT_GDT, limit=len(gdt) * 8 - 1),
        idt=DescriptorTable(base=layout.BOOT_IDT, limit=0),
    )
    regs = Regs(rip=entry, rflags=RFLAGS_RESERVED)

    if protected32:
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
        regs.rbx = boot_info
        if mode == "multiboot":
            regs.rax = MULTIBOOT_MAGIC
    else:
        sregs.cr3 = write_identity_page_tables(mem)
        sregs.cr4 = CR4_PAE
        sregs.cr0 = CR0_PE | CR0_PG | CR0_ET
        sregs.efer = EFER_LME | EFER_LMA
        regs.rsi = boot_info
        regs.rsp = regs.rbp = layout.BOOT_STACK_TOP
    return regs, sregs
