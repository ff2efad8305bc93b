"""Guest physical memory: regions of anonymous host memory with checked access.

A leaf module (imports nothing of pyvmm but the error type and host/), after rust-vmm's
``vm-memory``: every access names a guest-physical range, the range is checked
against the regions, and ``view()`` hands out a zero-copy ``memoryview`` that
cannot reach outside the region it lies in. Device models, loaders and
backends all go through it, so a guest address can never touch host memory
outside guest RAM.

Memory can also be built on plain ``bytearray`` buffers (``from_buffers``) so
device models are testable with no hypervisor present.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from pyvmm.errors import GuestMemoryError
from pyvmm.host import memory as host_memory


@dataclass(frozen=True)
class GuestRegion:
    guest_addr: int
    size: int
    #: the host buffer backing the region (an mmap, or a bytearray in tests)
    buffer: object
    #: a memoryview of the whole region
    view: memoryview

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    def __init__(self, regions: list[GuestRegion]):
        regions = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.guest_addr:
                raise GuestMemoryError(
                    f"guest memory regions overlap: [{a.guest_addr:#x}, {a.end:#x}) and [{b.guest_addr:#x}, {b.end:#x})"
                )
        self.regions: tuple[GuestRegion, ...] = tuple(regions)

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Allocate ``(guest_addr, size)`` regions from anonymous, lazily-populated host memory."""
        regions = []
        for guest_addr, size in layout:
            if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
                raise GuestMemoryError(f"guest memory region {guest_addr:#x}+{size:#x} is not page-aligned")
            try:
                buf = host_memory.anonymous(size)
            except OSError as err:
                raise GuestMemoryError(f"cannot allocate {size >> 20} MiB of guest RAM: {err.strerror}") from err
            regions.append(GuestRegion(guest_addr, size, buf, memoryview(buf)))
        return cls(regions)

    @classmethod
    def from_file(cls, path, layout: list[tuple[int, int, int]]) -> GuestMemory:
        """Map ``(guest_addr, size, file_offset)`` regions of a snapshot's memory file, copy-on-write:
        pages come from the file on first touch, the guest's writes never reach it."""
        import os

        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as err:
            raise GuestMemoryError(f"cannot open the memory file {path}: {err.strerror}") from err
        regions = []
        try:
            length = os.fstat(fd).st_size
            for guest_addr, size, offset in layout:
                if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE or offset % mmap.PAGESIZE:
                    raise GuestMemoryError(f"memory file {path}: region {guest_addr:#x}+{size:#x} at offset {offset:#x} is not page-aligned")
                if offset + size > length:
                    raise GuestMemoryError(f"memory file {path} is {length} bytes: too short for the region at "
                                           f"{guest_addr:#x}+{size:#x} (file offset {offset:#x}); truncated?")  # fmt: skip
                buf = host_memory.file_private(fd, offset, size)
                regions.append(GuestRegion(guest_addr, size, buf, memoryview(buf)))
        except OSError as err:
            raise GuestMemoryError(f"cannot map the memory file {path}: {err.strerror}") from err
        finally:
            os.close(fd)
        return cls(regions)

    @classmethod
    def from_buffers(cls, buffers: list[tuple[int, bytearray]]) -> GuestMemory:
        """Wrap existing writable buffers (for tests and sans-IO device models)."""
        return cls([GuestRegion(addr, len(buf), buf, memoryview(buf)) for addr, buf in buffers])

    # ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end if self.regions else 0

    def _region(self, addr: int, size: int) -> GuestRegion:
        for region in self.regions:
            if region.guest_addr <= addr and addr + size <= region.end and size >= 0:
                return region
        raise GuestMemoryError(f"guest address range {addr:#x}+{size:#x} is outside guest RAM")

    def contains(self, addr: int, size: int = 1) -> bool:
        """True when ``[addr, addr+size)`` lies inside one RAM region."""
        return any(r.guest_addr <= addr and addr + size <= r.end for r in self.regions) and size >= 0

    def view(self, addr: int, size: int) -> memoryview:
        """A writable zero-copy view of guest RAM ``[addr, addr+size)`` (one region)."""
        region = self._region(addr, size)
        start = addr - region.guest_addr
        return region.view[start : start + size]

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.view(addr, size))

    def write(self, addr: int, data) -> None:
        self.view(addr, len(data))[:] = data

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.view(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.view(addr, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        self.view(addr, size)[:] = bytes([byte]) * size

    def close(self) -> None:
        """Release the host memory. Views handed out keep their mmap alive until dropped."""
        for region in self.regions:
            region.view.release()
            if isinstance(region.buffer, mmap.mmap):
                try:
                    region.buffer.close()
                except BufferError:
                    pass  # a caller still holds a view; the mmap goes when it does
