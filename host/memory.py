"""Anonymous host memory for guest RAM: lazily populated, page-aligned, shareable with a hypervisor.

POSIX: a private anonymous mapping without swap reservation (MAP_NORESERVE where it
exists), so a large guest costs only the pages it touches. Windows: a
pagefile-backed mapping (``mmap.mmap(-1, size)``): physical pages come on first
touch, but the whole size is charged against the commit limit at once (not yet
reserve-then-commit). Both are what KVM, Hypervisor.framework and WHPX can map.

A snapshot's memory file is mapped copy-on-write (``file_private``): pages are read
from the file when the guest first touches them, and the guest's writes stay in
the process, never in the file (MAP_PRIVATE; on Windows ACCESS_COPY).
"""

from __future__ import annotations

import mmap


def anonymous(size: int) -> mmap.mmap:
    """``size`` bytes of zeroed memory (``size`` a multiple of the page size)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no flags argument
        return mmap.mmap(-1, size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def file_private(fileno: int, offset: int, size: int) -> mmap.mmap:
    """``size`` bytes of a file from ``offset`` (page-aligned), copy-on-write and demand-paged."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return mmap.mmap(fileno, size, access=mmap.ACCESS_COPY, offset=offset)
    return mmap.mmap(fileno, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
