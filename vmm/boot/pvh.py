"""PVH boot information: ``struct hvm_start_info`` (xen/include/public/arch-x86/hvm/start_info.h).

The kernel is entered at its ``XEN_ELFNOTE_PHYS32_ENTRY`` in 32-bit protected
mode with EBX = the address returned by ``write_pvh_start_info``.
"""

from __future__ import annotations

import struct

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.memory import GuestMemory

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 adds memmap_paddr / memmap_entries

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
# memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
# paddr, size, cmdline_paddr, reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")
# addr, size, type, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")

MODLIST_MAX_ENTRIES = (layout.PVH_MEMMAP - layout.PVH_MODLIST) // MODLIST_ENTRY.size


def write_pvh_start_info(
    mem: GuestMemory,
    *,
    cmdline_addr: int,
    e820: list[tuple[int, int, int]],
    modules: list[tuple[int, int]] = (),
    rsdp_addr: int = 0,
) -> int:
    """Write start_info, its module list and memory map; returns the start_info address (for EBX).

    ``rsdp_addr`` is the ACPI RSDP (``acpi.write_acpi_tables``), 0 for none.
    """
    modules = list(modules)
    if len(modules) > MODLIST_MAX_ENTRIES:
        raise BootError(f"PVH boot: {len(modules)} modules, room for {MODLIST_MAX_ENTRIES}")
    if len(e820) > layout.PVH_MEMMAP_MAX_ENTRIES:
        raise BootError(f"PVH boot: {len(e820)} memory map entries, room for {layout.PVH_MEMMAP_MAX_ENTRIES}")

    for i, (addr, size) in enumerate(modules):
        mem.write(layout.PVH_MODLIST + i * MODLIST_ENTRY.size, MODLIST_ENTRY.pack(addr, size, 0, 0))
    for i, (addr, size, kind) in enumerate(e820):
        mem.write(layout.PVH_MEMMAP + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.pack(addr, size, kind, 0))
    mem.write(
        layout.PVH_START_INFO,
        START_INFO.pack(
            XEN_HVM_START_MAGIC_VALUE,
            HVM_START_INFO_VERSION,
            0,
            len(modules),
            layout.PVH_MODLIST if modules else 0,
            cmdline_addr,
            rsdp_addr,
            layout.PVH_MEMMAP,
            len(e820),
            0,
        ),
    )
    return layout.PVH_START_INFO
