"""GuestMemory: every access is range-checked; views are zero-copy."""

import pytest

from pyvmm.errors import GuestMemoryError
from pyvmm.vmm import layout
from pyvmm.vmm.memory import GuestMemory


def test_anonymous_regions_are_zeroed_and_writable():
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    assert mem.read(0, 16) == bytes(16)
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_int(0x2000, 4, 0xDEADBEEF)
    assert mem.read_int(0x2000, 4) == 0xDEADBEEF
    assert mem.read(0x2000, 4) == b"\xef\xbe\xad\xde"
    mem.close()


def test_view_is_zero_copy():
    buf = bytearray(4096)
    mem = GuestMemory.from_buffers([(0x10000, buf)])
    view = mem.view(0x10010, 4)
    view[:] = b"abcd"
    assert buf[0x10:0x14] == b"abcd"
    buf[0x20] = 7
    assert mem.read(0x10020, 1) == b"\x07"


@pytest.mark.parametrize(
    "addr, size",
    [
        (0x10000 - 1, 1),  # below
        (0x10000 + 4096, 1),  # just past the end
        (0x10000 + 4095, 2),  # straddles the end
        (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wraps around
        (0x10000, -1),  # negative length
    ],
)
def test_out_of_range_accesses_are_rejected(addr, size):
    mem = GuestMemory.from_buffers([(0x10000, bytearray(4096))])
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        mem.view(addr, size)
    assert not mem.contains(addr, size)


def test_access_may_not_span_two_regions_even_if_adjacent():
    mem = GuestMemory.from_buffers([(0, bytearray(4096)), (4096, bytearray(4096))])
    assert mem.contains(4000, 96) and mem.contains(4096, 96)
    with pytest.raises(GuestMemoryError):
        mem.view(4090, 10)


def test_overlapping_regions_are_rejected():
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory.from_buffers([(0, bytearray(8192)), (4096, bytearray(4096))])


def test_unaligned_anonymous_region_is_rejected():
    with pytest.raises(GuestMemoryError, match="page-aligned"):
        GuestMemory.anonymous([(0, 1000)])


def test_layout_splits_ram_around_the_mmio_gap():
    assert layout.ram_layout(128 << 20) == [(0, 128 << 20)]
    big = 4 * layout.GiB + 512 * layout.MiB
    regions = layout.ram_layout(big)
    assert regions == [(0, layout.MMIO_GAP_START), (layout.MMIO_GAP_END, big - layout.MMIO_GAP_START)]
    assert sum(size for _, size in regions) == big


def test_large_sparse_memory_is_cheap():
    # 5 GiB of guest RAM must not be committed up front (MAP_NORESERVE, lazily populated)
    mem = GuestMemory.anonymous(layout.ram_layout(5 * layout.GiB))
    assert mem.size == 5 * layout.GiB
    assert mem.end == layout.MMIO_GAP_END + 5 * layout.GiB - layout.MMIO_GAP_START
    mem.write(mem.end - 8, b"12345678")
    assert mem.read(mem.end - 8, 8) == b"12345678"
    mem.close()
