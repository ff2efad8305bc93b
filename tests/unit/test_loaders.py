"""Kernel, initrd and command-line loading: crafted images and Debian's real kernel."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.cmdline import encode_cmdline, write_cmdline
from pyvmm.vmm.boot.initrd import load_initrd
from pyvmm.vmm.boot.kernel import LoadedKernel, load_kernel
from pyvmm.vmm.memory import GuestMemory

ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets"
FETCH_HINT = "run scripts/fetch-test-kernel first (downloads Debian's 6.1 cloud kernel into tests/assets/)"

EM_386, EM_X86_64, EM_ARM = 3, 62, 40
PT_LOAD, PT_NOTE = 1, 4


@pytest.fixture
def mem():
    memory = GuestMemory.anonymous(layout.ram_layout(64 << 20))
    yield memory
    memory.close()


# ---------------------------------------------------------------------------
# crafted images


def make_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_elf(
    segments: list[tuple[int, int, bytes, int]],
    *,
    entry: int = 0x100000,
    machine: int = EM_X86_64,
    notes: bytes = b"",
) -> bytes:
    """An ELF64 executable. segments: (paddr, vaddr, file bytes, memsz)."""
    phnum = len(segments) + (1 if notes else 0)
    offset = 64 + 56 * phnum
    phdrs, body = b"", b""
    for paddr, vaddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, offset + len(body), vaddr, paddr, len(data), memsz, 0x1000)
        body += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 4, offset + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    return header + phdrs + body


def make_bzimage(*, version: int = 0x020F, xloadflags: int = 1, setup_sects: int = 4, payload: bytes = b"\x90" * 4096) -> bytes:
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x6a"  # jmp over the header: it ends at 0x202 + 0x6a
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", setup, 0x260, 0x200000)  # init_size
    return bytes(setup) + payload


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return make_note(b"Xen", 18, entry.to_bytes(size, "little"))


def test_elf_segments_loaded_with_bss_zeroed_and_pvh_note(mem, tmp_path):
    text = bytes(range(256)) * 16
    data = b"DATA" * 64
    mem.fill(0x300000 + len(data), 0x1000, 0xCC)  # stale bytes where the bss goes
    elf = make_elf(
        [(0x200000, 0xFFFFFFFF81000000, text, len(text)), (0x300000, 0xFFFFFFFF81100000, data, len(data) + 0x1000)],
        entry=0xFFFFFFFF81000010,
        notes=make_note(b"GNU", 3, b"\x01" * 20) + pvh_note(0x200040),
    )
    kernel = load_kernel(mem, write(tmp_path, "vmlinux", elf))
    assert kernel.kind == "elf"
    assert kernel.pvh_entry == 0x200040
    assert kernel.linux64_entry == 0x200010  # the virtual e_entry translated through p_vaddr/p_paddr
    assert kernel.kernel_end == 0x302000  # 0x300000 + 0x100 + 0x1000, page-aligned up
    assert kernel.setup_header is None and kernel.cmdline_size is None
    assert mem.read(0x200000, len(text)) == text
    assert mem.read(0x300000, len(data)) == data
    assert mem.read(0x300000 + len(data), 0x1000) == bytes(0x1000)


def test_elf_physical_entry_kept_and_8_byte_pvh_note(mem, tmp_path):
    elf = make_elf([(0x100000, 0x100000, b"\xf4" * 16, 16)], entry=0x100000, notes=pvh_note(0x100008, 8))
    kernel = load_kernel(mem, write(tmp_path, "k", elf))
    assert (kernel.linux64_entry, kernel.pvh_entry) == (0x100000, 0x100008)


def test_elf_without_pvh_note(mem, tmp_path):
    kernel = load_kernel(mem, write(tmp_path, "k", make_elf([(0x100000, 0x100000, b"\xf4", 1)])))
    assert kernel.pvh_entry is None and kernel.linux64_entry == 0x100000


def test_i386_elf_accepted_with_pvh_note(mem, tmp_path):
    elf = make_elf([(0x100000, 0x100000, b"\xf4", 1)], machine=EM_386, notes=pvh_note(0x100000))
    kernel = load_kernel(mem, write(tmp_path, "k", elf))
    assert kernel.pvh_entry == 0x100000 and kernel.linux64_entry is None


def test_truncated_elf(mem, tmp_path):
    elf = make_elf([(0x100000, 0x100000, b"\x90" * 4096, 4096)])
    path = write(tmp_path, "truncated", elf[:-1000])
    with pytest.raises(BootError, match=r"truncated.*truncated ELF"):
        load_kernel(mem, path)
    path = write(tmp_path, "header-only", elf[:40])
    with pytest.raises(BootError, match="header-only: truncated or malformed ELF"):
        load_kernel(mem, path)


def test_elf_for_arm_rejected(mem, tmp_path):
    path = write(tmp_path, "arm", make_elf([(0x100000, 0x100000, b"\0" * 4, 4)], machine=EM_ARM))
    with pytest.raises(BootError, match=r"arm: ELF for EM_ARM, not x86_64 or i386"):
        load_kernel(mem, path)


def test_elf_segment_outside_ram(mem, tmp_path):
    path = write(tmp_path, "big", make_elf([(60 << 20, 60 << 20, b"\0" * 16, 8 << 20)]))
    with pytest.raises(BootError, match=r"big: ELF segment \[0x3c00000, 0x4400000\) lies outside guest RAM"):
        load_kernel(mem, path)


def test_elf_segment_in_low_boot_area(mem, tmp_path):
    path = write(tmp_path, "low", make_elf([(0x7000, 0x7000, b"\0" * 16, 16)]))
    with pytest.raises(BootError, match=r"low: ELF segment \[0x7000, 0x[0-9a-f]+\) overlaps the boot area below 0x100000"):
        load_kernel(mem, path)
    assert mem.read(0x7000, 16) == bytes(16)


def test_bzimage_loaded_at_1mib(mem, tmp_path):
    payload = bytes(range(256)) * 32
    kernel = load_kernel(mem, write(tmp_path, "bz", make_bzimage(payload=payload, setup_sects=0)))
    assert kernel.kind == "bzimage"
    assert kernel.linux64_entry == layout.HIGH_MEMORY + 0x200
    assert kernel.pvh_entry is None
    assert mem.read(layout.HIGH_MEMORY, len(payload)) == payload  # setup_sects 0 means 4
    assert len(kernel.setup_header) == 0x202 + 0x6A - 0x1F1
    assert kernel.setup_header[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"
    assert (kernel.initrd_addr_max, kernel.cmdline_size) == (0x7FFFFFFF, 2047)
    assert kernel.kernel_end == 0x1000000 + 0x200000  # pref_address + init_size


def test_bzimage_protocol_too_old(mem, tmp_path):
    path = write(tmp_path, "old", make_bzimage(version=0x020A))
    with pytest.raises(BootError, match=r"old: bzImage boot protocol 2\.10 is too old \(need 2\.12"):
        load_kernel(mem, path)


def test_bzimage_without_64bit_entry(mem, tmp_path):
    path = write(tmp_path, "k32", make_bzimage(xloadflags=0))
    with pytest.raises(BootError, match="k32: bzImage has no 64-bit entry point"):
        load_kernel(mem, path)


def test_bzimage_bad_boot_flag_truncated_or_too_big(mem, tmp_path):
    image = bytearray(make_bzimage())
    image[0x1FE:0x200] = b"\0\0"
    with pytest.raises(BootError, match=r"noflag: bzImage boot flag at 0x1fe is 0x0000, expected 0xaa55"):
        load_kernel(mem, write(tmp_path, "noflag", bytes(image)))
    with pytest.raises(BootError, match=r"setup: truncated bzImage"):
        load_kernel(mem, write(tmp_path, "setup", make_bzimage(payload=b"")))
    with pytest.raises(BootError, match=r"huge: bzImage of 67108864 bytes does not fit in guest RAM at 0x100000"):
        load_kernel(mem, write(tmp_path, "huge", make_bzimage(payload=bytes(64 << 20))))


def test_random_bytes_rejected(mem, tmp_path):
    import random

    path = write(tmp_path, "noise", random.Random(7).randbytes(8192))
    with pytest.raises(BootError, match=r"noise: not a kernel: neither an ELF file, a bzImage .* nor a multiboot image"):
        load_kernel(mem, path)


def test_empty_file_rejected(mem, tmp_path):
    with pytest.raises(BootError, match="empty: kernel file is empty"):
        load_kernel(mem, write(tmp_path, "empty", b""))


def test_unreadable_kernel(mem, tmp_path):
    with pytest.raises(BootError, match=r"missing: cannot read kernel: No such file"):
        load_kernel(mem, str(tmp_path / "missing"))
    with pytest.raises(BootError, match=r"cannot read kernel: Is a directory"):
        load_kernel(mem, str(tmp_path))


# ---------------------------------------------------------------------------
# initrd


def elf_kernel(end: int) -> LoadedKernel:
    return LoadedKernel(kind="elf", pvh_entry=0x100000, linux64_entry=0x100000, kernel_end=end)


def test_initrd_at_top_of_low_ram(mem, tmp_path):
    data = b"initrd" * 1000
    addr, size = load_initrd(mem, write(tmp_path, "initrd", data), elf_kernel(0x400000))
    assert size == len(data)
    assert addr % 0x1000 == 0
    assert addr + size <= mem.end and mem.end - (addr + size) < 0x1000
    assert mem.read(addr, size) == data


def test_initrd_respects_initrd_addr_max(tmp_path):
    memory = GuestMemory.anonymous(layout.ram_layout(256 << 20))
    try:
        kernel = LoadedKernel(kind="bzimage", pvh_entry=None, linux64_entry=0x100200, kernel_end=0x400000, initrd_addr_max=0x7FFFFFF)
        addr, size = load_initrd(memory, write(tmp_path, "initrd", b"x" * 5000), kernel)
        assert addr + size <= 0x8000000 and addr % 0x1000 == 0
    finally:
        memory.close()


def test_initrd_below_mmio_gap_with_high_ram(tmp_path):
    memory = GuestMemory.anonymous(layout.ram_layout((4 << 30) + (512 << 20)))
    try:
        addr, size = load_initrd(memory, write(tmp_path, "initrd", b"y" * 100), elf_kernel(0x400000))
        assert addr + size <= layout.MMIO_GAP_START and addr >= layout.MMIO_GAP_START - 0x1000
    finally:
        memory.close()


def test_initrd_too_big(mem, tmp_path):
    path = write(tmp_path, "huge", b"z" * (62 << 20))
    with pytest.raises(BootError, match=r"huge: initrd of 65011712 bytes does not fit .* kernel end 0x400000"):
        load_initrd(mem, path, elf_kernel(0x400000))


def test_initrd_unreadable_or_empty(mem, tmp_path):
    with pytest.raises(BootError, match="cannot read initrd"):
        load_initrd(mem, str(tmp_path / "nope"), elf_kernel(0x400000))
    with pytest.raises(BootError, match="initrd file is empty"):
        load_initrd(mem, write(tmp_path, "e", b""), elf_kernel(0x400000))


# ---------------------------------------------------------------------------
# command line


def test_cmdline_written_with_nul(mem):
    addr, size = write_cmdline(mem, "console=ttyS0 pyvmm.cmd=hello")
    assert addr == layout.CMDLINE
    assert mem.read(addr, size) == b"console=ttyS0 pyvmm.cmd=hello\0"


def test_cmdline_too_long_for_bzimage_limit():
    kernel = LoadedKernel(kind="bzimage", pvh_entry=None, linux64_entry=0x100200, kernel_end=0x400000, cmdline_size=2047)
    encode_cmdline("a" * 2047, kernel)
    with pytest.raises(BootError, match="kernel command line is 2048 bytes, longer than the limit of 2047 bytes"):
        encode_cmdline("a" * 2048, kernel)


def test_cmdline_too_long_for_layout():
    limit = layout.CMDLINE_MAX - 1
    with pytest.raises(BootError, match=f"is {limit + 1} bytes, longer than the limit of {limit} bytes"):
        encode_cmdline("b" * (limit + 1), elf_kernel(0x400000))


@pytest.mark.parametrize("bad, what", [("a\0b", "NUL byte at position 1"), ("tab\there", "byte 0x09 at position 3"), ("é", "byte 0xc3")])
def test_cmdline_bad_characters(bad, what):
    with pytest.raises(BootError, match=what):
        encode_cmdline(bad)


# ---------------------------------------------------------------------------
# Debian's real kernel (tests/assets, made by scripts/fetch-test-kernel)


def asset(name: str) -> str:
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} missing: {FETCH_HINT}")
    return str(path)


def readelf_pvh_entry(path: str) -> int:
    if not shutil.which("readelf"):
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Xen\s+0x0*[48]\s+Unknown note type: \(0x00000012\)\s+description data: ([0-9a-f ]+)", out)
    assert m, "readelf shows no PVH note"
    return int.from_bytes(bytes.fromhex(m.group(1)), "little")


def test_real_vmlinux(tmp_path):
    path = asset("vmlinux")
    memory = GuestMemory.anonymous(layout.ram_layout(256 << 20))
    try:
        kernel = load_kernel(memory, path)
        assert kernel.kind == "elf"
        assert kernel.pvh_entry == readelf_pvh_entry(path)
        assert kernel.linux64_entry is not None and layout.HIGH_MEMORY <= kernel.linux64_entry < kernel.kernel_end
        # every PT_LOAD segment is in guest memory at p_paddr, bss zeroed
        from elftools.elf.elffile import ELFFile

        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD":
                    continue
                data = seg.data()
                for off in (0, len(data) // 2, len(data) - 64):
                    assert memory.read(seg["p_paddr"] + off, 64) == data[off : off + 64]
                assert kernel.kernel_end >= seg["p_paddr"] + seg["p_memsz"]
        initrd = asset("initramfs.cpio.gz")
        addr, size = load_initrd(memory, initrd, kernel)
        assert addr >= kernel.kernel_end and memory.read(addr, 2) == b"\x1f\x8b"
    finally:
        memory.close()


def test_real_bzimage():
    path = asset("bzImage")
    memory = GuestMemory.anonymous(layout.ram_layout(256 << 20))
    try:
        kernel = load_kernel(memory, path)
        image = Path(path).read_bytes()
        assert kernel.kind == "bzimage"
        version = struct.unpack_from("<H", image, 0x206)[0]
        assert version >= 0x020C
        setup_sects = image[0x1F1] or 4
        payload = image[(setup_sects + 1) * 512 :]
        assert memory.read(layout.HIGH_MEMORY, 4096) == payload[:4096]
        assert memory.read(layout.HIGH_MEMORY + len(payload) - 4096, 4096) == payload[-4096:]
        assert kernel.linux64_entry == layout.HIGH_MEMORY + 0x200
        assert kernel.setup_header == image[0x1F1 : 0x202 + image[0x201]]
        assert kernel.cmdline_size == struct.unpack_from("<I", image, 0x238)[0]
        assert kernel.initrd_addr_max == struct.unpack_from("<I", image, 0x22C)[0]
    finally:
        memory.close()
