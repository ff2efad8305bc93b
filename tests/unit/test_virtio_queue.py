"""Split virtqueue: every chain-walking rule broken once, each ending in DEVICE_NEEDS_RESET
through the transport (no exception escapes), plus property tests over random tables."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    QueueError,
    SplitQueue,
)
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from pyvmm.vmm.memory import GuestMemory

RAM = 1 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def guest():
    driver = mock_guest(VirtioRng(), RAM)
    driver.setup()
    return driver


def assert_needs_reset(driver, fragment):
    """The device refused: NEEDS_RESET set, a config-change interrupt raised, the reason recorded."""
    assert driver.status & DEVICE_NEEDS_RESET
    assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    assert driver.irq_levels[-1] is True
    assert fragment in driver.transport.last_error
    assert driver.transport.metrics()["needs_reset"] == 1


def test_happy_path_direct_and_indirect(guest):
    q = guest.queues[0]
    buf = guest.alloc(64)
    q.add([(buf, 64, True)])
    q.add([(buf, 32, True), (buf + 32, 32, True)], indirect=True)
    used = q.take_used()
    assert [length for _head, length in used] == [64, 64]
    assert not guest.status & DEVICE_NEEDS_RESET


def test_direct_descriptors_then_an_indirect_table(guest):
    """Spec 2.7.5.3.2: zero or more chained descriptors followed by one indirect descriptor."""
    q = guest.queues[0]
    first, table, tail = guest.alloc(16), guest.alloc(32), guest.alloc(48)
    q.write_desc(0, tail, 16, WRITE | NEXT, 1, table=table)
    q.write_desc(1, tail + 16, 32, WRITE, table=table)
    q.write_desc(0, first, 16, WRITE | NEXT, 1)
    q.write_desc(1, table, 32, INDIRECT)
    q.publish(0)
    assert q.take_used() == [(0, 64)]
    assert not guest.status & DEVICE_NEEDS_RESET


def test_notify_for_a_missing_queue_is_ignored(guest):
    guest.write_reg(mmio.QUEUE_NOTIFY, 7)
    assert not guest.status & DEVICE_NEEDS_RESET


def test_descriptor_loop(guest):
    q = guest.queues[0]
    buf = guest.alloc(16)
    q.write_desc(0, buf, 8, WRITE | NEXT, 1)
    q.write_desc(1, buf + 8, 8, WRITE | NEXT, 0)  # back to 0
    q.publish(0)
    assert_needs_reset(guest, "a loop")


def test_buffer_outside_ram(guest):
    q = guest.queues[0]
    q.write_desc(0, RAM - 8, 16, WRITE)  # straddles the end of RAM
    q.publish(0)
    assert_needs_reset(guest, "outside guest RAM")


def test_buffer_address_overflow(guest):
    q = guest.queues[0]
    q.write_desc(0, (1 << 64) - 8, 16, WRITE)
    q.publish(0)
    assert_needs_reset(guest, "outside guest RAM")


def test_chain_longer_than_queue(guest):
    q = guest.queues[0]
    size = q.size
    buf = guest.alloc(16)
    for i in range(size):  # every descriptor chained, the last one back to the first
        q.write_desc(i, buf, 1, WRITE | NEXT, (i + 1) % size)
    q.publish(0)
    assert_needs_reset(guest, "longer than its table")


def test_head_index_out_of_range(guest):
    q = guest.queues[0]
    q.publish(q.size)  # head == queue size
    assert_needs_reset(guest, "chain head")


def test_next_index_out_of_range(guest):
    q = guest.queues[0]
    buf = guest.alloc(16)
    q.write_desc(0, buf, 8, WRITE | NEXT, q.size + 3)
    q.publish(0)
    assert_needs_reset(guest, "next index")


def test_nested_indirect(guest):
    q = guest.queues[0]
    outer, inner = guest.alloc(32), guest.alloc(16)
    q.write_desc(0, inner, 16, INDIRECT, table=outer)
    q.write_desc(0, outer, 16, INDIRECT)
    q.publish(0)
    assert_needs_reset(guest, "nested indirect")


@pytest.mark.parametrize("length", [0, 24, 17])
def test_bad_indirect_length(guest, length):
    q = guest.queues[0]
    table = guest.alloc(64)
    q.write_desc(0, table, length, INDIRECT)
    q.publish(0)
    assert_needs_reset(guest, "indirect table length")


def test_indirect_table_too_many_entries(guest):
    q = guest.queues[0]
    table = guest.alloc(16 * (q.size + 1))
    q.write_desc(0, table, 16 * (q.size + 1), INDIRECT)
    q.publish(0)
    assert_needs_reset(guest, "indirect table length")


def test_indirect_table_outside_ram(guest):
    q = guest.queues[0]
    q.write_desc(0, RAM - 16, 32, INDIRECT)
    q.publish(0)
    assert_needs_reset(guest, "indirect table")


def test_indirect_with_next(guest):
    q = guest.queues[0]
    table = guest.alloc(16)
    q.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    q.publish(0)
    assert_needs_reset(guest, "also has NEXT")


def test_indirect_not_negotiated():
    driver = mock_guest(VirtioRng(), RAM)
    driver.setup(without=1 << VIRTIO_F_INDIRECT_DESC)
    q = driver.queues[0]
    buf = driver.alloc(16)
    q.add([(buf, 16, True)], indirect=True)
    assert_needs_reset(driver, "without VIRTIO_F_INDIRECT_DESC")


def test_total_length_overflow():
    # 4 GiB of lazily-populated anonymous RAM: only the pages the rings touch are ever allocated.
    memory = GuestMemory.anonymous([(0, 1 << 32)])
    driver = mock_guest(VirtioRng(), memory=memory)
    driver.setup()
    q = driver.queues[0]
    q.write_desc(0, 0, 0x8000_0000, WRITE | NEXT, 1)
    q.write_desc(1, 0x8000_0000, 0x8000_0000, WRITE)
    q.publish(0)
    assert_needs_reset(driver, "2^32")
    memory.close()


def test_avail_index_jump(guest):
    q = guest.queues[0]
    q.set_avail_idx(q.size + 1)
    q.kick()
    assert_needs_reset(guest, "ahead of")


def test_readable_after_writable(guest):
    q = guest.queues[0]
    buf = guest.alloc(16)
    q.add([(buf, 8, True), (buf + 8, 8, False)])
    assert_needs_reset(guest, "readable buffer after a device-writable")


def test_device_recovers_after_reset(guest):
    q = guest.queues[0]
    q.publish(q.size)
    assert guest.status & DEVICE_NEEDS_RESET
    guest.setup()
    q = guest.queues[0]
    buf = guest.alloc(32)
    q.add([(buf, 32, True)])
    assert q.take_used()[0][1] == 32
    assert not guest.status & DEVICE_NEEDS_RESET


def test_no_interrupt_flag_without_event_idx():
    driver = mock_guest(VirtioRng(), RAM)
    driver.setup(without=1 << VIRTIO_F_EVENT_IDX)
    q = driver.queues[0]
    q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    buf = driver.alloc(16)
    q.add([(buf, 16, True)])
    assert q.take_used()
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == 0
    q.set_avail_flags(0)
    q.add([(buf, 16, True)])
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER


def test_event_idx_suppression(guest):
    q = guest.queues[0]
    buf = guest.alloc(16)
    q.set_used_event(2)  # interrupt only once used idx passes 2, i.e. on the 3rd used chain
    causes = []
    for _ in range(4):
        q.add([(buf, 16, True)])
        causes.append(guest.ack_interrupt())
    assert causes == [0, 0, mmio.INTERRUPT_USED_BUFFER, 0]
    # the device asks to be kicked at the next available index
    assert q.avail_event() == q.avail_idx


def test_queue_rejects_bad_ring_addresses():
    driver = mock_guest(VirtioRng(), RAM)
    driver.negotiate()
    driver.write_reg(mmio.QUEUE_SEL, 0)
    driver.write_reg(mmio.QUEUE_NUM, 64)
    driver.write_reg(mmio.QUEUE_DESC_LOW, RAM - 16)  # table needs 1 KiB
    driver.write_reg(mmio.QUEUE_READY, 1)
    assert_needs_reset(driver, "descriptor table")


def test_queue_rejects_non_power_of_two_size():
    driver = mock_guest(VirtioRng(), RAM)
    driver.negotiate()
    driver.write_reg(mmio.QUEUE_SEL, 0)
    driver.write_reg(mmio.QUEUE_NUM, 48)
    driver.write_reg(mmio.QUEUE_READY, 1)
    assert_needs_reset(driver, "power of two")


# --- property tests ------------------------------------------------------
QSIZE = 16
PROP_RAM = 0x4000
DESC_TABLE, AVAIL, USED, INDIRECT_AREA = 0x0, 0x200, 0x300, 0x400

descriptors = st.tuples(
    st.one_of(st.integers(0, PROP_RAM + 64), st.integers(0, (1 << 64) - 1)),  # addr
    st.one_of(st.integers(0, 64), st.integers(0, (1 << 32) - 1)),  # len
    st.integers(0, 7),  # flags: NEXT | WRITE | INDIRECT in every combination
    st.integers(0, QSIZE + 2),  # next, sometimes out of range
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptors, min_size=QSIZE, max_size=QSIZE),
    indirect_table=st.lists(descriptors, min_size=QSIZE, max_size=QSIZE),
    head=st.integers(0, QSIZE + 1),
    indirect_enabled=st.booleans(),
)
def test_random_tables_terminate_inside_ram(table, indirect_table, head, indirect_enabled):
    memory = GuestMemory.from_buffers([(0, bytearray(PROP_RAM))])
    for i, desc in enumerate(table):
        memory.write(DESC_TABLE + 16 * i, struct.pack("<QIHH", *desc))
    for i, desc in enumerate(indirect_table):
        memory.write(INDIRECT_AREA + 16 * i, struct.pack("<QIHH", *desc))
    queue = SplitQueue(0, QSIZE)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC_TABLE, AVAIL, USED
    queue.indirect = indirect_enabled
    queue.validate(memory)
    queue.ready = True
    steps = 0
    try:
        for desc in queue.iter_chain(memory, head):
            steps += 1
            assert memory.contains(desc.addr, desc.length)
            assert len(desc.view) == desc.length
            assert steps <= 2 * QSIZE  # the ring's own chain plus at most one indirect table
    except QueueError:
        pass
    assert steps <= 2 * QSIZE


@settings(max_examples=200, deadline=None)
@given(
    avail_idx=st.integers(0, 0xFFFF),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=QSIZE, max_size=QSIZE),
    table=st.lists(descriptors, min_size=QSIZE, max_size=QSIZE),
)
def test_random_rings_pop_is_bounded(avail_idx, ring, table):
    memory = GuestMemory.from_buffers([(0, bytearray(PROP_RAM))])
    for i, desc in enumerate(table):
        memory.write(DESC_TABLE + 16 * i, struct.pack("<QIHH", *desc))
    memory.write(AVAIL + 2, struct.pack("<H", avail_idx))
    memory.write(AVAIL + 4, struct.pack(f"<{QSIZE}H", *ring))
    queue = SplitQueue(0, QSIZE)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC_TABLE, AVAIL, USED
    queue.validate(memory)
    queue.ready = True
    popped = 0
    try:
        while (chain := queue.pop(memory)) is not None:
            popped += 1
            for view in chain.readable + chain.writable:
                assert view.obj is memory.regions[0].buffer
            assert popped <= QSIZE
    except QueueError:
        pass
    assert popped <= min(avail_idx, QSIZE)
