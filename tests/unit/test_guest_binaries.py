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
MULTIBOOT_GUESTS = ["multiboot"]  # entered by their multiboot header (test_multiboot.py), not a PVH note
PVH_GUESTS = sorted(path.stem for path in GUESTS.glob("*.elf") if path.stem not in MULTIBOOT_GUESTS)
XEN_ELFNOTE_PHYS32_ENTRY = 18
HIGH_MEMORY = 0x100000


def test_committed_binaries_match_a_fresh_build():
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"GNU binutils not installed ({', '.join(missing)} missing): cannot rebuild the guests")
    here = "".join(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()[0] + "\n"
                   for tool in ("as", "ld"))
    recorded = (GUESTS / "toolchain.txt").read_text()
    if here != recorded:
        pytest.skip(f"the guests were built with another binutils ({recorded.splitlines()[0]}); "
                    "its output may differ byte for byte")
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


@pytest.mark.parametrize("name", PVH_GUESTS + MULTIBOOT_GUESTS)
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


# --- the guests run for real under QEMU (TCG), when it is installed ------------------
QEMU = "qemu-system-x86_64"
QEMU_MEMORY_MIB = 128


def run_in_qemu(image, cmdline="", smp="1"):
    """Boot image with QEMU's -kernel; return (debug-exit status or None, serial output lines)."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    command = [QEMU, "-accel", "tcg", "-M", "pc", "-m", str(QEMU_MEMORY_MIB), "-display", "none",
               "-serial", "stdio", "-monitor", "none", "-no-reboot", "-net", "none", "-smp", smp,
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-kernel", str(GUESTS / image), "-append", cmdline]
    result = subprocess.run(command, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    output = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace").strip()
    if not output and stderr:  # e.g. no firmware: QEMU itself failed, not the guest
        pytest.skip(f"QEMU did not start: {stderr[:200]}")
    lines = output.splitlines()
    # isa-debug-exit makes QEMU exit with (value << 1) | 1; a reset with -no-reboot exits 0.
    status = result.returncode >> 1 if result.returncode & 1 else None
    return status, lines


def test_hello_under_qemu():
    status, lines = run_in_qemu("hello.elf")
    assert lines == ["Hello from pyvmm guest", "hello ok"]
    assert status == 0


def test_cmdline_under_qemu():
    status, lines = run_in_qemu("cmdline.elf", "console=ttyS0 foo=bar")
    assert lines == ["cmdline: console=ttyS0 foo=bar", "cmdline ok"]
    assert status == 0


def test_e820_under_qemu_sums_the_ram_entries():
    status, lines = run_in_qemu("e820.elf")
    entries = [line.split()[1:] for line in lines if line.startswith("e820: ")]
    assert entries
    ram = sum(int(size, 16) for addr, size, kind in entries if kind == "1")
    assert f"ram: {ram:#x}" in lines
    assert any(kind == "1" and int(addr, 16) <= 0x100000 < int(addr, 16) + int(size, 16)
               for addr, size, kind in entries)
    assert lines[-1] == "e820 ok" and status == 0


@pytest.mark.parametrize("cmdline, expected", [("exit=42", 42), ("quiet exit=0x2a", 42), ("", 7)])
def test_exitcode_under_qemu(cmdline, expected):
    status, lines = run_in_qemu("exitcode.elf", cmdline)
    assert lines == [f"exit: {expected}"]
    assert status == expected


def test_reset_under_qemu():
    status, lines = run_in_qemu("reset.elf")
    assert lines == ["resetting"]
    assert status is None  # QEMU stopped on the reset, not through debug-exit


def test_pio_under_qemu_reads_the_cmos_memory_size():
    status, lines = run_in_qemu("pio.elf")
    expected_units = (QEMU_MEMORY_MIB - 16) * 1024 // 64  # RAM above 16 MiB in 64 KiB units
    assert lines == [f"cmos: {expected_units:#x}", "pio ok"]
    assert status == 0


def test_mmio_under_qemu_on_ram():
    # QEMU has no scratch device at 0xD8000000: point the guest at RAM and skip the unbacked check.
    status, lines = run_in_qemu("mmio.elf", "mmio=0x200000 unbacked=0")
    assert lines == ["mmio: device 0x200000 unbacked 0x0", "mmio ok"]
    assert status == 0


def test_mmio_under_qemu_reports_a_missing_device():
    status, lines = run_in_qemu("mmio.elf")
    assert lines[-1] == "fail: status 0x31 value 0x0"
    assert status == 0x31


def test_smp_under_qemu_starts_every_ap():
    # SeaBIOS lists one MP-table CPU per package, so give QEMU one socket per CPU.
    status, lines = run_in_qemu("smp.elf", smp="3,sockets=3")
    assert lines[0] == "smp: 3 cpus in MP table, bsp 0"
    assert sorted(line for line in lines if line.startswith("ap ")) == ["ap 1 up", "ap 2 up"]
    assert lines[-2:] == ["cpus: 3", "smp ok"]
    assert status == 0


def test_hello_bz_under_qemu():
    status, lines = run_in_qemu("hello-bz.bzimage", "console=ttyS0 hello=world")
    assert lines == ["Hello from bzImage guest", "cmdline: console=ttyS0 hello=world", "hello-bz ok"]
    assert status == 0


# --- the default MMIO addresses, which QEMU lacks, on unicorn with pyvmm-like devices ---
MMIO_DEVICE = 0xD800_0000
MMIO_UNBACKED = 0xDFFF_F000


def run_on_unicorn(image, cmdline, device_behaves_as_ram=True):
    """Run a PVH guest on a bare unicorn CPU: start_info at 0x6000, a UART that is always
    ready, debug-exit, all-ones for other ports, the 4 KiB scratch device and an unbacked page."""
    unicorn = pytest.importorskip("unicorn")
    x86 = pytest.importorskip("unicorn.x86_const")
    cpu = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    cpu.mem_map(0, 16 << 20)
    with (GUESTS / image).open("rb") as stream:
        elf = ELFFile(stream)
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_LOAD":
                cpu.mem_write(segment["p_paddr"],
                              segment.data() + bytes(segment["p_memsz"] - segment["p_filesz"]))
        entry = pvh_entry(elf)
    memmap = [(0, 0x9FC00, 1), (0x100000, (16 << 20) - 0x100000, 1)]
    cpu.mem_write(0x6000, struct.pack("<IIIIQQQQI", 0x336EC578, 1, 0, 0, 0, 0x20000, 0, 0x6100, len(memmap)))
    for index, (addr, size, kind) in enumerate(memmap):
        cpu.mem_write(0x6100 + 24 * index, struct.pack("<QQII", addr, size, kind, 0))
    cpu.mem_write(0x20000, cmdline.encode() + b"\0")
    serial, status, line_control = bytearray(), [], [0]

    def port_in(uc, port, size, _):
        return 0x60 if port == 0x3FD else (1 << 8 * size) - 1

    def port_out(uc, port, size, value, _):
        if port == 0x3FB:
            line_control[0] = value
        elif port == 0x3F8 and not line_control[0] & 0x80:  # with DLAB set it is the divisor
            serial.append(value & 0xFF)
        elif port == 0xF4:
            status.append(value & 0xFF)
            uc.emu_stop()

    cpu.hook_add(unicorn.UC_HOOK_INSN, port_in, None, 1, 0, x86.UC_X86_INS_IN)
    cpu.hook_add(unicorn.UC_HOOK_INSN, port_out, None, 1, 0, x86.UC_X86_INS_OUT)
    scratch = bytearray(0x1000)

    def device_read(uc, offset, size, _):
        return int.from_bytes(scratch[offset:offset + size], "little") if device_behaves_as_ram else 0

    def device_write(uc, offset, size, value, _):
        scratch[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    cpu.mmio_map(MMIO_DEVICE, 0x1000, device_read, None, device_write, None)
    cpu.mmio_map(MMIO_UNBACKED, 0x1000, lambda uc, offset, size, _: (1 << 8 * size) - 1, None,
                 lambda uc, offset, size, value, _: None, None)
    cpu.reg_write(x86.UC_X86_REG_EBX, 0x6000)
    cpu.emu_start(entry, 0, timeout=10_000_000)
    return (status[0] if status else None), serial.decode(errors="replace").splitlines()


def test_mmio_on_the_default_device_and_unbacked_page():
    status, lines = run_on_unicorn("mmio.elf", "console=ttyS0")
    assert lines == ["mmio: device 0xd8000000 unbacked 0xdffff000", "mmio ok"]
    assert status == 0


def test_mmio_reports_a_device_that_does_not_keep_writes():
    status, lines = run_on_unicorn("mmio.elf", "", device_behaves_as_ram=False)
    assert lines[-1] == "fail: status 0x31 value 0x0"
    assert status == 0x31
