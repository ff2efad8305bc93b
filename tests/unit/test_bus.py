"""Buses: overlaps rejected, devices see offsets, unhandled accesses read as ones."""

import pytest

from pyvmm.vmm.bus import BusError, MmioBus, PioBus


class Recorder:
    def __init__(self):
        self.reads, self.writes = [], []

    def read(self, offset, data):
        self.reads.append((offset, len(data)))
        data[:] = bytes([offset & 0xFF]) * len(data)

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_devices_see_offsets():
    bus, dev = PioBus(), Recorder()
    bus.insert(dev, 0x3F8, 8)
    buf = bytearray(1)
    bus.read(0x3FD, memoryview(buf))
    bus.write(0x3F8, b"A")
    assert dev.reads == [(5, 1)] and buf == b"\x05"
    assert dev.writes == [(0, b"A")]


@pytest.mark.parametrize("base, size", [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x20), (0x3FA, 2)])
def test_overlaps_are_rejected(base, size):
    bus = PioBus()
    bus.insert(Recorder(), 0x3F8, 8)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Recorder(), base, size)


def test_adjacent_ranges_are_fine_and_found():
    bus = MmioBus()
    a, b = Recorder(), Recorder()
    bus.insert(b, 0xD000_1000, 0x1000)
    bus.insert(a, 0xD000_0000, 0x1000)
    assert bus.find(0xD000_0FFF) == (a, 0xFFF)
    assert bus.find(0xD000_1000) == (b, 0)
    assert bus.find(0xD000_2000) is None
    assert bus.find(0xCFFF_FFFF) is None


@pytest.mark.parametrize("base, size", [(0, 0), (-1, 2), (0xFFFF, 2)])
def test_invalid_ranges(base, size):
    with pytest.raises(BusError, match="invalid"):
        PioBus().insert(Recorder(), base, size)


def test_unhandled_reads_are_all_ones_and_counted():
    bus = PioBus()
    buf = bytearray(4)
    bus.read(0x2F0, memoryview(buf))
    bus.write(0x2F0, b"x")
    assert buf == b"\xff" * 4
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, 1)
