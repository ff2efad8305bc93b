"""The split virtqueue (virtio 1.2, section 2.7), sans-IO.

After rust-vmm's ``virtio-queue``: the queue holds only the ring addresses and
its own indices; guest memory is passed into every call, and the queue never
signals anything: it answers ``needs_notification()`` and the transport
decides. Every step of a descriptor chain walk is bounded (indices, chain
length, indirect tables, address ranges, total length), and any violation is
a ``QueueError`` that the transport turns into DEVICE_NEEDS_RESET.

Layout in guest memory (all little-endian), for a queue of ``size`` entries:
  descriptor table  16 * size   {u64 addr, u32 len, u16 flags, u16 next}, 16-aligned
  available ring    6 + 2*size  {u16 flags, u16 idx, u16 ring[size], u16 used_event}, 2-aligned
  used ring         6 + 8*size  {u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event}, 4-aligned
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple

from pyvmm.errors import DeviceError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def _view(regions, addr: int, length: int) -> memoryview | None:
    """The view of guest RAM ``[addr, addr+length)`` if it lies inside one region (GuestMemory.view, inlined)."""
    for start, end, view in regions:
        if start <= addr and addr + length <= end:
            return view[addr - start : addr - start + length]
    return None


class QueueError(DeviceError):
    """The driver broke a virtqueue rule; the device must be reset by the driver."""


class Descriptor(NamedTuple):
    addr: int
    length: int
    writable: bool
    #: the zero-copy view of ``[addr, addr+length)`` in guest RAM
    view: memoryview


class DescriptorChain:
    """One request: the device-readable buffers, then the device-writable ones."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head, readable, writable, readable_len, writable_len):
        self.head = head
        self.readable: list[memoryview] = readable
        self.writable: list[memoryview] = writable
        self.readable_len: int = readable_len
        self.writable_len: int = writable_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={len(self.readable)}/{self.readable_len}B, "
            f"writable={len(self.writable)}/{self.writable_len}B)"
        )


class SplitQueue:
    """Device side of one split virtqueue."""

    def __init__(self, index: int, max_size: int = 256):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two in [1, {MAX_QUEUE_SIZE}]")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        #: negotiated ring features, set by the transport when the driver is ready
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self._known_avail = 0  # the driver's avail index when last read
        self.next_used = 0
        self._last_signalled_used = 0
        self._memory = None
        self._desc = self._avail = self._used = None
        self._regions = []
        self._mark_written = None

    # --- setup -----------------------------------------------------------
    def _where(self) -> str:
        return f"virtqueue {self.index}"

    def validate(self, memory) -> None:
        """Check the driver's configuration before the queue goes live (QueueReady = 1)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueError(f"{self._where()}: size {size} is not a power of two in [1, {self.max_size}]")
        for name, addr, align, length in (
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
            ("available ring", self.avail_addr, 2, 6 + 2 * size),
            ("used ring", self.used_addr, 4, 6 + 8 * size),
        ):
            if addr % align:
                raise QueueError(f"{self._where()}: {name} at {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"{self._where()}: {name} {addr:#x}+{length:#x} is outside guest RAM")
        self._map(memory)

    def _map(self, memory) -> None:
        # The rings' views are cached per GuestMemory object: re-finding the region on every
        # ring access would dominate the per-request cost.
        size = self.size
        self._desc = memory.view(self.desc_addr, DESC_SIZE * size)
        self._avail = memory.view(self.avail_addr, 6 + 2 * size)
        self._used = memory.view(self.used_addr, 6 + 8 * size)
        self._regions = [(r.guest_addr, r.end, r.view) for r in memory.regions]
        self._memory = memory
        # Device-writable buffers are recorded as written when memory tracks the VMM's writes
        # (a Diff snapshot on KVM: the hypervisor's dirty log does not see them). The used ring
        # is marked by the snapshot itself, keeping this off the per-request path.
        self._mark_written = memory.mark_written if getattr(memory, "tracking_writes", False) else None

    def _rings(self, memory) -> None:
        if memory is not self._memory:
            if not self.ready:
                raise QueueError(f"{self._where()}: used before the driver made it ready")
            self.validate(memory)

    # --- the available ring ----------------------------------------------
    def pending(self, memory) -> int:
        """How many chains the driver has made available that the device has not taken."""
        self._rings(memory)
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        count = (avail_idx - self.next_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(
                f"{self._where()}: available index {avail_idx} is {count} entries ahead of "
                f"{self.next_avail}, more than the queue size {self.size}"
            )
        self._known_avail = avail_idx
        return count

    def pop(self, memory) -> DescriptorChain | None:
        """The next available descriptor chain, or None when the ring is empty."""
        # The guest's avail index is re-read only once the chains it announced are consumed.
        if self.next_avail == self._known_avail or memory is not self._memory:
            if not self.pending(memory):
                return None
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.next_avail % self.size))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._walk(memory, head, None)

    def undo_pop(self) -> None:
        """Give the last popped chain back (it will be popped again)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self._known_avail = self.next_avail  # forces a re-read on the next pop

    def iter_chain(self, memory, head: int) -> Iterator[Descriptor]:
        """The descriptors of the chain at ``head`` (the whole chain is checked first)."""
        self._rings(memory)
        trace: list[Descriptor] = []
        self._walk(memory, head, trace)
        return iter(trace)

    def _walk(self, memory, head: int, trace: list | None) -> DescriptorChain:
        """Walk the chain starting at ``head``; every step is checked before it is taken.

        The one implementation of the rules, written flat because it runs for every request.
        """
        size = self.size
        where = self._where
        if head >= size:
            raise QueueError(f"{where()}: chain head {head} is not below the queue size {size}")
        regions = self._regions
        # Most guests have one RAM region below the MMIO hole: check it inline, the rest via _view.
        ram_start, ram_end, ram = regions[0] if regions else (0, 0, None)
        table, table_len, index = self._desc, size, head
        in_indirect = False
        steps = 0
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        unpack = _DESC.unpack_from
        mark_written = self._mark_written
        while True:
            addr, length, flags, next_index = unpack(table, DESC_SIZE * index)
            steps += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError(f"{where()}: chain {head}: nested indirect descriptor table")
                if not self.indirect:
                    raise QueueError(f"{where()}: chain {head}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"{where()}: chain {head}: indirect descriptor also has NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    raise QueueError(
                        f"{where()}: chain {head}: indirect table length {length} is not a multiple of "
                        f"16 bytes holding 1 to {size} descriptors"
                    )
                table = _view(regions, addr, length)
                if table is None:
                    raise QueueError(f"{where()}: chain {head}: indirect table {addr:#x}+{length:#x} is outside guest RAM")
                table_len, index, steps, in_indirect = length // DESC_SIZE, 0, 0, True
                continue
            if ram_start <= addr and addr + length <= ram_end:
                view = ram[addr - ram_start : addr - ram_start + length]
            else:
                view = _view(regions, addr, length)
                if view is None:
                    raise QueueError(f"{where()}: chain {head}: buffer {addr:#x}+{length:#x} is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(view)
                writable_len += length
                if mark_written is not None:
                    mark_written(addr, length)
            elif writable:
                raise QueueError(f"{where()}: chain {head} has a device-readable buffer after a device-writable one")
            else:
                readable.append(view)
                readable_len += length
            if readable_len + writable_len >= MAX_CHAIN_BYTES:
                raise QueueError(f"{where()}: chain {head}: total length reaches 2^32 bytes")
            if trace is not None:
                trace.append(Descriptor(addr, length, bool(flags & VIRTQ_DESC_F_WRITE), view))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_len, writable_len)
            if next_index >= table_len:
                raise QueueError(
                    f"{where()}: chain {head}: next index {next_index} is not below the "
                    f"{'indirect table' if in_indirect else 'queue'} size {table_len}"
                )
            if steps >= table_len:
                raise QueueError(f"{where()}: chain {head} is longer than its table of {table_len} descriptors (a loop?)")
            index = next_index

    # --- the used ring ---------------------------------------------------
    def add_used(self, memory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written into it."""
        if memory is not self._memory:
            self._rings(memory)
        if not 0 <= head < self.size:
            raise QueueError(f"{self._where()}: used head {head} is not below the queue size {self.size}")
        used = self._used
        _USED_ELEM.pack_into(used, 4 + 8 * (self.next_used % self.size), head, length)
        # The element is stored before the index that publishes it (x86 keeps store order;
        # the interpreter's GIL handoffs are full barriers).
        self.next_used = (self.next_used + 1) & 0xFFFF
        _U16.pack_into(used, 2, self.next_used)

    def needs_notification(self, memory) -> bool:
        """Whether the driver wants an interrupt for the chains used since the last call."""
        self._rings(memory)
        new, old = self.next_used, self._last_signalled_used
        self._last_signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            # vring_need_event: did the used index step past used_event in (old, new]?
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(self._avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    def disable_notification(self, memory) -> None:
        """Ask the driver not to notify while the device is draining the ring."""
        self._rings(memory)
        if not self.event_idx:  # with EVENT_IDX a stale avail_event already means "no kicks"
            _U16.pack_into(self._used, 0, VRING_USED_F_NO_NOTIFY)

    def enable_notification(self, memory) -> bool:
        """Ask for a kick on the next available chain; True if chains arrived meanwhile."""
        self._rings(memory)
        if self.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.next_avail)
        else:
            _U16.pack_into(self._used, 0, 0)
        return self.pending(memory) > 0
