"""virtio-balloon through the mock driver: the target and its configuration-change interrupt, inflated
pages given back to the host (anonymous mmap, shared memfd, bytearray), deflate, statistics polled on the
host's timer, and a guest's bad PFNs."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.balloon import (
    DEFLATE_QUEUE,
    INFLATE_QUEUE,
    STATS_QUEUE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
)
from pyvmm.devices.virtio.mock_driver import ManualHost, mock_guest
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET
from pyvmm.errors import DeviceError
from pyvmm.vmm.memory import GuestMemory

PAGE = 4096


def send_pfns(driver, queue, pfns: list[int]) -> None:
    """One request of little-endian 32-bit PFNs, as Linux's balloon driver sends them."""
    addr = driver.alloc(4 * len(pfns), 4)
    driver.memory.write(addr, struct.pack(f"<{len(pfns)}I", *pfns))
    queue.add([(addr, 4 * len(pfns), False)])


def test_features_queues_and_config():
    plain = mock_guest(VirtioBalloon(target_pages=10))
    features = plain.setup()
    assert not features >> VIRTIO_BALLOON_F_STATS_VQ & 1 and not features >> VIRTIO_BALLOON_F_DEFLATE_ON_OOM & 1
    assert plain.read_reg(mmio.DEVICE_ID) == 5 and len(plain.queues) == 2
    assert struct.unpack("<II", plain.read_config(0, 8)) == (10, 0)
    full = mock_guest(VirtioBalloon(deflate_on_oom=True, stats_polling_interval_s=1))
    features = full.setup()
    assert features >> VIRTIO_BALLOON_F_STATS_VQ & 1 and features >> VIRTIO_BALLOON_F_DEFLATE_ON_OOM & 1
    assert len(full.queues) == 3


def test_the_driver_writes_actual_and_a_new_target_raises_a_config_interrupt():
    device = VirtioBalloon()
    driver = mock_guest(device)
    driver.setup()
    driver.transport.write(mmio.CONFIG + 4, (300).to_bytes(4, "little"))
    driver.transport.write(mmio.CONFIG + 0, (7).to_bytes(4, "little"))  # num_pages is the host's: ignored
    assert device.actual_pages == 300 and device.target_pages == 0
    driver.transport.write(mmio.CONFIG + 5, b"\x02")  # a one-byte write to actual's second byte
    assert device.actual_pages == 300 - 0x100 + 0x200
    generation = driver.read_reg(mmio.CONFIG_GENERATION)
    driver.transport.update_device(lambda: device.set_target(1234))
    assert driver.read_reg(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    assert driver.read_reg(mmio.CONFIG_GENERATION) != generation
    assert struct.unpack("<I", driver.read_config(0, 4))[0] == 1234
    with pytest.raises(DeviceError, match="32-bit"):
        device.set_target(1 << 32)


def test_inflate_gives_anonymous_pages_back_to_the_host():
    psutil = pytest.importorskip("psutil")
    if not hasattr(mmap.mmap, "madvise"):
        pytest.skip("no madvise on this host")
    size = 96 << 20
    memory = GuestMemory.anonymous([(0, size)])
    try:
        device = VirtioBalloon()
        driver = mock_guest(device, memory=memory)
        driver.setup()
        first, count = (16 << 20) // PAGE, (64 << 20) // PAGE  # guest pages 16-80 MiB
        memory.view(first * PAGE, count * PAGE)[:] = b"\xa5" * (count * PAGE)
        before = psutil.Process().memory_info().rss
        inflate = driver.queues[INFLATE_QUEUE]
        for start in range(first, first + count, 256):
            send_pfns(driver, inflate, list(range(start, start + 256)))
            inflate.take_used()
        after = psutil.Process().memory_info().rss
        assert before - after > 56 << 20, f"RSS fell by {(before - after) >> 20} MiB only"
        assert memory.read(first * PAGE, PAGE) == bytes(PAGE)  # a freed page reads back as zeroes
        assert memory.read((first + count - 1) * PAGE, PAGE) == bytes(PAGE)
        assert memory.read((first + count) * PAGE, 4) == b"\0\0\0\0"  # untouched beyond: was never written
        assert memory.read((first - 1) * PAGE, PAGE) == bytes(PAGE)
        assert device.metrics.extra["inflated_pages"] == count
    finally:
        driver.transport.close()
        memory.close()


def test_inflate_punches_holes_in_shared_memfd_memory():
    if not hasattr(os, "memfd_create") or not hasattr(mmap, "MADV_REMOVE"):
        pytest.skip("needs memfd_create and MADV_REMOVE")
    memory = GuestMemory.shared([(0, 8 << 20)])  # what a VM with a vhost-user device runs on
    fd = memory.regions[0].fd
    try:
        device = VirtioBalloon()
        driver = mock_guest(device, memory=memory)
        driver.setup()
        memory.fill(4 << 20, 4 << 20, 0x5A)
        blocks = os.fstat(fd).st_blocks
        send_pfns(driver, driver.queues[INFLATE_QUEUE], list(range(1024, 2048)))
        # the file's pages are gone (MADV_DONTNEED would only have unmapped them from this process)
        assert os.fstat(fd).st_blocks <= blocks - (4 << 20) // 512 + 8
        assert os.pread(fd, PAGE, 5 << 20) == bytes(PAGE) and memory.read(5 << 20, PAGE) == bytes(PAGE)
    finally:
        driver.transport.close()
        memory.close()


def test_inflate_zero_fills_bytearray_ram_and_deflate_is_counted():
    device = VirtioBalloon()
    driver = mock_guest(device, 2 << 20)
    driver.setup()
    driver.memory.fill(0x100000, 3 * PAGE, 0xEE)
    send_pfns(driver, driver.queues[INFLATE_QUEUE], [0x101, 0x100, 0x102])
    assert driver.queues[INFLATE_QUEUE].take_used() == [(0, 0)]
    assert driver.memory.read(0x100000, 3 * PAGE) == bytes(3 * PAGE)
    send_pfns(driver, driver.queues[DEFLATE_QUEUE], [0x100, 0x101])
    assert len(driver.queues[DEFLATE_QUEUE].take_used()) == 1
    assert device.metrics.extra["inflated_pages"] == 3 and device.metrics.extra["deflated_pages"] == 2


def test_bad_pfns_are_skipped_and_the_device_goes_on(caplog):
    device = VirtioBalloon()
    driver = mock_guest(device, 2 << 20)
    driver.setup()
    driver.memory.fill(0x10000, PAGE, 0x77)
    inflate = driver.queues[INFLATE_QUEUE]
    send_pfns(driver, inflate, [0x10, 0x200, 0xFFFFFFFF, 0x1FF])  # 0x200: just past 2 MiB of RAM
    assert inflate.take_used() == [(0, 0)]
    assert driver.memory.read(0x10000, PAGE) == bytes(PAGE) and driver.memory.read(0x1FF000, 4) == b"\0" * 4
    assert device.metrics.extra["bad_pfns"] == 2 and device.metrics.extra["inflated_pages"] == 2
    assert "outside guest RAM" in caplog.text
    # an absurd request (more PFNs than any driver sends at once) is ignored as a whole
    huge = driver.alloc(4 * 70000, 4)
    driver.memory.fill(huge, 4 * 70000, 0)
    inflate.add([(huge, 4 * 70000, False)])
    assert len(inflate.take_used()) == 1
    assert device.metrics.extra["inflated_pages"] == 2
    # ragged: 6 bytes = one PFN and a stray half
    addr = driver.alloc(8, 4)
    driver.memory.write(addr, struct.pack("<I", 0x11) + b"\x01\x02")
    inflate.add([(addr, 6, False)])
    assert len(inflate.take_used()) == 1 and device.metrics.extra["inflated_pages"] == 3
    assert not driver.status & DEVICE_NEEDS_RESET


def stats_buffer(driver, values: dict[int, int]) -> int:
    data = b"".join(struct.pack("<HQ", tag, value) for tag, value in values.items())
    addr = driver.alloc(len(data), 2)
    driver.memory.write(addr, data)
    driver.queues[STATS_QUEUE].add([(addr, len(data), False)])


def test_statistics_are_requested_every_interval_on_one_timer():
    host = ManualHost()
    device = VirtioBalloon(stats_polling_interval_s=5)
    device.attach_host(host)
    driver = mock_guest(device)
    driver.setup()
    stats = driver.queues[STATS_QUEUE]
    assert host.pending_timers() == 1
    stats_buffer(driver, {5: 256 << 20, 4: 100 << 20, 2: 7, 99: 1})  # tag 99: unknown, skipped
    assert stats.take_used() == []  # the device holds the buffer
    assert stats.avail_event() == 1  # and asks for a kick with the next one (a Linux driver negotiates EVENT_IDX)
    assert device.stats == {"total_memory": 256 << 20, "free_memory": 100 << 20, "major_faults": 7}
    host.advance(4.9)
    assert stats.take_used() == []
    host.advance(0.1)
    assert stats.take_used() == [(0, 0)]  # given back: the driver is asked for fresh numbers
    assert host.pending_timers() == 1
    stats_buffer(driver, {5: 256 << 20, 4: 90 << 20})
    assert device.stats["free_memory"] == 90 << 20
    host.advance(5)
    assert len(stats.take_used()) == 1 and host.pending_timers() == 1
    host.advance(5)  # nothing held (the driver did not answer yet): nothing to give back
    assert stats.take_used() == [] and host.pending_timers() == 1
    stats_buffer(driver, {4: 80 << 20})
    device.set_stats_interval(1)  # a new interval asks at once (on the loop), then every second
    assert host.pending_timers() == 1
    host.advance(0)
    assert len(stats.take_used()) == 1
    stats_buffer(driver, {4: 70 << 20})
    host.advance(1)
    assert len(stats.take_used()) == 1 and host.pending_timers() == 1
    with pytest.raises(DeviceError, match="cannot be turned off"):
        device.set_stats_interval(0)
    assert device.metrics.extra["stats_updates"] == 4
    driver.set_status(0)  # reset: the timer goes
    assert host.pending_timers() == 0


def test_state_round_trip():
    device = VirtioBalloon(target_pages=100, stats_polling_interval_s=2)
    device.actual_pages, device._stats_head, device.stats = 90, 3, {"free_memory": 5}
    copy = VirtioBalloon(target_pages=0, stats_polling_interval_s=2)
    copy.restore_state(device.save_state())
    assert copy.save_state() == device.save_state()
