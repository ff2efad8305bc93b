"""Anonymous host memory for guest RAM: lazily populated, page-aligned, shareable with a hypervisor.

POSIX: a private anonymous mapping without swap reservation (MAP_NORESERVE where it
exists), so a large guest costs only the pages it touches. Windows: a
pagefile-backed mapping (``mmap.mmap(-1, size)``): physical pages come on first
touch, but the whole size is charged against the commit limit at once (not yet
reserve-then-commit). Both are what KVM, Hypervisor.framework and WHPX can map.
"""

from __future__ import annotations

import mmap


def anonymous(size: int) -> mmap.mmap:
    """``size`` bytes of zeroed memory (``size`` a multiple of the page size)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no flags argument
        return mmap.mmap(-1, size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
