"""Boot information (e820, zero page, PVH start_info, MP table) and the boot vCPU state, read back from memory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm.accel.x86 import Segment
from pyvmm.errors import BootError
from pyvmm.vmm import layout
from pyvmm.vmm.boot.acpi import write_acpi_tables
from pyvmm.vmm.boot.bootparams import write_boot_params
from pyvmm.vmm.boot.e820 import E820_RAM, E820_RESERVED, e820_map
from pyvmm.vmm.boot.kernel import LoadedKernel, load_kernel
from pyvmm.vmm.boot.mptable import max_vcpus, write_mptable
from pyvmm.vmm.boot.pvh import write_pvh_start_info
from pyvmm.vmm.memory import GuestMemory
from pyvmm.vmm.x86.regs import boot_cpu_state

ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets"
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def mem():
    memory = GuestMemory.anonymous(layout.ram_layout(128 * MiB))
    yield memory
    memory.close()


def u(mem, addr, size):
    return mem.read_int(addr, size)


# ---------------------------------------------------------------------------
# e820


def test_e820_128mib(mem):
    assert e820_map(mem) == [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, 0x100000 - layout.EBDA_START, E820_RESERVED),
        (0x100000, 128 * MiB - 0x100000, E820_RAM),
    ]


def test_e820_4_5gib_has_ram_above_4gib():
    memory = GuestMemory.anonymous(layout.ram_layout(4 * GiB + 512 * MiB))
    try:
        entries = e820_map(memory)
        assert entries[2] == (0x100000, layout.MMIO_GAP_START - 0x100000, E820_RAM)
        assert entries[3] == (4 * GiB, 4 * GiB + 512 * MiB - layout.MMIO_GAP_START, E820_RAM)
        assert len(entries) == 4
        ram = sum(size for _, size, kind in entries if kind == E820_RAM)
        assert ram == memory.size - (0x100000 - layout.EBDA_START)
        for (a, s, _), (b, _, _) in zip(entries, entries[1:]):
            assert a + s <= b  # sorted, no overlap
    finally:
        memory.close()


def test_e820_too_little_memory():
    memory = GuestMemory.from_buffers([(0, bytearray(0x80000))])
    with pytest.raises(BootError, match="extend past 1 MiB"):
        e820_map(memory)


# ---------------------------------------------------------------------------
# zero page


def vmlinux_kernel() -> LoadedKernel:
    return LoadedKernel(kind="elf", pvh_entry=0x1000850, linux64_entry=0x1000000, kernel_end=0x4000000)


def test_boot_params_minimal_header_for_vmlinux(mem):
    e820 = e820_map(mem)
    high_initrd = ((5 << 32) | 0x12345000, (1 << 32) | 0x800)
    addr = write_boot_params(
        mem, kernel=vmlinux_kernel(), cmdline_addr=(1 << 32) | layout.CMDLINE, cmdline_size=42, initrd=high_initrd, e820=e820
    )
    zp = layout.ZERO_PAGE
    assert addr == zp
    assert u(mem, zp + 0x1FE, 2) == 0xAA55
    assert mem.read(zp + 0x202, 4) == b"HdrS"
    assert u(mem, zp + 0x206, 2) >= 0x020C
    assert u(mem, zp + 0x210, 1) == 0xFF  # type_of_loader
    assert u(mem, zp + 0x211, 1) & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert u(mem, zp + 0x224, 2) != 0  # heap_end_ptr
    assert u(mem, zp + 0x228, 4) == layout.CMDLINE  # cmd_line_ptr
    assert u(mem, zp + 0x0C8, 4) == 1  # ext_cmd_line_ptr
    assert u(mem, zp + 0x238, 4) == 42  # cmdline_size
    assert u(mem, zp + 0x230, 4) == 0x1000000  # kernel_alignment
    assert u(mem, zp + 0x218, 4) == 0x12345000 and u(mem, zp + 0x0C0, 4) == 5  # ramdisk_image + ext
    assert u(mem, zp + 0x21C, 4) == 0x800 and u(mem, zp + 0x0C4, 4) == 1  # ramdisk_size + ext
    assert u(mem, zp + 0x1EF, 1) == 0  # sentinel
    assert u(mem, zp + 0x1E8, 1) == len(e820)
    table = [struct.unpack_from("<QQI", mem.read(zp + 0x2D0 + 20 * i, 20)) for i in range(len(e820))]
    assert table == e820


def test_boot_params_no_initrd_and_too_many_e820_entries(mem):
    write_boot_params(mem, kernel=vmlinux_kernel(), cmdline_addr=layout.CMDLINE, cmdline_size=1, initrd=None, e820=e820_map(mem))
    zp = layout.ZERO_PAGE
    assert [u(mem, zp + off, 4) for off in (0x218, 0x21C, 0x0C0, 0x0C4)] == [0, 0, 0, 0]
    with pytest.raises(BootError, match="129 e820 entries"):
        write_boot_params(mem, kernel=vmlinux_kernel(), cmdline_addr=0, cmdline_size=1, initrd=None, e820=[(0, 4096, 1)] * 129)


def test_boot_params_copy_bzimage_header(mem):
    path = ASSETS / "bzImage"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/fetch-test-kernel first")
    kernel = load_kernel(mem, str(path))
    image = path.read_bytes()
    write_boot_params(mem, kernel=kernel, cmdline_addr=layout.CMDLINE, cmdline_size=20, initrd=(0x7000000, 0x1000), e820=e820_map(mem))
    zp = layout.ZERO_PAGE
    header_end = 0x202 + image[0x201]
    page = mem.read(zp, 0x1000)
    changed = {0x210, 0x211, 0x224, 0x225, *range(0x218, 0x220), *range(0x228, 0x22C)}
    for off in range(0x1F1, header_end):
        if off not in changed:
            assert page[off] == image[off], f"setup header byte {off:#x}"
    assert page[0x211] == image[0x211] | 0x80  # LOADED_HIGH kept, CAN_USE_HEAP added
    assert u(mem, zp + 0x238, 4) == struct.unpack_from("<I", image, 0x238)[0]  # the kernel's own limit kept
    assert u(mem, zp + 0x228, 4) == layout.CMDLINE
    assert u(mem, zp + 0x218, 4) == 0x7000000


# ---------------------------------------------------------------------------
# PVH


def test_pvh_start_info_read_back(mem):
    e820 = e820_map(mem)
    addr = write_pvh_start_info(mem, cmdline_addr=layout.CMDLINE, e820=e820, modules=[(0x7F00000, 0x12345)])
    assert addr == layout.PVH_START_INFO
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", mem.read(addr, 56)
    )
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (modlist, cmdline, rsdp, memmap, entries) == (layout.PVH_MODLIST, layout.CMDLINE, 0, layout.PVH_MEMMAP, len(e820))
    assert struct.unpack("<QQQQ", mem.read(modlist, 32)) == (0x7F00000, 0x12345, 0, 0)
    assert [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(entries)] == [(a, s, t, 0) for a, s, t in e820]


def test_pvh_without_modules(mem):
    write_pvh_start_info(mem, cmdline_addr=layout.CMDLINE, e820=e820_map(mem), modules=[])
    assert u(mem, layout.PVH_START_INFO + 12, 4) == 0 and u(mem, layout.PVH_START_INFO + 16, 8) == 0


# ---------------------------------------------------------------------------
# MP table


def parse_mptable(mem):
    mpf = mem.read(layout.EBDA_START, 16)
    assert mpf[:4] == b"_MP_" and sum(mpf) % 256 == 0
    physptr, length16, spec = struct.unpack_from("<IBB", mpf, 4)
    assert (length16, spec) == (1, 4)
    header = mem.read(physptr, 44)
    assert header[:4] == b"PCMP"
    length, spec, _, _, _, _, _, count, lapic = struct.unpack_from("<HBB8s12sIHHI", header, 4)
    table = mem.read(physptr, length)
    assert sum(table) % 256 == 0, "configuration table checksum"
    assert physptr + length <= layout.LOW_RAM_END
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    entries, pos = [], 44
    while pos < length:
        kind = table[pos]
        entries.append(table[pos : pos + sizes[kind]])
        pos += sizes[kind]
    assert pos == length and len(entries) == count
    return lapic, entries


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_mptable_parsed_back(mem, vcpus):
    assert write_mptable(mem, vcpus) == layout.EBDA_START
    lapic, entries = parse_mptable(mem)
    assert lapic == layout.LAPIC_BASE
    cpus = [struct.unpack("<BBBBII8s", e) for e in entries if e[0] == 0]
    assert [c[1] for c in cpus] == list(range(vcpus))  # APIC IDs
    assert [c[3] for c in cpus] == [3] + [1] * (vcpus - 1)  # enabled, BSP on 0
    buses = [e for e in entries if e[0] == 1]
    assert buses == [bytes([1, 0]) + b"ISA   "]
    (ioapic,) = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapic[1] == vcpus and ioapic[3] & 1 and ioapic[4] == layout.IOAPIC_BASE
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(i[4], i[6]) for i in ints] == [(irq, irq) for irq in range(24)]  # source IRQ -> pin, identity
    assert all(i[1] == 0 and i[3] == 0 and i[5] == vcpus for i in ints)  # INT from the ISA bus to the IOAPIC
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(li[1], li[5], li[6]) for li in lints] == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT on LINT0, NMI on LINT1


def test_mptable_too_many_vcpus(mem):
    write_mptable(mem, max_vcpus())
    parse_mptable(mem)
    with pytest.raises(BootError, match=f"{max_vcpus() + 1} vCPUs do not fit in the EBDA"):
        write_mptable(mem, max_vcpus() + 1)
    with pytest.raises(BootError, match="0 vCPUs"):
        write_mptable(mem, 0)


# ---------------------------------------------------------------------------
# ACPI (for kernels built without CONFIG_X86_MPPARSE, like Debian's cloud kernel)


def read_sdt(mem, addr):
    signature, length = struct.unpack("<4sI", mem.read(addr, 8))
    table = mem.read(addr, length)
    assert sum(table) % 256 == 0, f"{signature} checksum"
    return signature, table


@pytest.mark.parametrize("vcpus", [1, 3])
def test_acpi_tables_parsed_back(mem, vcpus):
    rsdp_addr = write_acpi_tables(mem, vcpus)
    assert rsdp_addr % 16 == 0 and 0xE0000 <= rsdp_addr < 0x100000  # where Linux scans for it
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    revision, _rsdt, length, xsdt_addr = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, length) == (2, 36)
    signature, xsdt = read_sdt(mem, xsdt_addr)
    assert signature == b"XSDT"
    pointers = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    tables = dict(read_sdt(mem, p) for p in pointers)
    madt = tables[b"APIC"]
    lapic, flags = struct.unpack_from("<II", madt, 36)
    assert lapic == layout.LAPIC_BASE and flags & 1
    entries, pos = [], 44
    while pos < len(madt):
        kind, size = madt[pos], madt[pos + 1]
        entries.append((kind, madt[pos : pos + size]))
        pos += size
    assert pos == len(madt)
    cpus = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(c[2], c[3], c[4]) for c in cpus] == [(i, i, 1) for i in range(vcpus)]  # UID, APIC ID, enabled
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert (ioapic[2], ioapic[4], ioapic[5]) == (vcpus, layout.IOAPIC_BASE, 0)  # same IOAPIC ID as the MP table
    assert not [e for k, e in entries if k == 2]  # identity ISA routing: no overrides
    (nmi,) = [struct.unpack("<BBBHB", e) for k, e in entries if k == 4]
    assert (nmi[2], nmi[4]) == (0xFF, 1)  # every CPU, LINT1
    assert all(kind == E820_RESERVED for addr, size, kind in e820_map(mem) if addr <= rsdp_addr < addr + size)


def test_acpi_rsdp_handed_over(mem):
    rsdp = write_acpi_tables(mem, 2)
    write_pvh_start_info(mem, cmdline_addr=layout.CMDLINE, e820=e820_map(mem), rsdp_addr=rsdp)
    assert u(mem, layout.PVH_START_INFO + 32, 8) == rsdp  # rsdp_paddr
    write_boot_params(
        mem, kernel=vmlinux_kernel(), cmdline_addr=layout.CMDLINE, cmdline_size=1, initrd=None, e820=e820_map(mem), rsdp_addr=rsdp
    )
    assert u(mem, layout.ZERO_PAGE + 0x70, 8) == rsdp  # acpi_rsdp_addr
    with pytest.raises(BootError, match="255 vCPUs"):
        write_acpi_tables(mem, 255)


# ---------------------------------------------------------------------------
# boot vCPU state


def walk(mem, cr3: int, vaddr: int) -> int:
    """Translate vaddr through 4-level page tables (2 MiB or 4 KiB leaves)."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = u(mem, table + ((vaddr >> shift) & 0x1FF) * 8, 8)
        assert entry & 1, f"not present at level {level} for {vaddr:#x}"
        if shift in (30, 21) and entry & 0x80:
            return (entry & ~((1 << shift) - 1) & ((1 << 52) - 1)) | (vaddr & ((1 << shift) - 1))
        table = entry & 0x000FFFFFFFFFF000
    return table | (vaddr & 0xFFF)


def gdt_descriptor(mem, sregs, selector: int) -> int:
    assert selector + 7 <= sregs.gdt.limit
    return u(mem, sregs.gdt.base + selector, 8)


def test_linux64_state(mem):
    regs, sregs = boot_cpu_state(mem, "linux64", 0x1000000, layout.ZERO_PAGE)
    assert (regs.rip, regs.rsi, regs.rsp, regs.rflags) == (0x1000000, layout.ZERO_PAGE, layout.BOOT_STACK_TOP, 0x2)
    assert sregs.cr0 == 0x80000011 and sregs.cr4 == 0x20 and sregs.efer == 0x500
    assert sregs.cr3 == layout.PML4
    for vaddr in (0, 0x1000000, 0x1234567, 0x7FFFFFF, layout.IOAPIC_BASE, layout.LAPIC_BASE + 0x20, 4 * GiB - 1):
        assert walk(mem, sregs.cr3, vaddr) == vaddr
    with pytest.raises(AssertionError, match="not present"):
        walk(mem, sregs.cr3, 4 * GiB)
    assert sregs.cs.l and not sregs.cs.db and sregs.cs.type == 11 and sregs.cs.present and sregs.cs.s
    # the hidden parts agree with the GDT in guest memory
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr):
        assert Segment.from_descriptor(seg.selector, gdt_descriptor(mem, sregs, seg.selector)) == seg
    assert sregs.ds.base == 0 and sregs.ds.limit == 0xFFFFFFFF and sregs.ds.type == 3
    assert sregs.tr.type == 11 and not sregs.tr.s and sregs.tr.present and sregs.tr.limit == 0x67
    assert (sregs.idt.base, sregs.idt.limit) == (layout.BOOT_IDT, 0)
    # the 16-byte long-mode TSS descriptor's upper half is zero
    assert u(mem, sregs.gdt.base + sregs.tr.selector + 8, 8) == 0


def test_pvh32_state(mem):
    regs, sregs = boot_cpu_state(mem, "pvh32", 0x1000850, layout.PVH_START_INFO)
    assert (regs.rip, regs.rbx, regs.rflags) == (0x1000850, layout.PVH_START_INFO, 0x2)
    assert sregs.cr0 == 0x11 and sregs.cr4 == 0 and sregs.efer == 0
    cs = sregs.cs
    assert (cs.base, cs.limit, cs.type, cs.db, cs.l, cs.g, cs.present) == (0, 0xFFFFFFFF, 11, True, False, True, True)
    for seg in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        assert (seg.base, seg.limit, seg.type, seg.db, seg.s, seg.present) == (0, 0xFFFFFFFF, 3, True, True, True)
    for seg in (sregs.cs, sregs.ds, sregs.tr):
        assert Segment.from_descriptor(seg.selector, gdt_descriptor(mem, sregs, seg.selector)) == seg
    # PVH: TR is a 32-bit busy TSS with base 0 and limit 0x67
    assert (sregs.tr.type, sregs.tr.s, sregs.tr.base, sregs.tr.limit) == (11, False, 0, 0x67)
    assert sregs.idt.limit == 0


def test_boot_state_rejects_bad_mode(mem):
    with pytest.raises(BootError, match="unknown boot mode 'real16'"):
        boot_cpu_state(mem, "real16", 0, 0)


def test_real_vmlinux_runs_from_linux64_state():
    """Debian's kernel, entered with this state on unicorn, switches to its own page tables and reads the zero page.

    unicorn does not deliver exceptions, so the run stops at the kernel's first
    (expected) #PF: copy_bootdata() touching boot_params through the direct map,
    which shows that RSI, the GDT, the page tables and long mode were usable.
    """
    import ctypes

    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    path = ASSETS / "vmlinux"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/fetch-test-kernel first")
    memory = GuestMemory.anonymous(layout.ram_layout(256 * MiB))
    try:
        kernel = load_kernel(memory, str(path))
        cmdline = b"console=ttyS0\0"
        memory.write(layout.CMDLINE, cmdline)
        zero_page = write_boot_params(
            memory, kernel=kernel, cmdline_addr=layout.CMDLINE, cmdline_size=len(cmdline), initrd=None, e820=e820_map(memory)
        )
        regs, sregs = boot_cpu_state(memory, "linux64", kernel.linux64_entry, zero_page)

        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        region = memory.regions[0]
        host = (ctypes.c_char * region.size).from_buffer(region.buffer)
        uc.mem_map_ptr(0, region.size, unicorn.UC_PROT_ALL, ctypes.addressof(host))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(x86.UC_X86_REG_MSR, (0xC0000080, sregs.efer))
        uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
        for name in ("rsi", "rsp", "rbp", "rflags"):
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), getattr(regs, name))
        faults = []

        def on_interrupt(uc, vector, _data):
            faults.append((vector, uc.reg_read(x86.UC_X86_REG_CR2)))
            uc.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INTR, on_interrupt)
        try:
            uc.emu_start(regs.rip, (1 << 64) - 1, timeout=10_000_000)
        except unicorn.UcError as err:
            pytest.fail(f"the kernel stopped at {uc.reg_read(x86.UC_X86_REG_RIP):#x}: {err}")
        cr3 = uc.reg_read(x86.UC_X86_REG_CR3)
        del uc, host
        assert faults, "the kernel ran 10 s without its first page fault"
        vector, cr2 = faults[0]
        assert vector == 14
        assert cr3 != layout.PML4, "the kernel never switched to its own page tables"
        assert cr2 >= 0xFFFF800000000000 and cr2 & 0xFFFFFFFF == layout.ZERO_PAGE, f"first #PF at {cr2:#x}"
    finally:
        memory.close()


def test_real_vmlinux_runs_from_pvh32_state():
    """Debian's kernel entered at its PVH note with this state (unicorn, 32-bit) turns start_info into boot_params.

    The PVH entry code checks the start_info magic (a mismatch ends in BUG(),
    an invalid-instruction stop), switches to long mode and its own page
    tables, and converts start_info into its own zero page; the run stops at
    the first #PF, when the early code reads that zero page through the
    direct map. Its e820 table and command line pointer must be ours.
    """
    import ctypes

    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    path = ASSETS / "vmlinux"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/fetch-test-kernel first")
    memory = GuestMemory.anonymous(layout.ram_layout(256 * MiB))
    try:
        kernel = load_kernel(memory, str(path))
        memory.write(layout.CMDLINE, b"console=ttyS0\0")
        e820 = e820_map(memory)
        info = write_pvh_start_info(memory, cmdline_addr=layout.CMDLINE, e820=e820, modules=[])
        regs, sregs = boot_cpu_state(memory, "pvh32", kernel.pvh_entry, info)

        # a 32-bit engine: protected mode with paging off, as PVH requires
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
        region = memory.regions[0]
        host = (ctypes.c_char * region.size).from_buffer(region.buffer)
        uc.mem_map_ptr(0, region.size, unicorn.UC_PROT_ALL, ctypes.addressof(host))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
        uc.reg_write(x86.UC_X86_REG_EBX, regs.rbx)
        uc.reg_write(x86.UC_X86_REG_EFLAGS, regs.rflags)
        for reg, seg in ((x86.UC_X86_REG_CS, sregs.cs), (x86.UC_X86_REG_DS, sregs.ds), (x86.UC_X86_REG_ES, sregs.es), (x86.UC_X86_REG_SS, sregs.ss)):
            uc.reg_write(reg, seg.selector)  # loaded from the boot GDT (protected mode)
        faults = []

        def on_interrupt(uc, vector, _data):
            faults.append((vector, uc.reg_read(x86.UC_X86_REG_CR2)))
            uc.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INTR, on_interrupt)
        try:
            uc.emu_start(regs.rip, 0xFFFFFFFF, timeout=10_000_000)
        except unicorn.UcError as err:  # e.g. BUG() (ud2) on a bad start_info magic
            pytest.fail(f"the kernel stopped at {uc.reg_read(x86.UC_X86_REG_EIP):#x}: {err}")
        efer = uc.reg_read(x86.UC_X86_REG_MSR, 0xC0000080)
        del uc, host
        assert faults, "the kernel ran 10 s without its first page fault (or stopped on an invalid instruction)"
        vector, cr2 = faults[0]
        assert vector == 14
        assert efer & 0x400, "the PVH entry code did not reach long mode"
        # the 32-bit register API shows CR2's low half: the zero page's physical address (direct map offset has zero low bits)
        zero_page = cr2 & 0xFFFFFFFF
        assert kernel.kernel_start <= zero_page < kernel.kernel_end
        assert memory.read_int(zero_page + 0x228, 4) == layout.CMDLINE
        count = memory.read_int(zero_page + 0x1E8, 1)
        table = [struct.unpack("<QQI", memory.read(zero_page + 0x2D0 + 20 * i, 20)) for i in range(count)]
        assert table[: len(e820)] == e820
    finally:
        memory.close()


def _xsdt_tables(mem, rsdp_addr):
    xsdt_addr = struct.unpack_from("<Q", mem.read(rsdp_addr, 36), 24)[0]
    _, xsdt = read_sdt(mem, xsdt_addr)
    pointers = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    return {read_sdt(mem, p)[0]: (p, read_sdt(mem, p)[1]) for p in pointers}


def test_fadt_is_hardware_reduced_and_points_at_the_dsdt(mem):
    tables = _xsdt_tables(mem, write_acpi_tables(mem, 1))
    assert set(tables) == {b"FACP", b"APIC"}  # the DSDT is reached through the FADT only
    _, fadt = tables[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6  # ACPI 6.x FADT
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0]
    assert read_sdt(mem, dsdt_addr)[0] == b"DSDT"
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_addr  # DSDT
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_addr  # X_DSDT
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & 0b10  # an i8042 is present (Linux would skip it otherwise)
    assert fadt[108] == 0x32  # CMOS century register


def test_dsdt_describes_each_virtio_mmio_device(mem):
    devices = [(0xD0000000, 0x1000, 16), (0xD0001000, 0x1000, 17)]
    tables = _xsdt_tables(mem, write_acpi_tables(mem, 2, devices))
    _, dsdt = read_sdt(mem, struct.unpack_from("<Q", tables[b"FACP"][1], 140)[0])
    aml = dsdt[36:]
    assert aml[0] == 0x10 and b"\\_SB_" in aml[:8]  # Scope (\_SB)
    assert aml.count(b"\x5b\x82") == 3 + 2  # Device() blocks: COM1, KBD, RTC and the two virtio windows
    assert aml.count(b"_HID\x0dLNRO0005\x00") == 2
    # hardware-reduced ACPI has no legacy PIC: the ISA devices must carry their IRQs in _CRS
    assert b"_HID\x0dPNP0501\x00" in aml and struct.pack("<BHBBI", 0x89, 6, 3, 1, 4) in aml  # COM1, IRQ 4 edge
    assert b"_HID\x0dPNP0303\x00" in aml and struct.pack("<BHBBI", 0x89, 6, 3, 1, 1) in aml  # i8042, IRQ 1
    assert b"_HID\x0dPNP0B00\x00" in aml and struct.pack("<BBHHBB", 0x47, 1, 0x70, 0x70, 1, 2) in aml  # RTC
    for index, (base, size, gsi) in enumerate(devices):
        assert f"V{index:03X}".encode() in aml
        assert struct.pack("<BHBII", 0x86, 9, 1, base, size) in aml  # Memory32Fixed(ReadWrite, base, size)
        assert struct.pack("<BHBBI", 0x89, 6, 1, 1, gsi) in aml  # Interrupt(level, active-high) {gsi}
    # the scope's PkgLength covers exactly the rest of the table
    from pyvmm.vmm.boot.acpi import _pkg_length

    body_len = len(aml) - 1
    for extra in range(4):
        encoded = _pkg_length(body_len - 1 - extra)
        if len(encoded) == 1 + extra:
            assert aml[1 : 2 + extra] == encoded
            break


@pytest.mark.parametrize("length", [0, 1, 0x3E, 0x3F, 0x40, 0xFFF, 0x1000, 0xFFFFF])
def test_aml_pkg_length_encoding(length):
    from pyvmm.vmm.boot.acpi import _pkg_length

    encoded = _pkg_length(length)
    total = length + len(encoded)  # PkgLength counts itself
    lead = encoded[0]
    extra = lead >> 6
    assert len(encoded) == 1 + extra
    if extra == 0:
        assert lead == total
    else:
        value = (lead & 0xF) | int.from_bytes(encoded[1:], "little") << 4
        assert value == total
