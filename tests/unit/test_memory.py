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


# --- the VMM's own writes (Diff snapshots on a hypervisor with a dirty log) ----------------------
def _written_pages(memory) -> list[list[int]]:
    return [[i for i, flag in enumerate(pages) if flag] for pages in memory.take_written()]


def test_writes_through_guest_memory_mark_their_pages_once_tracking():
    memory = GuestMemory.from_buffers([(0, bytearray(16 * 4096)), (0x100000, bytearray(4 * 4096))])
    memory.write(0x1000, b"x")  # before tracking: not recorded
    memory.track_writes()
    memory.write(0x2FFF, b"ab")  # straddles pages 2 and 3
    memory.write_int(0x100000 + 3 * 4096, 4, 7)
    memory.fill(0x5000, 2 * 4096)
    memory.read(0x9000, 100)  # reads mark nothing
    assert _written_pages(memory) == [[2, 3, 5, 6], [3]]
    assert _written_pages(memory) == [[], []]  # taken: the next epoch starts empty


def test_pages_taken_for_a_snapshot_that_failed_are_given_back():
    memory = GuestMemory.from_buffers([(0, bytearray(8 * 4096))])
    memory.track_writes()
    memory.write(0x1000, b"x")
    taken = memory.take_written()
    memory.write(0x3000, b"y")
    memory.give_back_written(taken)
    assert _written_pages(memory) == [[1, 3]]


def test_take_written_without_tracking_is_an_error():
    memory = GuestMemory.from_buffers([(0, bytearray(4096))])
    with pytest.raises(GuestMemoryError, match="not tracking"):
        memory.take_written()


def test_device_writable_buffers_of_a_virtqueue_are_marked_written():
    from pyvmm.devices.virtio.mock_driver import mock_guest
    from pyvmm.devices.virtio.rng import VirtioRng

    memory = GuestMemory.from_buffers([(0, bytearray(1 << 20))])
    memory.track_writes()
    driver = mock_guest(VirtioRng(), memory=memory)
    driver.setup()
    memory.take_written()  # the driver's own set-up writes
    driver.queues[0].add([(0x80000, 3 * 4096, True)])
    assert driver.queues[0].take_used()
    pages = _written_pages(memory)[0]
    assert {0x80, 0x81, 0x82} <= set(pages)


def test_the_stepper_records_the_pages_its_instructions_write():
    """The fallback's stepper writes guest RAM through its own engine, which no hypervisor log sees."""
    from unicorn.x86_const import UC_X86_REG_RAX

    from pyvmm.accel.stepper import Stepper
    from pyvmm.vmm.bus import MmioBus, PioBus

    memory = GuestMemory.anonymous([(0, 1 << 20)])
    memory.track_writes()
    memory.write(0x1000, bytes.fromhex("a2fe7f"))  # real mode: mov [0x7ffe], al
    memory.take_written()
    stepper = Stepper(0, memory, PioBus(), MmioBus(), [])
    try:
        stepper.uc.reg_write(UC_X86_REG_RAX, 0x55)
        stepper.uc.emu_start(0x1000, 0x1003, count=1)
    finally:
        stepper.close()
    assert memory.read(0x7FFE, 1) == b"\x55"
    assert _written_pages(memory) == [[7]]
