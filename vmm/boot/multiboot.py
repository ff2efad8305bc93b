"""Multiboot (version 1) kernels: the header, loading, and the information structure.

From the Multiboot Specification 0.6.96 (GNU GRUB), sections 3.1-3.3:

* the **header** is a 32-bit aligned block in the first 8192 bytes: magic 0x1BADB002, flags,
  checksum (the three add to 0 mod 2^32), then, when flag 16 is set, the "a.out kludge"
  addresses: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr. Flags 0-15 are
  requirements a loader must meet or refuse: bit 0 page-aligned modules, bit 1 memory
  information (both met here); bit 2 (a video mode) and any other low bit are refused.
* **loading**: with the a.out kludge, the file from ``header_addr - load_addr`` bytes before the
  header is copied to ``load_addr`` up to ``load_end_addr`` (0: the end of the file) and zeroed up
  to ``bss_end_addr``; the entry is ``entry_addr``. Without it the file must be an ELF, loaded by
  its program headers, entered at ``e_entry``.
* the **machine state** at the entry: 32-bit protected mode, paging off, flat 4 GiB segments,
  EAX = 0x2BADB002, EBX = the physical address of the information structure (vmm/x86/regs.py).
* the **information structure** (``write_multiboot_info``): flags; mem_lower/mem_upper (KiB below
  640 KiB and above 1 MiB up to the first hole); the command line; the modules (start, end,
  string), page-aligned; the memory map (each entry ``size`` = 20, base, length, type, with
  ``mmap_addr`` at the first size field) from pyvmm's e820; the boot loader's name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.errors import BootError
from pyvmm.vmm import layout

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
SUPPORTED_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO

# information structure flags
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MEMORY_MAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

#: flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr, syms[4],
#: mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name, apm_table
INFO = struct.Struct("<IIIIIII16sIIIIIII")
MODULE = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")  # size (20: what follows it), base_addr, length, type
BOOT_LOADER_NAME = b"pyvmm\0"

# Where the structures go: the PVH start_info area (a multiboot boot uses no PVH structures)
INFO_ADDR = layout.PVH_START_INFO
MODULES_ADDR = INFO_ADDR + 0x80
MMAP_ADDR = INFO_ADDR + 0x200
STRINGS_ADDR = INFO_ADDR + 0x600
AREA_END = layout.ZERO_PAGE
MAX_MODULES = (MMAP_ADDR - MODULES_ADDR) // MODULE.size
MAX_MMAP_ENTRIES = (STRINGS_ADDR - MMAP_ADDR) // MMAP_ENTRY.size


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # in the file
    flags: int
    #: the a.out kludge addresses (flag 16), else None
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & FLAG_AOUT_KLUDGE)


def find_header(image: bytes, path: str = "kernel") -> MultibootHeader | None:
    """The multiboot header of ``image`` (None when it has none); a header that is there but cannot
    be honoured (a bad checksum next to the magic is taken as no header) is a one-line BootError."""
    limit = min(len(image), SEARCH_LIMIT) - 12
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic != HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        unsupported = flags & 0xFFFF & ~SUPPORTED_REQUIREMENTS
        if unsupported:
            what = "a video mode (flag 2)" if unsupported & FLAG_VIDEO_MODE else f"flags {unsupported:#x}"
            raise BootError(f"{path}: the multiboot header at {offset:#x} requires {what}, which pyvmm does not provide")
        if not flags & FLAG_AOUT_KLUDGE:
            return MultibootHeader(offset, flags)
        if offset + 32 > len(image):
            raise BootError(f"{path}: the multiboot header at {offset:#x} is cut short (its a.out addresses are missing)")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", image, offset + 12)
        return MultibootHeader(offset, flags, header_addr, load_addr, load_end, bss_end, entry)
    return None


@dataclass(frozen=True)
class AoutLoad:
    """Where the a.out kludge puts the file: ``data`` at ``load_addr``, zeros up to ``bss_end``."""

    load_addr: int
    data: bytes
    bss_end: int
    entry: int


def aout_load(image: bytes, header: MultibootHeader, path: str) -> AoutLoad:
    """Check the a.out kludge addresses against the file and each other (multiboot spec 3.1.3)."""
    if header.load_addr > header.header_addr:
        raise BootError(f"{path}: multiboot load_addr {header.load_addr:#x} is above header_addr {header.header_addr:#x}")
    start = header.offset - (header.header_addr - header.load_addr)
    if start < 0:
        raise BootError(f"{path}: multiboot header_addr - load_addr ({header.header_addr - header.load_addr:#x}) "
                        f"reaches before the start of the file")  # fmt: skip
    end = len(image) if header.load_end_addr == 0 else start + header.load_end_addr - header.load_addr
    if header.load_end_addr and header.load_end_addr < header.load_addr:
        raise BootError(f"{path}: multiboot load_end_addr {header.load_end_addr:#x} is below load_addr {header.load_addr:#x}")
    if end > len(image):
        raise BootError(f"{path}: truncated: the multiboot header loads up to file offset {end:#x}, the file has {len(image):#x}")
    loaded_end = header.load_addr + (end - start)
    bss_end = header.bss_end_addr or loaded_end
    if bss_end < loaded_end:
        raise BootError(f"{path}: multiboot bss_end_addr {bss_end:#x} is below the end of the loaded image {loaded_end:#x}")
    if not header.load_addr <= header.entry_addr < max(bss_end, loaded_end):
        raise BootError(f"{path}: multiboot entry_addr {header.entry_addr:#x} lies outside the loaded image "
                        f"[{header.load_addr:#x}, {loaded_end:#x})")  # fmt: skip
    return AoutLoad(header.load_addr, image[start:end], bss_end, header.entry_addr)


@dataclass(frozen=True)
class Module:
    start: int
    end: int
    cmdline: str = ""


def write_multiboot_info(mem, *, cmdline_addr: int, e820: list[tuple[int, int, int]], modules: list[Module]) -> int:
    """Write the information structure, its module list, memory map and strings; returns its address
    (for EBX). ``e820``: (address, size, type) as vmm/boot/e820.py makes it."""
    if len(modules) > MAX_MODULES:
        raise BootError(f"multiboot: {len(modules)} modules, room for {MAX_MODULES}")
    if len(e820) > MAX_MMAP_ENTRIES:
        raise BootError(f"multiboot: {len(e820)} memory map entries, room for {MAX_MMAP_ENTRIES}")
    strings = STRINGS_ADDR

    def put_string(text: bytes) -> int:
        nonlocal strings
        if strings + len(text) > AREA_END:
            raise BootError(f"multiboot: the module command lines need more than {AREA_END - STRINGS_ADDR} bytes")
        at, strings = strings, strings + len(text)
        mem.write(at, text)
        return at

    loader_name = put_string(BOOT_LOADER_NAME)
    for i, module in enumerate(modules):
        string = put_string(module.cmdline.encode() + b"\0")
        mem.write(MODULES_ADDR + i * MODULE.size, MODULE.pack(module.start, module.end, string, 0))
    for i, (addr, size, kind) in enumerate(e820):
        mem.write(MMAP_ADDR + i * MMAP_ENTRY.size, MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, addr, size, kind))
    lower, upper = memory_sizes_kib(e820)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEMORY_MAP | INFO_BOOT_LOADER_NAME | (INFO_MODULES if modules else 0)
    mem.write(INFO_ADDR, INFO.pack(flags, lower, upper, 0, cmdline_addr, len(modules), MODULES_ADDR if modules else 0,
                                   bytes(16), len(e820) * MMAP_ENTRY.size, MMAP_ADDR, 0, 0, 0, loader_name, 0))  # fmt: skip
    return INFO_ADDR


def memory_sizes_kib(e820: list[tuple[int, int, int]]) -> tuple[int, int]:
    """mem_lower (KiB of RAM from 0, at most 640) and mem_upper (KiB of RAM from 1 MiB up to the
    first hole), from the e820 map's RAM (type 1) entries."""
    ram = sorted((addr, addr + size) for addr, size, kind in e820 if kind == 1)
    lower = next((min(end, layout.LOW_RAM_END) // 1024 for start, end in ram if start == 0), 0)
    upper_end = layout.HIGH_MEMORY
    for start, end in ram:
        if start <= upper_end < end:
            upper_end = end
    return lower, (upper_end - layout.HIGH_MEMORY) // 1024
