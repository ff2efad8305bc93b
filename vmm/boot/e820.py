"""The guest's physical memory map (BIOS e820 style), shared by the PVH and Linux boot paths.

RAM below the EBDA, the EBDA + VGA/BIOS area reserved up to 1 MiB (the MP
table lives at ``EBDA_START``), RAM from 1 MiB to the end of the first region
(at most the start of the 32-bit MMIO hole), and every further region (RAM
moved above 4 GiB) as RAM.
"""

from __future__ import annotations

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.memory import GuestMemory

# e820 entry types (arch/x86/include/asm/e820/types.h); also used by PVH's hvm_memmap_table_entry
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

E820_TYPE_NAMES = {E820_RAM: "ram", E820_RESERVED: "reserved", E820_ACPI: "acpi", E820_NVS: "nvs", E820_UNUSABLE: "unusable"}


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """``(addr, size, type)`` entries, sorted by address."""
    if not mem.regions or mem.regions[0].guest_addr != 0 or mem.regions[0].end <= layout.HIGH_MEMORY:
        raise BootError(f"guest RAM must start at 0 and extend past 1 MiB to boot Linux (got {mem.size:#x} bytes)")
    low = mem.regions[0]
    entries = [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START, E820_RESERVED),
        (layout.HIGH_MEMORY, low.end - layout.HIGH_MEMORY, E820_RAM),
    ]
    entries += [(region.guest_addr, region.size, E820_RAM) for region in mem.regions[1:]]
    return entries
