"""Initial ramdisk placement: page-aligned at the top of low RAM, above the kernel."""

from __future__ import annotations

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.kernel import PAGE_SIZE, LoadedKernel, read_image
from pyvmm.vmm.memory import GuestMemory


def initrd_top(mem: GuestMemory, kernel: LoadedKernel) -> int:
    """One past the highest address the initrd may occupy."""
    low = next((r for r in mem.regions if r.guest_addr <= layout.HIGH_MEMORY < r.end), None)
    if low is None:
        raise BootError("guest RAM does not cover 1 MiB: no room for an initrd")
    top = min(low.end, layout.MMIO_GAP_START)
    if kernel.initrd_addr_max is not None:
        top = min(top, kernel.initrd_addr_max + 1)  # initrd_addr_max is the highest byte, inclusive
    return top


def load_initrd(mem: GuestMemory, path: str, kernel: LoadedKernel, *, below: int | None = None,
                what: str = "initrd") -> tuple[int, int]:
    """Write the initrd (or a multiboot module) at ``path`` into guest RAM, page-aligned at the top
    of low RAM or just under ``below``; returns ``(addr, size)``."""
    data = read_image(path, what)
    if not data:
        raise BootError(f"{path}: {what} file is empty")
    top = initrd_top(mem, kernel) if below is None else below
    addr = (top - len(data)) & ~(PAGE_SIZE - 1)
    if addr < kernel.kernel_end:
        raise BootError(
            f"{path}: {what} of {len(data)} bytes does not fit in guest RAM between the kernel end "
            f"{kernel.kernel_end:#x} and {top:#x}"
        )
    mem.write(addr, data)
    return addr, len(data)
