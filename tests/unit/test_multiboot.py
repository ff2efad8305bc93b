"""Multiboot v1 (vmm/boot/multiboot.py): the header, the a.out kludge, the information structure
against the layout the specification gives (Multiboot Specification 0.6.96, 3.1 and 3.3)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.errors import BootError
from pyvmm.vmm.boot import multiboot
from pyvmm.vmm.boot.multiboot import HEADER_MAGIC, Module, aout_load, find_header, write_multiboot_info
from pyvmm.vmm.memory import GuestMemory


def header(flags: int, *aout: int, at: int = 0, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
    return bytes(at) + struct.pack("<III", HEADER_MAGIC, flags, checksum) + struct.pack(f"<{len(aout)}I", *aout)


def test_the_header_is_found_on_a_4_byte_boundary_within_8_kib_with_a_good_checksum():
    found = find_header(header(0x3, at=0x40) + bytes(100))
    assert (found.offset, found.flags, found.aout_kludge) == (0x40, 0x3, False)
    assert find_header(header(0x3, at=0x42) + bytes(100)) is None  # not aligned
    assert find_header(header(0x3, at=8192) + bytes(100)) is None  # beyond 8 KiB
    assert find_header(header(0x3, checksum=1) + bytes(100)) is None  # the magic alone is not a header
    kludge = find_header(header(0x10003, 0x100000, 0x100000, 0x101000, 0x102000, 0x100020))
    assert (kludge.header_addr, kludge.load_addr, kludge.load_end_addr, kludge.bss_end_addr, kludge.entry_addr) == (
        0x100000, 0x100000, 0x101000, 0x102000, 0x100020)


@pytest.mark.parametrize("flags, words", [(0x4, "a video mode (flag 2)"), (0x8, "flags 0x8"), (0x10001 | 0x40, "flags 0x40")])
def test_requirements_pyvmm_cannot_meet_are_refused_in_one_line(flags, words):
    with pytest.raises(BootError, match=r"requires .*" + words.replace("(", r"\(").replace(")", r"\)")):
        find_header(header(flags, 0, 0, 0, 0, 0), "k.elf")


def test_the_aout_kludge_loads_from_before_the_header_and_checks_its_addresses():
    image = b"\x90" * 0x20 + header(0x10000, 0x100020, 0x100000, 0x100100, 0x100200, 0x100000) + b"\xcc" * 0xC4
    load = aout_load(image, find_header(image), "k")
    assert (load.load_addr, len(load.data), load.bss_end, load.entry) == (0x100000, 0x100, 0x100200, 0x100000)
    assert load.data[:0x20] == b"\x90" * 0x20
    for bad, words in [((0x100020, 0x100040, 0, 0, 0x100040), "above header_addr"),
                       ((0x100020, 0x100000, 0x200000, 0, 0x100000), "truncated"),
                       ((0x100020, 0x100000, 0, 0x100010, 0x100000), "bss_end_addr"),
                       ((0x100020, 0x100000, 0, 0, 0x900000), "entry_addr")]:  # fmt: skip
        image = b"\x90" * 0x20 + header(0x10000, *bad) + bytes(0x100)
        with pytest.raises(BootError, match=words):
            aout_load(image, find_header(image), "k")


def test_the_information_structure_has_the_specifications_layout():
    memory = GuestMemory.from_buffers([(0, bytearray(2 << 20))])
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 0x7F00000, 1)]
    modules = [Module(0x200000, 0x201234, "env"), Module(0x203000, 0x203010, "second one")]
    at = write_multiboot_info(memory, cmdline_addr=0x20000, e820=e820, modules=modules)
    read32 = lambda off: memory.read_int(at + off, 4)  # noqa: E731
    flags = read32(0)
    assert flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert (read32(4), read32(8)) == (0x9FC00 // 1024, 0x7F00000 // 1024)  # mem_lower, mem_upper in KiB
    assert read32(16) == 0x20000  # cmdline
    assert read32(20) == 2  # mods_count
    mods = read32(24)
    start, end, string, _ = struct.unpack("<IIII", memory.read(mods + 16, 16))
    assert (start, end) == (0x203000, 0x203010) and memory.read(string, 11) == b"second one\0"
    mmap_length, mmap_addr = read32(44), read32(48)
    entries, offset = [], 0
    while offset < mmap_length:  # the spec's walk: each entry's size does not count itself
        size = memory.read_int(mmap_addr + offset, 4)
        base, length, kind = struct.unpack("<QQI", memory.read(mmap_addr + offset + 4, 20))
        entries.append((base, length, kind))
        offset += size + 4
    assert entries == e820
    assert memory.read(read32(64), 6) == b"pyvmm\0"  # boot_loader_name


def test_too_many_modules_is_a_one_line_error():
    memory = GuestMemory.from_buffers([(0, bytearray(1 << 20))])
    with pytest.raises(BootError, match="modules, room for"):
        write_multiboot_info(memory, cmdline_addr=0, e820=[], modules=[Module(0, 0)] * (multiboot.MAX_MODULES + 1))


@given(st.binary(max_size=512))
def test_any_bytes_give_a_header_none_or_a_boot_error(data):
    try:
        found = find_header(header(0x10000, 0, 0, 0, 0, 0) + data if data[:1] == b"\x00" else data)
    except BootError:
        return
    if found is not None and found.aout_kludge:
        try:
            aout_load(header(0x10000, 0, 0, 0, 0, 0) + data, found, "k")
        except BootError:
            pass


# ---------------------------------------------------------------------------
# the loader (vmm/boot/kernel.py) and the config ([[boot.module]])

from conftest import GUESTS  # noqa: E402
from elfgen import pvh_elf  # noqa: E402

from pyvmm.config import config_from_dict  # noqa: E402
from pyvmm.errors import ConfigError  # noqa: E402
from pyvmm.vmm.boot.kernel import load_kernel  # noqa: E402


def _memory(mib: int = 4) -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(mib << 20))])


def _with_paddr(elf: bytes, paddr: int) -> bytes:
    """The ELF32 with its first program header's p_vaddr/p_paddr moved (the code does not care here)."""
    entry, phoff = struct.unpack_from("<I", elf, 24)[0], struct.unpack_from("<I", elf, 28)[0]
    old = struct.unpack_from("<I", elf, phoff + 12)[0]
    image = bytearray(elf)
    struct.pack_into("<II", image, phoff + 8, paddr, paddr)
    struct.pack_into("<I", image, 24, entry - old + paddr)
    return bytes(image)


def test_a_multiboot_elf_is_entered_at_e_entry_and_a_flat_image_where_its_aout_header_says(tmp_path):
    memory = _memory()
    elf = load_kernel(memory, str(GUESTS / "multiboot.elf"))
    e_entry = struct.unpack_from("<I", (GUESTS / "multiboot.elf").read_bytes(), 24)[0]
    assert (elf.kind, elf.pvh_entry, elf.linux64_entry, elf.multiboot_entry) == ("elf", None, None, e_entry)

    memory = _memory()
    memory.fill(0x100000, 0x10000, 0xAA)  # the bss must come back zeroed
    flat = (GUESTS / "multiboot-aout.bin").read_bytes()
    aout = load_kernel(memory, str(GUESTS / "multiboot-aout.bin"))
    header = find_header(flat)
    assert aout.kind == "multiboot-aout" and aout.multiboot_entry == header.entry_addr
    assert memory.read(header.load_addr, len(flat)) == flat
    assert memory.read(header.load_addr + len(flat), header.bss_end_addr - header.load_addr - len(flat)) == bytes(
        header.bss_end_addr - header.load_addr - len(flat))
    assert aout.kernel_end >= header.bss_end_addr


def test_a_pvh_note_wins_over_a_multiboot_header(tmp_path):
    flags = 0x3
    code = struct.pack("<III", HEADER_MAGIC, flags, -(HEADER_MAGIC + flags) & 0xFFFFFFFF) + b"\xf4"
    path = tmp_path / "both.elf"
    path.write_bytes(pvh_elf(code))
    loaded = load_kernel(_memory(), str(path))
    assert loaded.pvh_entry == 0x100000 and loaded.multiboot_entry is None


def test_a_multiboot_image_may_load_into_the_low_memory_pyvmm_leaves_free_and_nowhere_else(tmp_path):
    elf = (GUESTS / "multiboot.elf").read_bytes()
    low = tmp_path / "low.elf"
    low.write_bytes(_with_paddr(elf, 0x8000))  # kvm-unit-tests' realmode test loads here
    memory = _memory()
    load_kernel(memory, str(low))
    assert memory.read(0x8000, 12)[:4] == struct.pack("<I", HEADER_MAGIC)
    low.write_bytes(_with_paddr(elf, 0x6000))  # the information structure's page
    with pytest.raises(BootError, match=r"\[0x6000, 0x[0-9a-f]+\) overlaps the boot area .*multiboot image may use "
                                        r"\[0x8000, 0x20000\)"):  # fmt: skip
        load_kernel(_memory(), str(low))
    pvh = tmp_path / "pvh.elf"
    pvh.write_bytes(pvh_elf(b"\xf4", load_addr=0x8000))  # not multiboot: low memory stays the VMM's
    with pytest.raises(BootError, match=r"overlaps the boot area below 0x100000 \(1 MiB\)$"):
        load_kernel(_memory(), str(pvh))


def test_a_non_elf_multiboot_image_needs_the_aout_addresses(tmp_path):
    path = tmp_path / "flat.bin"
    path.write_bytes(header(0x3, at=16) + bytes(64))
    with pytest.raises(BootError, match=r"flat.bin: the multiboot header at 0x10 gives no load addresses \(flag 16\)"):
        load_kernel(_memory(), str(path))
    path.write_bytes(bytes(64))
    with pytest.raises(BootError, match="nor a multiboot image"):
        load_kernel(_memory(), str(path))


def test_boot_modules_in_the_config(tmp_path):
    (tmp_path / "m").write_text("x")
    base = {"boot": {"kernel": str(GUESTS / "multiboot-aout.bin")}}
    config = config_from_dict({"boot": {**base["boot"], "module": [{"path": "m", "cmdline": "a b"}, {"path": "m"}]}},
                              base_dir=tmp_path)  # fmt: skip
    assert [(m.path.name, m.cmdline) for m in config.boot.modules] == [("m", "a b"), ("m", "")]
    for module, key, words in [([{"cmdline": "x"}], "boot.module[0].path", "missing"),
                               ([{"path": "m", "args": "x"}], "boot.module[0].args", "unknown key"),
                               ([{"path": "m"}, {"path": 3}], "boot.module[1].path", "must be a string"),
                               ([{"path": "nope"}], "boot.module[0].path", "file not found"),
                               ([{"path": "m", "cmdline": "\n"}], "boot.module[0].cmdline", "non-printable"),
                               ({"path": "m"}, "boot.module", "array of tables")]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            config_from_dict({"boot": {**base["boot"], "module": module}}, base_dir=tmp_path)
        assert key in str(err.value) and words in str(err.value), str(err.value)
