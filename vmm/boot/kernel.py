"""Kernel loading: put an ELF vmlinux or a bzImage into guest memory.

After rust-vmm's ``linux-loader``: loading only places the image and reports
its entry points (``LoadedKernel``); writing boot information (zero page, PVH
start_info) is a separate step done by ``bootparams``/``pvh``.

The format is detected from the content, never from the file name:

* ELF (``\\x7fELF``): ``PT_LOAD`` segments are copied to their physical
  addresses (``p_paddr``); the PVH entry comes from the
  ``XEN_ELFNOTE_PHYS32_ENTRY`` note; ``e_entry`` is the 64-bit entry.
* bzImage (``HdrS`` at 0x202, boot flag 0xAA55 at 0x1FE): the protected-mode
  part is loaded at 1 MiB as Firecracker does; its 64-bit entry is 0x200
  past the load address (boot protocol 2.12+ with ``XLF_KERNEL_64``).
* multiboot v1 (a 0x1BADB002 header in the first 8 KiB, ``vmm/boot/multiboot.py``): an ELF
  with the header and no PVH note is entered at ``e_entry`` by the multiboot protocol; any
  other file with the header's a.out kludge addresses is loaded where they say.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvmm.errors import BootError, GuestMemoryError
from pyvmm.vmm import layout
from pyvmm.vmm.boot import multiboot
from pyvmm.vmm.memory import GuestMemory

PAGE_SIZE = 0x1000

# ELF
ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
SUPPORTED_MACHINES = ("EM_X86_64", "EM_386")

# bzImage setup header (Documentation/arch/x86/boot.rst)
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_LOADFLAGS = 0x211
HDR_INITRD_ADDR_MAX = 0x22C
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags, 64-bit entry
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200  # startup_64 is 512 bytes past startup_32


@dataclass
class LoadedKernel:
    #: "elf", "bzimage" or "multiboot-aout"
    kind: str
    #: 32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), ELF only
    pvh_entry: int | None
    #: physical address of the 64-bit Linux boot protocol entry (RSI = zero page)
    linux64_entry: int | None
    #: one past the highest byte the kernel occupies (or needs while starting), page-aligned
    kernel_end: int
    #: bzImage: setup header bytes 0x1F1 .. 0x202 + byte[0x201], copied into the zero page
    setup_header: bytes | None = None
    #: highest address the initrd may occupy (bzImage header), None when the kernel sets no limit
    initrd_addr_max: int | None = None
    #: longest command line the kernel accepts, without the NUL (bzImage header)
    cmdline_size: int | None = None
    #: lowest loaded address
    kernel_start: int = layout.HIGH_MEMORY
    path: str = ""
    #: 32-bit multiboot entry (EAX = 0x2BADB002, EBX = the information structure); set for a
    #: multiboot kernel without a PVH note
    multiboot_entry: int | None = None


def page_align_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def read_image(path: str, what: str) -> bytes:
    """The whole file, or a BootError naming it and the OS error."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BootError(f"{path}: cannot read {what}: {err.strerror or err}") from err


def load_kernel(mem: GuestMemory, path: str) -> LoadedKernel:
    """Load the kernel at ``path`` into ``mem`` and report its entry points."""
    image = read_image(path, "kernel")
    if not image:
        raise BootError(f"{path}: kernel file is empty")
    if image.startswith(ELF_MAGIC):
        return _load_elf(mem, path, image)
    if len(image) >= HDR_MAGIC + 4 and image[HDR_MAGIC : HDR_MAGIC + 4] == HEADER_MAGIC:
        return _load_bzimage(mem, path, image)
    header = multiboot.find_header(image, path)
    if header is not None:
        return _load_multiboot_aout(mem, path, image, header)
    raise BootError(f"{path}: not a kernel: neither an ELF file, a bzImage (no 'HdrS' header at 0x202) "
                    f"nor a multiboot image (no 0x1BADB002 header in its first 8 KiB)")  # fmt: skip


# ---------------------------------------------------------------------------
# ELF


def _check_range(mem: GuestMemory, path: str, what: str, addr: int, size: int, *, low_ok=()) -> None:
    """``low_ok``: the low-memory zones (start, end) the image may also occupy."""
    if addr < layout.HIGH_MEMORY and not any(start <= addr and addr + size <= end for start, end in low_ok):
        free = "".join(f"; a multiboot image may use [{start:#x}, {end:#x})" for start, end in low_ok)
        raise BootError(
            f"{path}: {what} [{addr:#x}, {addr + size:#x}) overlaps the boot area below {layout.HIGH_MEMORY:#x} "
            f"(1 MiB){free}"
        )
    if not mem.contains(addr, size):
        raise BootError(f"{path}: {what} [{addr:#x}, {addr + size:#x}) lies outside guest RAM")


def _load_elf(mem: GuestMemory, path: str, image: bytes) -> LoadedKernel:
    try:
        elf = ELFFile(io.BytesIO(image))
        machine = elf["e_machine"]
        if machine not in SUPPORTED_MACHINES:
            raise BootError(f"{path}: ELF for {machine}, not x86_64 or i386")
        segments = list(elf.iter_segments())
        loads = [s for s in segments if s["p_type"] == "PT_LOAD" and s["p_memsz"] > 0]
        notes = [s for s in segments if s["p_type"] == "PT_NOTE"]
        entry = elf["e_entry"]
    except (ELFError, ValueError, EOFError, struct.error) as err:
        raise BootError(f"{path}: truncated or malformed ELF: {err}") from err
    if not loads:
        raise BootError(f"{path}: ELF has no PT_LOAD segment")

    pvh_entry = _pvh_entry(path, notes)
    # A PVH note wins (a Linux vmlinux may carry both); else a multiboot header says how to enter, and
    # lets the image use the low memory pyvmm leaves free.
    is_multiboot = pvh_entry is None and multiboot.find_header(image, path) is not None
    low_ok = layout.MULTIBOOT_LOW_ZONES if is_multiboot else ()
    # Check everything before writing anything, so a bad file leaves memory untouched.
    for seg in loads:
        paddr, offset, filesz, memsz = seg["p_paddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
        if filesz > memsz:
            raise BootError(f"{path}: ELF segment at {paddr:#x} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if offset + filesz > len(image):
            raise BootError(
                f"{path}: truncated ELF: segment at {paddr:#x} needs file bytes up to {offset + filesz:#x}, "
                f"file has {len(image):#x}"
            )
        _check_range(mem, path, "ELF segment", paddr, memsz, low_ok=low_ok)

    for seg in loads:
        paddr, offset, filesz, memsz = seg["p_paddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
        mem.write(paddr, memoryview(image)[offset : offset + filesz])
        if memsz > filesz:
            mem.fill(paddr + filesz, memsz - filesz)  # .bss

    multiboot_entry = None
    if is_multiboot:
        multiboot_entry = _physical_entry(path, entry, loads)
        if multiboot_entry >> 32:
            raise BootError(f"{path}: multiboot entry point {multiboot_entry:#x} is above 4 GiB")
    linux64_entry = _physical_entry(path, entry, loads) if machine == "EM_X86_64" else None
    if pvh_entry is None and linux64_entry is None and multiboot_entry is None:
        raise BootError(f"{path}: i386 ELF without a PVH entry note or a multiboot header: no way to enter it")
    return LoadedKernel(
        kind="elf",
        pvh_entry=pvh_entry,
        linux64_entry=linux64_entry,
        kernel_end=page_align_up(max(s["p_paddr"] + s["p_memsz"] for s in loads)),
        kernel_start=min(s["p_paddr"] for s in loads),
        path=path,
        multiboot_entry=multiboot_entry,
    )


def _pvh_entry(path: str, notes) -> int | None:
    try:
        for seg in notes:
            for note in seg.iter_notes():
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    desc = bytes(note["n_descdata"])
                    if len(desc) not in (4, 8):
                        raise BootError(f"{path}: PVH entry note has a {len(desc)}-byte value, expected 4 or 8")
                    return int.from_bytes(desc, "little")
    except (ELFError, ValueError, EOFError, struct.error) as err:
        raise BootError(f"{path}: malformed ELF note: {err}") from err
    return None


def _physical_entry(path: str, entry: int, loads) -> int:
    """``e_entry`` as a physical address: kept when it is one, else translated through its PT_LOAD."""
    for seg in loads:
        if seg["p_paddr"] <= entry < seg["p_paddr"] + seg["p_memsz"]:
            return entry
    for seg in loads:
        if seg["p_vaddr"] <= entry < seg["p_vaddr"] + seg["p_memsz"]:
            return entry - seg["p_vaddr"] + seg["p_paddr"]
    raise BootError(f"{path}: ELF entry point {entry:#x} lies in no loaded segment")


# ---------------------------------------------------------------------------
# multiboot with the a.out kludge (not an ELF)


def _load_multiboot_aout(mem: GuestMemory, path: str, image: bytes, header) -> LoadedKernel:
    if not header.aout_kludge:
        raise BootError(f"{path}: the multiboot header at {header.offset:#x} gives no load addresses "
                        f"(flag 16) and the file is not an ELF: nothing says where to load it")  # fmt: skip
    load = multiboot.aout_load(image, header, path)
    _check_range(mem, path, "multiboot image", load.load_addr, load.bss_end - load.load_addr,
                 low_ok=layout.MULTIBOOT_LOW_ZONES)
    mem.write(load.load_addr, load.data)
    if load.bss_end > load.load_addr + len(load.data):
        mem.fill(load.load_addr + len(load.data), load.bss_end - load.load_addr - len(load.data))
    return LoadedKernel(
        kind="multiboot-aout",
        pvh_entry=None,
        linux64_entry=None,
        multiboot_entry=load.entry,
        kernel_start=load.load_addr,
        kernel_end=page_align_up(load.bss_end),
        path=path,
    )


# ---------------------------------------------------------------------------
# bzImage


def _u16(image: bytes, offset: int) -> int:
    return struct.unpack_from("<H", image, offset)[0]


def _u32(image: bytes, offset: int) -> int:
    return struct.unpack_from("<I", image, offset)[0]


def _load_bzimage(mem: GuestMemory, path: str, image: bytes) -> LoadedKernel:
    if _u16(image, HDR_BOOT_FLAG) != BOOT_FLAG:
        raise BootError(f"{path}: bzImage boot flag at 0x1fe is {_u16(image, HDR_BOOT_FLAG):#06x}, expected 0xaa55")
    version = _u16(image, HDR_VERSION)
    if version < MIN_BOOT_PROTOCOL:
        raise BootError(
            f"{path}: bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is too old (need 2.12 or later)"
        )
    header_end = HDR_MAGIC + image[HDR_JUMP + 1]
    if len(image) < max(header_end, HDR_INIT_SIZE + 4):
        raise BootError(f"{path}: truncated bzImage: setup header incomplete")
    if not _u16(image, HDR_XLOADFLAGS) & XLF_KERNEL_64:
        raise BootError(f"{path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 not set in xloadflags)")
    if not image[HDR_LOADFLAGS] & LOADED_HIGH:
        raise BootError(f"{path}: bzImage is not a protected-mode kernel loadable at 1 MiB (LOADED_HIGH clear)")

    setup_sects = image[HDR_SETUP_SECTS] or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(image):
        raise BootError(f"{path}: truncated bzImage: {len(image)} bytes, setup alone takes {kernel_offset}")
    payload = memoryview(image)[kernel_offset:]
    load_addr = layout.HIGH_MEMORY
    try:
        mem.write(load_addr, payload)
    except GuestMemoryError as err:
        raise BootError(f"{path}: bzImage of {len(payload)} bytes does not fit in guest RAM at {load_addr:#x}") from err

    # The decompressor runs at pref_address (or the load address) and needs
    # init_size bytes there: nothing else may be placed below that end.
    pref_address = struct.unpack_from("<Q", image, HDR_PREF_ADDRESS)[0]
    init_end = max(pref_address, load_addr) + _u32(image, HDR_INIT_SIZE)
    return LoadedKernel(
        kind="bzimage",
        pvh_entry=None,
        linux64_entry=load_addr + BZIMAGE_64BIT_ENTRY_OFFSET,
        kernel_end=page_align_up(max(load_addr + len(payload), init_end)),
        setup_header=bytes(image[HDR_SETUP_SECTS:header_end]),
        initrd_addr_max=_u32(image, HDR_INITRD_ADDR_MAX),
        cmdline_size=_u32(image, HDR_CMDLINE_SIZE),
        kernel_start=load_addr,
        path=path,
    )
