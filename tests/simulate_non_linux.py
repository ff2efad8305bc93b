"""Run pyvmm as it would start on a host without Linux's facilities (macOS or Windows, as far as
this host can pretend): ``python tests/simulate_non_linux.py ARGS`` = ``pyvmm ARGS`` with

* fcntl, termios, tty and pyroute2 not importable (Windows has none of them);
* select.epoll, os.eventfd*, os.preadv/pwritev, os.memfd_create, os.O_TMPFILE,
  os.fdatasync and mmap.MAP_ANONYMOUS deleted (Linux-only, or absent on Windows);
* sys.platform = "darwin", so the backends and host services choose as on a Mac
  (no KVM; Hypervisor.framework probed; TAP refused).

What cannot be pretended here: Windows' own calls (LockFileEx, ReadProcessMemory, msvcrt).
"""

import importlib.abc
import mmap
import os
import select
import sys

BLOCKED_MODULES = ("fcntl", "termios", "tty", "pyroute2")
DELETED = {
    select: ("epoll", "EPOLLIN", "EPOLLOUT", "EPOLLET"),
    os: ("eventfd", "eventfd_read", "eventfd_write", "EFD_CLOEXEC", "EFD_NONBLOCK", "preadv", "pwritev",
         "memfd_create", "O_TMPFILE", "fdatasync"),
    mmap: ("MAP_ANONYMOUS", "MAP_NORESERVE", "MAP_PRIVATE"),
}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (simulated non-Linux host)", name=name)
        return None


def simulate() -> None:
    # unicorn finds its shared library by sys.platform's naming (libunicorn.dylib on a Mac):
    # load it as this host names it before pretending to be another
    import unicorn  # noqa: F401

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED_MODULES + ("selectors", "pyvmm"):
            del sys.modules[name]
    sys.meta_path.insert(0, _Block())
    for module, names in DELETED.items():
        for attr in names:
            if hasattr(module, attr):
                delattr(module, attr)
    sys.platform = "darwin"


if __name__ == "__main__":
    simulate()
    from pyvmm.cli import main

    sys.exit(main(sys.argv[1:]))
