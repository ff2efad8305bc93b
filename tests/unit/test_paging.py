"""arch/x86/paging.py: translations through hand-built page tables in every paging mode."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.arch.x86.msrs import EFER_LMA
from pyvmm.arch.x86.paging import translate
from pyvmm.arch.x86.registers import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE

P, RW, PS = 1, 2, 0x80


class Ram:
    def __init__(self, size=8 << 20):
        self.data = bytearray(size)

    def put(self, addr, value, size=8):
        struct.pack_into("<Q" if size == 8 else "<I", self.data, addr, value)

    def read(self, addr, size):
        if addr + size > len(self.data):
            return None
        return int.from_bytes(self.data[addr : addr + size], "little")


LONG = {"cr0": CR0_PE | CR0_PG, "cr4": CR4_PAE, "efer": EFER_LMA}


def long_mode_tables():
    """PML4 at 0x1000: 0xffff800000000000 -> 4 KiB pages, 0x40000000 -> a 2 MiB page, 0x80000000 -> 1 GiB."""
    ram = Ram()
    ram.put(0x1000 + 256 * 8, 0x2000 | P | RW)  # PML4[256] (0xffff8...) -> PDPT 0x2000
    ram.put(0x2000, 0x3000 | P | RW)  # PDPT[0] -> PD 0x3000
    ram.put(0x3000, 0x4000 | P | RW)  # PD[0] -> PT 0x4000
    ram.put(0x4000 + 5 * 8, 0x123000 | P)  # PT[5]: 0xffff800000005000 -> 0x123000
    ram.put(0x1000, 0x5000 | P)  # PML4[0] -> PDPT 0x5000
    ram.put(0x5000 + 1 * 8, 0x6000 | P)  # PDPT[1] (1 GiB) -> PD 0x6000
    ram.put(0x6000 + 3 * 8, 0x600000 | P | PS)  # PD[3]: 2 MiB page at 0x40600000 -> 0x600000
    ram.put(0x5000 + 2 * 8, 0x1_0000_0000 | P | PS)  # PDPT[2]: 1 GiB page at 0x80000000 -> 4 GiB
    return ram


def test_long_mode_4k_2m_and_1g_pages():
    ram = long_mode_tables()
    walk = lambda va: translate(ram.read, va, cr3=0x1000, **LONG)  # noqa: E731
    assert walk(0xFFFF_8000_0000_5ABC) == 0x123ABC
    assert walk(0x4060_1234) == 0x601234
    assert walk(0x8123_4567) == 0x1_0123_4567
    assert walk(0xFFFF_8000_0000_6000) is None  # PT entry not present
    assert walk(0x0000_8000_0000_0000) is None  # not canonical
    assert walk(0xC000_0000) is None  # PDPT[3] not present


def test_five_level_paging_walks_one_more_table():
    ram = Ram()
    ram.put(0x1000, 0x2000 | P)  # PML5[0] -> PML4 at 0x2000
    ram.put(0x2000, 0x3000 | P)
    ram.put(0x3000, 0x4000 | P)
    ram.put(0x4000, 0x5000 | P)
    ram.put(0x5000 + 7 * 8, 0x777000 | P)
    assert translate(ram.read, 0x7010, cr3=0x1000, cr0=CR0_PE | CR0_PG, cr4=CR4_PAE | CR4_LA57, efer=EFER_LMA) == 0x777010
    # with 4 levels the same address is canonical and walks from the PML4 directly
    assert translate(ram.read, 0x7010, cr3=0x2000, **LONG) == 0x777010


def test_pae_and_32_bit_paging_with_large_pages():
    ram = Ram()
    ram.put(0x1000 + 8 * 1, 0x2000 | P)  # PDPTE[1] -> PD 0x2000
    ram.put(0x2000 + 8 * 2, 0x3000 | P)  # PD[2] -> PT 0x3000
    ram.put(0x3000 + 8 * 4, 0x44000 | P)
    ram.put(0x2000 + 8 * 3, 0x800000 | P | PS)  # PD[3]: a 2 MiB page
    pae = {"cr0": CR0_PE | CR0_PG, "cr4": CR4_PAE, "efer": 0}
    assert translate(ram.read, 0x4040_4321, cr3=0x1000, **pae) == 0x44321
    assert translate(ram.read, 0x4061_2345, cr3=0x1000, **pae) == 0x812345
    ram32 = Ram()
    ram32.put(0x1000 + 4 * 1, 0x2000 | P, 4)  # PDE[1] -> PT 0x2000
    ram32.put(0x2000 + 4 * 3, 0x9000 | P, 4)
    ram32.put(0x1000 + 4 * 2, 0x00C0_0000 | P | PS | (0x12 << 13), 4)  # PDE[2]: 4 MiB page, PA bits 32-39 = 0x12
    legacy = {"cr0": CR0_PE | CR0_PG, "cr4": CR4_PSE, "efer": 0}
    assert translate(ram32.read, 0x0040_3ABC, cr3=0x1000, **legacy) == 0x9ABC
    assert translate(ram32.read, 0x0092_3456, cr3=0x1000, **legacy) == (0x12 << 32) | 0xC0_0000 | 0x12_3456
    assert translate(ram32.read, 0x0092_3456, cr3=0x1000, cr0=CR0_PE | CR0_PG, cr4=0, efer=0) is None  # no PSE: PS ignored


def test_without_paging_the_address_is_physical():
    ram = Ram()
    assert translate(ram.read, 0x1234_5678, cr3=0, cr0=CR0_PE, cr4=0, efer=0) == 0x1234_5678
    assert translate(ram.read, 0x1_0000_1000, cr3=0, cr0=CR0_PE, cr4=0, efer=0) == 0x1000  # 32 bits


@given(st.binary(min_size=4096, max_size=4096), st.integers(0, (1 << 64) - 1))
def test_any_page_table_contents_give_an_address_or_none(table, linear):
    ram = Ram(1 << 16)
    ram.data[0x1000:0x2000] = table
    result = translate(ram.read, linear, cr3=0x1000, **LONG)
    assert result is None or 0 <= result < (1 << 52)
