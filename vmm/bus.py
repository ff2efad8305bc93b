"""Port-I/O and MMIO buses.

After Firecracker's ``Bus``: ``insert`` rejects overlapping ranges, and a
device sees offsets into its own range only, never absolute addresses, so the
same device model can sit at any base.

A device implements ``read(offset, data)`` (fill the writable ``data``) and
``write(offset, data)``. Accesses that hit no device read as all-ones and are
ignored on write, as on a PC; the bus counts them so ``-v`` can report them.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from pyvmm.errors import PyvmmError


_MAX_CACHED_ADDRESSES = 4096


class BusError(PyvmmError):
    """A device range that cannot be inserted."""


class BusDevice(Protocol):
    def read(self, offset: int, data: memoryview) -> None: ...
    def write(self, offset: int, data: bytes | memoryview) -> None: ...


class Bus:
    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device), sorted by base
        self.unhandled_reads = 0
        self.unhandled_writes = 0
        # addr -> (device, offset) for addresses seen before: the exit path
        # mostly hits a handful of registers, and a dict lookup beats bisect.
        self._hits: dict[int, tuple[BusDevice, int]] = {}

    def insert(self, device: BusDevice, base: int, size: int) -> None:
        end = base + size
        if size <= 0 or base < 0 or end > self.limit:
            raise BusError(f"{self.name} bus: range {base:#x}+{size:#x} is invalid")
        i = bisect.bisect_left(self._bases, base)
        prev = self._entries[i - 1] if i > 0 else None
        nxt = self._entries[i] if i < len(self._entries) else None
        for other in (prev, nxt):
            if other and base < other[1] and other[0] < end:
                raise BusError(
                    f"{self.name} bus: {type(device).__name__} at [{base:#x}, {end:#x}) overlaps "
                    f"{type(other[2]).__name__} at [{other[0]:#x}, {other[1]:#x})"
                )
        self._bases.insert(i, base)
        self._entries.insert(i, (base, end, device))
        self._hits.clear()

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device covering ``addr`` and the offset of ``addr`` in its range."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base, end, device = self._entries[i]
            if addr < end:
                return device, addr - base
        return None

    def _lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        hit = self.find(addr)
        if hit is not None:
            if len(self._hits) >= _MAX_CACHED_ADDRESSES:
                self._hits.clear()
            self._hits[addr] = hit
        return hit

    def read(self, addr: int, data: memoryview) -> None:
        hit = self._hits.get(addr) or self._lookup(addr)
        if hit is None:
            self.unhandled_reads += 1
            data[:] = b"\xff" * len(data)
        else:
            hit[0].read(hit[1], data)

    def write(self, addr: int, data) -> None:
        hit = self._hits.get(addr) or self._lookup(addr)
        if hit is None:
            self.unhandled_writes += 1
        else:
            hit[0].write(hit[1], data)

    def devices(self) -> list[tuple[int, int, BusDevice]]:
        return list(self._entries)


class PioBus(Bus):
    def __init__(self):
        super().__init__("port I/O", 0x10000)


class MmioBus(Bus):
    def __init__(self):
        super().__init__("MMIO", 1 << 52)
