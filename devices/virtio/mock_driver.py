"""A guest-side virtio driver model for tests and benchmarks (no guest, no hypervisor).

It plays what Linux's virtio_mmio and virtio_ring do: writes registers through
the transport's bus interface, lays out split rings in guest memory, publishes
descriptor chains, kicks, and reads the used ring. It also exposes raw
descriptor and ring writes so tests can break every rule on purpose.
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.status import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK

_DESC = struct.Struct("<QIHH")


class MockDriver:
    def __init__(self, transport: mmio.VirtioMmio, memory, *, alloc_base: int = 0x1000):
        self.transport = transport
        self.memory = memory
        self._next_free = alloc_base
        self.queues: list[DriverQueue] = []

    # --- registers ------------------------------------------------------
    def read_reg(self, offset: int) -> int:
        data = bytearray(4)
        self.transport.read(offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write_reg(self, offset: int, value: int) -> None:
        self.transport.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def read_config(self, offset: int, size: int) -> bytes:
        data = bytearray(size)
        self.transport.read(mmio.CONFIG + offset, memoryview(data))
        return bytes(data)

    @property
    def status(self) -> int:
        return self.read_reg(mmio.STATUS)

    def set_status(self, value: int) -> None:
        self.write_reg(mmio.STATUS, value)

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.write_reg(mmio.DEVICE_FEATURES_SEL, word)
            features |= self.read_reg(mmio.DEVICE_FEATURES) << (32 * word)
        return features

    def write_features(self, features: int) -> None:
        for word in (0, 1):
            self.write_reg(mmio.DRIVER_FEATURES_SEL, word)
            self.write_reg(mmio.DRIVER_FEATURES, features >> (32 * word) & 0xFFFFFFFF)

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self._next_free // align) * align
        self._next_free = addr + size
        if not self.memory.contains(addr, size):
            raise MemoryError(f"mock driver: guest memory exhausted allocating {size} bytes")
        return addr

    # --- the Linux probe sequence ---------------------------------------
    def negotiate(self, features: int | None = None, *, without: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK. Returns the accepted features."""
        self.set_status(0)
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        accepted = (self.device_features() if features is None else features) & ~without
        self.write_features(accepted)
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return accepted

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.write_reg(mmio.QUEUE_SEL, index)
        size = size or self.read_reg(mmio.QUEUE_NUM_MAX)
        queue = DriverQueue(self, index, size)
        self.write_reg(mmio.QUEUE_NUM, size)
        for low, addr in ((mmio.QUEUE_DESC_LOW, queue.desc), (mmio.QUEUE_DRIVER_LOW, queue.avail), (mmio.QUEUE_DEVICE_LOW, queue.used)):
            self.write_reg(low, addr & 0xFFFFFFFF)
            self.write_reg(low + 4, addr >> 32)
        self.write_reg(mmio.QUEUE_READY, 1)
        return queue

    def setup(self, features: int | None = None, *, without: int = 0, queue_size: int | None = None) -> int:
        """The whole probe: negotiate, set up every queue, DRIVER_OK. Returns the accepted features."""
        accepted = self.negotiate(features, without=without)
        if not self.status & FEATURES_OK:
            raise AssertionError(f"device refused FEATURES_OK: {self.transport.last_error}")
        self.queues = [self.setup_queue(i, queue_size) for i in range(len(self.transport.queues))]
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return accepted

    def ack_interrupt(self) -> int:
        cause = self.read_reg(mmio.INTERRUPT_STATUS)
        self.write_reg(mmio.INTERRUPT_ACK, cause)
        return cause


class DriverQueue:
    """The driver side of one split ring in guest memory."""

    def __init__(self, driver: MockDriver, index: int, size: int):
        self.driver = driver
        self.memory = driver.memory
        self.index = index
        self.size = size
        self.desc = driver.alloc(16 * size, 16)
        self.avail = driver.alloc(6 + 2 * size, 2)
        self.used = driver.alloc(6 + 8 * size, 4)
        self.memory.fill(self.desc, 16 * size)
        self.memory.fill(self.avail, 6 + 2 * size)
        self.memory.fill(self.used, 6 + 8 * size)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0

    # raw access, for breaking rules on purpose
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, _DESC.pack(addr, length, flags, next_index))

    def publish(self, head: int, *, kick: bool = True) -> None:
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)
        if kick:
            self.kick()

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_int(self.avail, 2, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * self.size, 2, value)

    def avail_event(self) -> int:
        return self.memory.read_int(self.used + 4 + 8 * self.size, 2)

    def kick(self) -> None:
        self.driver.write_reg(mmio.QUEUE_NOTIFY, self.index)

    # chains
    def add(self, buffers: list[tuple[int, int, bool]], *, indirect: bool = False, kick: bool = True) -> int:
        """Publish a chain of ``(addr, length, device_writable)`` buffers. Returns its head."""
        if indirect:
            table = self.driver.alloc(16 * len(buffers), 16)
            for i, (addr, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(i, addr, length, flags, i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
        else:
            slots = [self.free.pop(0) for _ in buffers]
            for i, (addr, length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(slots[i], addr, length, flags, 0 if last else slots[i + 1])
            head = slots[0]
        self.publish(head, kick=kick)
        return head

    def used_idx(self) -> int:
        return self.memory.read_int(self.used + 2, 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements ``(head, length)`` since the last call; their descriptors are freed."""
        result = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = self.memory.read_int(slot, 4), self.memory.read_int(slot + 4, 4)
            result.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free_chain(head)
        return result

    def _free_chain(self, head: int) -> None:
        index = head
        for _ in range(self.size):
            self.free.append(index)
            flags = self.memory.read_int(self.desc + 16 * index + 12, 2)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = self.memory.read_int(self.desc + 16 * index + 14, 2)


def mock_guest(device, memory_size: int = 2 << 20, *, memory=None, irq: int = 5) -> MockDriver:
    """``device`` behind a transport on ``memory`` (default: ``memory_size`` bytes of bytearray RAM).

    The interrupt line records every level change in ``driver.irq_levels``.
    """
    from pyvmm.devices.irq import IrqLine
    from pyvmm.vmm.memory import GuestMemory

    if memory is None:
        memory = GuestMemory.from_buffers([(0, bytearray(memory_size))])
    levels: list[bool] = []
    transport = mmio.VirtioMmio(device, memory, IrqLine(irq, lambda _irq, level: levels.append(level)))
    driver = MockDriver(transport, memory)
    driver.irq_levels = levels
    return driver


class ManualHost:
    """A ``DeviceHost`` for sans-IO tests: nothing runs by itself; the test fires fd events and
    moves a fake clock (``advance``), and the due timers run in deadline order."""

    def __init__(self):
        self.now = 0.0
        self.watched: dict[int, tuple[int, object]] = {}
        self._timers: list[list] = []  # [deadline, sequence, callback, cancelled]
        self._sequence = 0

    def watch(self, fd: int, events: int, callback) -> None:
        if fd in self.watched:
            raise ValueError(f"fd {fd} is already watched")
        self.watched[fd] = (events, callback)

    def modify(self, fd: int, events: int) -> None:
        self.watched[fd] = (events, self.watched[fd][1])

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def call_later(self, delay: float, callback):
        self._sequence += 1
        timer = _ManualTimer([self.now + max(0.0, delay), self._sequence, callback, False])
        self._timers.append(timer.entry)
        return timer

    def fire(self, fd: int, events: int) -> None:
        self.watched[fd][1](events)

    def pending_timers(self) -> int:
        return sum(1 for entry in self._timers if not entry[3])

    def advance(self, seconds: float) -> None:
        """Move the clock and run the timers that fall due, in order."""
        end = self.now + seconds
        while True:
            due = sorted((e for e in self._timers if not e[3] and e[0] <= end), key=lambda e: (e[0], e[1]))
            if not due:
                break
            entry = due[0]
            self._timers.remove(entry)
            self.now = max(self.now, entry[0])
            entry[2]()
        self.now = end


class _ManualTimer:
    def __init__(self, entry: list):
        self.entry = entry

    def cancel(self) -> None:
        self.entry[3] = True
