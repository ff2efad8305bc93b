"""Anonymous host memory for guest RAM: lazily populated, page-aligned, shareable with a hypervisor.

POSIX: a private anonymous mapping without swap reservation (MAP_NORESERVE where it
exists), so a large guest costs only the pages it touches. Windows: a
pagefile-backed mapping (``mmap.mmap(-1, size)``): physical pages come on first
touch, but the whole size is charged against the commit limit at once (not yet
reserve-then-commit). Both are what KVM, Hypervisor.framework and WHPX can map.

A snapshot's memory file is mapped copy-on-write (``file_private``): pages are read
from the file when the guest first touches them, and the guest's writes stay in
the process, never in the file (MAP_PRIVATE; on Windows ACCESS_COPY).

Guest RAM that another process maps too (a vhost-user backend such as virtiofsd) lives in
a memfd (``memfd`` + ``file_shared``: MAP_SHARED, so both processes see the same pages;
Linux only). It is populated lazily like anonymous memory.
"""

from __future__ import annotations

import mmap
import os


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


def memfd(size: int, name: str = "pyvmm-guest-ram") -> int:
    """A new memfd of ``size`` bytes (close-on-exec; it reaches a backend only through SCM_RIGHTS).
    Raises OSError(ENOSYS) where there is no memfd_create (not Linux)."""
    if not hasattr(os, "memfd_create"):
        import errno

        raise OSError(errno.ENOSYS, "memory another process can map (memfd_create) needs Linux")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def file_shared(fileno: int, offset: int, size: int) -> mmap.mmap:
    """``size`` bytes of a file (a memfd) from ``offset``, mapped shared: writes reach every mapping."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(fileno, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
