"""Kernel command line: validation against the kernel's limit and placement at ``layout.CMDLINE``."""

from __future__ import annotations

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.kernel import LoadedKernel
from pyvmm.vmm.memory import GuestMemory


def cmdline_limit(kernel: LoadedKernel | None) -> int:
    """The longest command line (without the NUL) this kernel and our layout accept."""
    limit = layout.CMDLINE_MAX - 1
    if kernel is not None and kernel.cmdline_size is not None:
        limit = min(limit, kernel.cmdline_size)
    return limit


def encode_cmdline(cmdline: str | bytes, kernel: LoadedKernel | None = None) -> bytes:
    """The command line as the NUL-terminated bytes to write, or a BootError saying what is wrong."""
    raw = cmdline.encode("utf-8", "replace") if isinstance(cmdline, str) else bytes(cmdline)
    for i, byte in enumerate(raw):
        if byte == 0:
            raise BootError(f"kernel command line has a NUL byte at position {i}")
        if not 0x20 <= byte < 0x7F:
            raise BootError(f"kernel command line has a non-printable or non-ASCII byte {byte:#04x} at position {i}")
    limit = cmdline_limit(kernel)
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes, longer than the limit of {limit} bytes")
    return raw + b"\0"


def write_cmdline(mem: GuestMemory, cmdline: str | bytes, kernel: LoadedKernel | None = None) -> tuple[int, int]:
    """Validate and write the command line at ``layout.CMDLINE``; returns ``(addr, size including the NUL)``."""
    data = encode_cmdline(cmdline, kernel)
    mem.write(layout.CMDLINE, data)
    return layout.CMDLINE, len(data)
