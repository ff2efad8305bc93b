"""The Linux boot protocol's zero page (``struct boot_params``) for the 64-bit entry.

Offsets from Documentation/arch/x86/boot.rst and zero-page.rst
(arch/x86/include/uapi/asm/bootparam.h). A bzImage's own setup header is
copied in (the kernel reads its fields back); an ELF vmlinux gets a minimal
header that passes the kernel's checks, as Firecracker builds it.
"""

from __future__ import annotations

import struct

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.kernel import LoadedKernel
from pyvmm.vmm.memory import GuestMemory

ZERO_PAGE_SIZE = 0x1000

# struct boot_params
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry, packed (20 bytes)

# struct setup_header, as offsets in the zero page
HDR_BOOT_FLAG = 0x1FE
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MINIMAL_HEADER_VERSION = 0x020F  # 2.15, what Debian's 6.1 bzImage itself reports
MINIMAL_KERNEL_ALIGNMENT = 0x0100_0000  # 16 MiB, as Firecracker sets for vmlinux
TYPE_OF_LOADER_UNDEFINED = 0xFF
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
# end of the setup heap relative to the real-mode code, minus 0x200 (QEMU's value)
HEAP_END_PTR = 0xFE00


def _put(page: bytearray, offset: int, size: int, value: int) -> None:
    page[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def write_boot_params(
    mem: GuestMemory,
    *,
    kernel: LoadedKernel,
    cmdline_addr: int,
    cmdline_size: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
    rsdp_addr: int = 0,
) -> int:
    """Write the zero page at ``layout.ZERO_PAGE``; returns its address (RSI for the 64-bit entry).

    ``cmdline_size`` is the command line's length including its NUL. For a
    bzImage the header's own ``cmdline_size`` (the kernel's limit, read-only
    for boot loaders) is kept; the minimal vmlinux header carries the length.
    ``rsdp_addr`` is the ACPI RSDP (``acpi.write_acpi_tables``), 0 for none.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"zero page: {len(e820)} e820 entries, the table holds {E820_MAX_ENTRIES_ZEROPAGE}")
    page = bytearray(ZERO_PAGE_SIZE)

    if kernel.setup_header is not None:
        header = kernel.setup_header
        if BP_SETUP_HEADER + len(header) > BP_E820_TABLE:
            raise BootError(f"{kernel.path}: bzImage setup header of {len(header)} bytes is too long for the zero page")
        page[BP_SETUP_HEADER : BP_SETUP_HEADER + len(header)] = header
    else:
        _put(page, HDR_BOOT_FLAG, 2, BOOT_FLAG)
        page[HDR_HEADER : HDR_HEADER + 4] = HEADER_MAGIC
        _put(page, HDR_VERSION, 2, MINIMAL_HEADER_VERSION)
        _put(page, HDR_KERNEL_ALIGNMENT, 4, MINIMAL_KERNEL_ALIGNMENT)
        page[HDR_LOADFLAGS] = LOADED_HIGH
        _put(page, HDR_CMDLINE_SIZE, 4, cmdline_size)
    page[BP_SENTINEL] = 0  # a non-zero sentinel makes the kernel wipe the fields below as stale

    _put(page, BP_ACPI_RSDP_ADDR, 8, rsdp_addr)
    page[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    page[HDR_LOADFLAGS] |= CAN_USE_HEAP
    _put(page, HDR_HEAP_END_PTR, 2, HEAP_END_PTR)
    _put(page, HDR_CMD_LINE_PTR, 4, cmdline_addr)
    _put(page, BP_EXT_CMD_LINE_PTR, 4, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        _put(page, HDR_RAMDISK_IMAGE, 4, addr)
        _put(page, HDR_RAMDISK_SIZE, 4, size)
        _put(page, BP_EXT_RAMDISK_IMAGE, 4, addr >> 32)
        _put(page, BP_EXT_RAMDISK_SIZE, 4, size >> 32)
    else:
        for offset in (HDR_RAMDISK_IMAGE, HDR_RAMDISK_SIZE, BP_EXT_RAMDISK_IMAGE, BP_EXT_RAMDISK_SIZE):
            _put(page, offset, 4, 0)

    page[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(page, BP_E820_TABLE + i * E820_ENTRY.size, addr, size, kind)

    mem.write(layout.ZERO_PAGE, page)
    return layout.ZERO_PAGE
