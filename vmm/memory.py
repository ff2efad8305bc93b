"""Guest physical memory: regions of anonymous host memory with checked access.

A leaf module (imports nothing of pyvmm but the error type and host/), after rust-vmm's
``vm-memory``: every access names a guest-physical range, the range is checked
against the regions, and ``view()`` hands out a zero-copy ``memoryview`` that
cannot reach outside the region it lies in. Device models, loaders and
backends all go through it, so a guest address can never touch host memory
outside guest RAM.

Memory can also be built on plain ``bytearray`` buffers (``from_buffers``) so
device models are testable with no hypervisor present.

For Diff snapshots on a hypervisor with a dirty-page log (KVM), the VMM's own
writes to guest RAM are not in that log: ``track_writes()`` makes this object
remember them per page (``write``, ``write_int`` and ``fill`` mark what they
touch; code writing through a ``view()`` calls ``mark_written``), and
``take_written()`` hands them over and starts again.
"""

from __future__ import annotations

import mmap
import os
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
    #: for memory another process may map (``GuestMemory.shared``): the file behind the region
    #: and the region's offset in it; None for private memory
    fd: int | None = None
    fd_offset: int = 0

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
        #: files behind shared regions, closed with the memory
        self._files = {region.fd for region in regions if region.fd is not None}
        #: per region, one byte per page set to 1 when the VMM wrote it (None: not tracking)
        self._written: list[bytearray] | None = None

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
    def shared(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Like ``anonymous``, but every region lies in one memfd mapped shared, so a vhost-user
        backend can map guest RAM too (regions expose ``fd`` and ``fd_offset``). Linux only."""
        for guest_addr, size in layout:
            if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
                raise GuestMemoryError(f"guest memory region {guest_addr:#x}+{size:#x} is not page-aligned")
        total = sum(size for _, size in layout)
        try:
            fd = host_memory.memfd(total)
        except OSError as err:
            raise GuestMemoryError(f"cannot create {total >> 20} MiB of shared guest RAM: {err.strerror}") from err
        regions, offset = [], 0
        try:
            for guest_addr, size in layout:
                buf = host_memory.file_shared(fd, offset, size)
                regions.append(GuestRegion(guest_addr, size, buf, memoryview(buf), fd=fd, fd_offset=offset))
                offset += size
        except OSError as err:
            for region in regions:
                region.view.release()
                region.buffer.close()
            os.close(fd)
            raise GuestMemoryError(f"cannot map {total >> 20} MiB of shared guest RAM: {err.strerror}") from err
        return cls(regions)

    @property
    def is_shared(self) -> bool:
        """Every region has a file another process can map (``shared``)."""
        return bool(self.regions) and all(region.fd is not None for region in self.regions)

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
        if self._written is not None:
            self.mark_written(addr, len(data))

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.view(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.view(addr, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self._written is not None:
            self.mark_written(addr, size)

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        self.view(addr, size)[:] = bytes([byte]) * size
        if self._written is not None:
            self.mark_written(addr, size)

    # ------------------------------------------------------------------ the VMM's own writes
    @property
    def tracking_writes(self) -> bool:
        return self._written is not None

    def track_writes(self) -> None:
        """Start remembering which pages the VMM writes (idempotent)."""
        if self._written is None:
            self._written = [bytearray(-(-r.size // mmap.PAGESIZE)) for r in self.regions]

    def mark_written(self, addr: int, size: int) -> None:
        """Record a VMM write of ``[addr, addr+size)`` (no-op unless tracking; ranges outside RAM ignored)."""
        written = self._written
        if written is None or size <= 0:
            return
        for region, pages in zip(self.regions, written):
            start, end = max(addr, region.guest_addr), min(addr + size, region.end)
            if start < end:
                first = (start - region.guest_addr) // mmap.PAGESIZE
                last = (end - 1 - region.guest_addr) // mmap.PAGESIZE
                pages[first : last + 1] = b"\1" * (last + 1 - first)

    def take_written(self) -> list[bytearray]:
        """The pages written since the last call (per region, a byte per page), and start again."""
        if self._written is None:
            raise GuestMemoryError("guest memory is not tracking writes")
        taken, self._written = self._written, [bytearray(len(pages)) for pages in self._written]
        return taken

    def give_back_written(self, taken: list[bytearray]) -> None:
        """Merge pages taken by ``take_written`` back (a snapshot that failed to write them)."""
        if self._written is not None:
            for pages, old in zip(self._written, taken):
                for index in (i for i, flag in enumerate(old) if flag):
                    pages[index] = 1

    def close(self) -> None:
        """Release the host memory. Views handed out keep their mmap alive until dropped."""
        for region in self.regions:
            region.view.release()
            if isinstance(region.buffer, mmap.mmap):
                try:
                    region.buffer.close()
                except BufferError:
                    pass  # a caller still holds a view; the mmap goes when it does
        fds, self._files = self._files, set()  # once: a second close must not hit a reused fd number
        for fd in fds:
            try:
                os.close(fd)  # the mappings stay valid without it
            except OSError:
                pass
