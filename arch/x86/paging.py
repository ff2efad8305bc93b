"""Linear -> guest-physical translation through a vCPU's page tables, as a debugger reads them.

A pure walk (Intel SDM vol. 3A, 4.3-4.5): no paging, 32-bit (with 4 MiB PSE pages), PAE, 4-level
and 5-level (LA57) long mode. It sets no accessed or dirty bits and checks no permissions: a
debugger may look at supervisor pages from anywhere. ``read_phys(address, size) -> int | None``
reads a page-table entry (None: not RAM, so no translation). A missing entry or a non-canonical
address gives None. The introspection API and the gdb stub use it on every backend.
"""

from __future__ import annotations

from typing import Callable

from pyvmm.arch.x86.msrs import EFER_LMA
from pyvmm.arch.x86.registers import CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE

PRESENT = 1
LARGE = 1 << 7
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000


def translate(read_phys: Callable[[int, int], int | None], linear: int, *, cr0: int, cr3: int, cr4: int,
              efer: int) -> int | None:  # fmt: skip
    """The guest-physical address of ``linear``, or None when it is not mapped."""
    if not cr0 & CR0_PG:
        return linear & (0xFFFF_FFFF_FFFF_FFFF if efer & EFER_LMA else 0xFFFF_FFFF)
    if efer & EFER_LMA:
        levels = 5 if cr4 & CR4_LA57 else 4
        bits = 12 + 9 * levels
        top = linear >> (bits - 1)
        if top not in (0, (1 << (64 - bits + 1)) - 1):
            return None  # not canonical
        return _walk(read_phys, linear, cr3 & ADDRESS_MASK, [12 + 9 * i for i in range(levels - 1, -1, -1)], 8)
    linear &= 0xFFFF_FFFF
    if cr4 & CR4_PAE:
        pdpte = read_phys((cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8, 8)
        if pdpte is None or not pdpte & PRESENT:
            return None
        return _walk(read_phys, linear, pdpte & ADDRESS_MASK, [21, 12], 8)
    return _walk(read_phys, linear, cr3 & 0xFFFF_F000, [22, 12], 4, pse=bool(cr4 & CR4_PSE))


def _walk(read_phys, linear: int, table: int, shifts: list[int], size: int, *, pse: bool = True) -> int | None:
    index_mask = 0x3FF if size == 4 else 0x1FF
    for shift in shifts:
        entry = read_phys(table + ((linear >> shift) & index_mask) * size, size)
        if entry is None or not entry & PRESENT:
            return None
        if shift == 12:
            frame = entry & (0xFFFF_F000 if size == 4 else ADDRESS_MASK)
            return frame | (linear & 0xFFF)
        if entry & LARGE and (size == 8 and shift <= 30 or size == 4 and pse):
            if size == 4:  # a 4 MiB page: entry bits 13-20 are physical address bits 32-39
                return (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32) | (linear & 0x3F_FFFF)
            page = 1 << shift
            return (entry & ADDRESS_MASK & ~(page - 1)) | (linear & (page - 1))
        table = entry & (0xFFFF_F000 if size == 4 else ADDRESS_MASK)
    return None
