"""The committed test guests in tests/guests/ are up to date and well formed.

The build check needs GNU binutils; the format checks run everywhere.
"""

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "tests" / "guests"
BUILD_SCRIPT = ROOT / "scripts" / "build-test-guests"
PVH_GUESTS = ["hello", "cmdline", "e820", "smp", "reset", "exitcode", "pio", "mmio"]
XEN_ELFNOTE_PHYS32_ENTRY = 18
HIGH_MEMORY = 0x100000


def test_committed_binaries_match_a_fresh_build():
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"GNU binutils not installed ({', '.join(missing)} missing): cannot rebuild the guests")
    result = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_hello_is_the_test_hello():
    assert (ROOT / "pyvmm" / "guests" / "hello.elf").read_bytes() == (GUESTS / "hello.elf").read_bytes()


def pvh_entry(elf):
    """The PHYS32_ENTRY address from the Xen note of a PT_NOTE segment, or None."""
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_NOTE":
            continue
        for note in segment.iter_notes():
            if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                desc = note["n_descdata"]
                assert len(desc) in (4, 8)
                return int.from_bytes(desc, "little") & 0xFFFF_FFFF
    return None


@pytest.mark.parametrize("name", PVH_GUESTS)
def test_pvh_guest_is_loadable_at_1_mib_with_an_entry_note(name):
    path = GUESTS / f"{name}.elf"
    with path.open("rb") as stream:
        elf = ELFFile(stream)
        assert elf["e_machine"] in ("EM_386", "EM_X86_64")
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads, f"{path.name} has no PT_LOAD segment"
        for segment in loads:
            assert segment["p_paddr"] >= HIGH_MEMORY
            assert segment["p_memsz"] >= segment["p_filesz"]
        entry = pvh_entry(elf)
        assert entry is not None, f"{path.name} has no XEN_ELFNOTE_PHYS32_ENTRY note"
        # The entry lies in bytes the file provides, not in zero-filled memory.
        assert any(s["p_paddr"] <= entry < s["p_paddr"] + s["p_filesz"] for s in loads)
        assert path.stat().st_size < 16 * 1024


@pytest.mark.parametrize("name", PVH_GUESTS)
def test_pvh_guest_source_documents_what_a_test_should_expect(name):
    header = (GUESTS / f"{name}.S").read_text().split("\n\n")[0]
    assert header.startswith(f"# {name}:")
    assert "expect" in header


def test_bzimage_guest_has_a_valid_setup_header():
    image = (GUESTS / "hello-bz.bzimage").read_bytes()
    setup_sects = image[0x1F1]
    assert setup_sects >= 1
    setup_size = (setup_sects + 1) * 512
    u16 = lambda offset: struct.unpack_from("<H", image, offset)[0]
    u32 = lambda offset: struct.unpack_from("<I", image, offset)[0]
    assert u16(0x1FE) == 0xAA55
    assert image[0x202:0x206] == b"HdrS"
    assert u16(0x206) >= 0x020F
    assert image[0x200] == 0xEB and 0x202 + image[0x201] < setup_size  # short jump into setup code
    assert image[0x211] & 0x01  # LOADED_HIGH
    assert u16(0x236) & 0x01  # XLF_KERNEL_64
    assert u32(0x214) == HIGH_MEMORY  # code32_start
    kernel_size = len(image) - setup_size
    assert u32(0x1F4) * 16 == kernel_size  # syssize
    assert u32(0x260) >= kernel_size  # init_size covers the image and its bss
    assert u32(0x238) > 0  # cmdline_size
    assert kernel_size > 0x200  # the 64-bit entry at +0x200 is inside the image
    kernel_info = setup_size + u32(0x268)
    assert image[kernel_info:kernel_info + 4] == b"LToP"
    assert struct.unpack_from("<I", image, kernel_info + 4)[0] >= 16
