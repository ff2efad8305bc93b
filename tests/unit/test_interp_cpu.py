"""The interpreter backend on small hand-built guests (assembled with `as` in the test).

Each guest runs on a real ``InterpVm`` over ``GuestMemory`` with a tiny fake
irqchip, so exits, exception delivery, syscalls, interrupt injection and HLT
are exercised end to end on unicorn.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.interp import InterpVm, probe  # noqa: E402
from pyvmm.accel.core import InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, Shutdown  # noqa: E402
from pyvmm.accel.x86 import DescriptorTable, FpuState, Regs, Segment, SpecialRegs  # noqa: E402
from pyvmm.vmm.memory import GuestMemory  # noqa: E402

def _gnu_binutils() -> bool:
    if not (shutil.which("as") and shutil.which("ld") and shutil.which("objcopy")):
        return False
    return "GNU" in subprocess.run(["as", "--version"], capture_output=True, text=True).stdout


if not _gnu_binutils():
    pytest.skip("GNU binutils (as, ld, objcopy) are needed to build the test guests", allow_module_level=True)

GDT = 0x500
TSS = 0x600
IDT = 0x1000
PML4, PDPT, PD = 0x9000, 0xA000, 0xB000
CODE = 0x10000
STACK_TOP = 0x80000
RSP0_TOP = 0x90000
IST1_TOP = 0x98000
USER_STACK_TOP = 0x70000
MEM_SIZE = 0x400000  # 4 MiB; the page tables map only the first 2 MiB
PORT_DONE = 0xF0


class FakeChip:
    """Just enough irqchip: a queue of vectors the test raises, no ports or MMIO of its own."""

    LAPIC_TIMER_HZ = 1_000_000_000

    def __init__(self, vcpu_count: int = 1):
        self.vcpu_count = vcpu_count
        self.lock = threading.Lock()
        self.vectors: list[int] = []
        self.nmi = False
        self.events = {i: [] for i in range(vcpu_count)}
        self.wake = lambda index: None
        self.clock = time.monotonic
        self.deadline = None
        self.polls = 0
        self.apic_bases: dict[int, int] = {}
        self.tprs: dict[int, int] = {}

    def on_wake(self, wake) -> None:
        self.wake = wake

    def raise_vector(self, vector: int) -> None:
        with self.lock:
            self.vectors.append(vector)
        self.wake(0)

    def set_irq_line(self, irq, level):
        if level:
            self.raise_vector(0x20 + irq)

    def handles_port(self, port):
        return False

    def handles_mmio(self, addr):
        return False

    def poll(self):
        self.polls += 1

    def next_deadline(self, index):
        return self.deadline

    def has_interrupt(self, index):
        return bool(self.vectors) and index == 0

    def ack_interrupt(self, index):
        with self.lock:
            return self.vectors.pop(0) if self.vectors else None

    def has_nmi(self, index):
        return self.nmi

    def ack_nmi(self, index):
        pending, self.nmi = self.nmi, False
        return pending

    def take_init_sipi(self, index):
        events, self.events[index] = self.events[index], []
        return events

    def take_cross_cpu_ipi(self, index):
        return False

    def get_apic_base(self, index):
        return self.apic_bases.setdefault(index, 0xFEE00900 if index == 0 else 0xFEE00800)

    def set_apic_base(self, index, value):
        self.apic_bases[index] = value

    def get_tpr(self, index):
        return self.tprs.get(index, 0)

    def set_tpr(self, index, value):
        self.tprs[index] = value


# --------------------------------------------------------------------------
# building guests


def assemble(source: str, base: int = CODE) -> tuple[bytes, dict[str, int]]:
    """Assemble GNU as source at ``base``: (flat binary, symbol addresses)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "g.S").write_text(source)
        subprocess.run(["as", "--64", "-o", str(d / "g.o"), str(d / "g.S")], check=True, capture_output=True)
        subprocess.run(
            ["ld", "-m", "elf_x86_64", f"-Ttext={base:#x}", "-e", "0", "-o", str(d / "g.elf"), str(d / "g.o")],
            check=True,
            capture_output=True,
        )
        subprocess.run(["objcopy", "-O", "binary", str(d / "g.elf"), str(d / "g.bin")], check=True)
        nm = subprocess.run(["nm", str(d / "g.elf")], check=True, capture_output=True, text=True).stdout
        symbols = {}
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 3:
                symbols[parts[2]] = int(parts[0], 16)
        return (d / "g.bin").read_bytes(), symbols


def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """A GDT entry: access byte (P DPL S type) and flags nibble (G D/B L AVL)."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


# selectors
KCODE64, KDATA, KCODE32, UDATA, UCODE64, TSS_SEL = 0x08, 0x10, 0x18, 0x23, 0x2B, 0x30


class Guest:
    def __init__(self, mem_size: int = MEM_SIZE, chip: FakeChip | None = None, vcpus: int = 1):
        self.chip = chip or FakeChip(vcpus)
        self.vm = InterpVm(vcpus, irqchip=self.chip)
        self.chip.wake = self.vm._wake
        self.mem = GuestMemory.anonymous([(0, mem_size)])
        self.vm.map_memory(0, 0, self.mem.regions[0].buffer)
        self.vcpu = self.vm.create_vcpu(0)
        self.symbols: dict[str, int] = {}

    def close(self):
        self.vm.close()

    def load(self, source: str, base: int = CODE) -> dict[str, int]:
        blob, symbols = assemble(source, base)
        self.mem.write(base, blob)
        self.symbols = symbols
        return symbols

    # ---- 64-bit long mode --------------------------------------------------
    def setup_long_mode(self, user_pages: bool = False) -> None:
        mem = self.mem
        u = 4 if user_pages else 0
        mem.write_int(PML4, 8, PDPT | 3 | u)
        mem.write_int(PDPT, 8, PD | 3 | u)
        mem.write_int(PD, 8, 0x83 | u)  # 0-2 MiB, one large page; 2-4 MiB is not mapped
        mem.write_int(PDPT + 3 * 8, 8, 0xC0000000 | 0x83)  # 3-4 GiB (the MMIO hole), one 1 GiB page
        gdt = [
            0,
            descriptor(0, 0xFFFFF, 0x9A, 0xA),  # 0x08 kernel code 64
            descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x10 kernel data
            descriptor(0, 0xFFFFF, 0x9A, 0xC),  # 0x18 kernel code 32
            descriptor(0, 0xFFFFF, 0xF2, 0xC),  # 0x20 user data
            descriptor(0, 0xFFFFF, 0xFA, 0xA),  # 0x28 user code 64
            descriptor(TSS, 0x67, 0x89, 0),  # 0x30 TSS (low half)
            TSS >> 32,  # TSS high half
        ]
        for i, entry in enumerate(gdt):
            mem.write_int(GDT + 8 * i, 8, entry)
        mem.write_int(TSS + 4, 8, RSP0_TOP)  # rsp0
        mem.write_int(TSS + 0x24, 8, IST1_TOP)  # ist1
        code = Segment(base=0, limit=0xFFFFFFFF, selector=KCODE64, type=11, s=True, l=True, g=True)
        data = Segment(base=0, limit=0xFFFFFFFF, selector=KDATA, type=3, s=True, db=True, g=True)
        sregs = SpecialRegs(
            cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
            tr=Segment(base=TSS, limit=0x67, selector=TSS_SEL, type=11, s=False),
            ldt=Segment(type=2, s=False, present=False, unusable=True),
            gdt=DescriptorTable(GDT, len(gdt) * 8 - 1),
            idt=DescriptorTable(IDT, 256 * 16 - 1),
            cr0=0x80050033, cr3=PML4, cr4=0x6A0, efer=0xD01,
        )  # fmt: skip
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(Regs(rip=CODE, rsp=STACK_TOP, rflags=2))

    def gate64(self, vector: int, handler: int, *, dpl: int = 0, ist: int = 0, trap: bool = False) -> None:
        access = 0x80 | (dpl << 5) | (0xF if trap else 0xE)
        low = (handler & 0xFFFF) | (KCODE64 << 16) | (ist << 32) | (access << 40) | (((handler >> 16) & 0xFFFF) << 48)
        self.mem.write_int(IDT + vector * 16, 8, low)
        self.mem.write_int(IDT + vector * 16 + 8, 8, handler >> 32)

    # ---- 32-bit protected mode ----------------------------------------------
    def setup_protected32(self) -> None:
        mem = self.mem
        gdt = [0, descriptor(0, 0xFFFFF, 0x9A, 0xC), descriptor(0, 0xFFFFF, 0x92, 0xC)]
        for i, entry in enumerate(gdt):
            mem.write_int(GDT + 8 * i, 8, entry)
        code = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, s=True, db=True, g=True)
        data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, s=True, db=True, g=True)
        sregs = SpecialRegs(
            cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
            tr=Segment(base=0, limit=0xFFFF, selector=0, type=11, s=False),
            gdt=DescriptorTable(GDT, len(gdt) * 8 - 1), idt=DescriptorTable(IDT, 256 * 8 - 1),
            cr0=0x11, cr4=0, efer=0,
        )  # fmt: skip
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(Regs(rip=CODE, rsp=STACK_TOP, rflags=2))

    def gate32(self, vector: int, handler: int, *, trap: bool = False) -> None:
        access = 0x80 | (0xF if trap else 0xE)
        entry = (handler & 0xFFFF) | (0x08 << 16) | (access << 40) | (((handler >> 16) & 0xFFFF) << 48)
        self.mem.write_int(IDT + vector * 8, 8, entry)

    # ---- running ------------------------------------------------------------
    def set_rip(self, rip: int) -> None:
        regs = self.vcpu.get_regs()
        regs.rip = rip
        self.vcpu.set_regs(regs)

    def run_from(self, rip: int, answer=None) -> list:
        """Set RIP, then ``run_until_done``."""
        self.set_rip(rip)
        return self.run_until_done(answer)

    def run_until_done(self, answer=None, limit: int = 200) -> list:
        """Run, completing reads with ``answer(exit)``, until an OUT to PORT_DONE; return the exits seen."""
        seen = []
        for _ in range(limit):
            exit_value = self.vcpu.run()
            seen.append(exit_value)
            if isinstance(exit_value, (IoIn, MmioRead)):
                value = answer(exit_value) if answer else 0
                size = len(exit_value.data)
                exit_value.data[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            elif isinstance(exit_value, IoOut) and exit_value.port == PORT_DONE:
                return seen
            elif not isinstance(exit_value, (IoOut, MmioWrite)):
                return seen
        raise AssertionError(f"guest did not finish: last exits {seen[-5:]}")


def outs(exits, port=None) -> list[tuple[int, int]]:
    return [
        (e.port, int.from_bytes(e.data, "little"))
        for e in exits
        if isinstance(e, IoOut) and (port is None or e.port == port)
    ]


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


# --------------------------------------------------------------------------
# probe and state


def test_probe_reports_usable():
    usable, reason, notes = probe()
    assert usable, reason
    assert "2.1.4" in reason
    assert notes


def test_regs_sregs_fpu_round_trip(guest):
    guest.setup_long_mode()
    regs = Regs(**{name: 0x1111 * (i + 1) for i, name in enumerate(Regs.__dataclass_fields__)})
    regs.rflags = 0x246
    guest.vcpu.set_regs(regs)
    assert guest.vcpu.get_regs() == regs
    sregs = guest.vcpu.get_sregs()
    assert sregs.cs.l and sregs.cs.selector == KCODE64 and sregs.cs.dpl == 0
    assert sregs.tr.base == TSS and sregs.tr.selector == TSS_SEL and sregs.tr.limit == 0x67
    assert sregs.efer & 0x500 == 0x500 and sregs.cr3 == PML4 and sregs.gdt.base == GDT
    sregs.fs.base = 0x123456789A
    guest.vcpu.set_sregs(sregs)
    assert guest.vcpu.get_sregs() == sregs
    fpu = FpuState(fcw=0x27F, mxcsr=0x1FA0, xmm=[bytes([i]) * 16 for i in range(16)])
    fpu.fsw = 3 << 11  # TOP = 3: fpr[] are in ST order, stored at physical (TOP + i) & 7
    fpu.ftwx = 0x81
    fpu.fpr = [bytes([0x10 + i]) * 10 + bytes(6) for i in range(8)]
    guest.vcpu.set_fpu(fpu)
    back = guest.vcpu.get_fpu()
    assert (back.fcw, back.fsw, back.ftwx, back.mxcsr, back.xmm, back.fpr) == (
        fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr, fpu.xmm, fpu.fpr
    )  # fmt: skip


def test_save_and_restore_state_round_trip(guest):
    """save_state is tagged (backend, arch) and restores into a fresh interpreter vCPU exactly."""
    guest.setup_long_mode()
    vcpu = guest.vcpu
    regs = vcpu.get_regs()
    regs.rbx, regs.r13 = 0xFEEDF00D, 0x77
    vcpu.set_regs(regs)
    vcpu.set_msrs({0xC0000082: 0xFFFFFFFF81000000, 0x277: 0x0007040600070406, 0xC0000103: 5})
    vcpu.set_fpu(FpuState(fcw=0x27F, xmm=[bytes([i + 3]) * 16 for i in range(16)]))
    state = vcpu.save_state()
    assert (state.backend, state.arch, state.cpu.mp_state) == ("interp", "x86_64", "runnable")
    other = Guest()
    try:
        other.vcpu.restore_state(state)
        assert other.vcpu.get_regs() == regs
        assert other.vcpu.get_sregs() == vcpu.get_sregs()
        assert other.vcpu.get_fpu() == vcpu.get_fpu()
        assert other.vcpu.get_msrs([0xC0000082, 0x277, 0xC0000103]) == {0xC0000082: 0xFFFFFFFF81000000,
                                                                        0x277: 0x0007040600070406, 0xC0000103: 5}
    finally:
        other.close()


def test_a_state_from_a_newer_pyvmm_or_another_arch_is_refused(guest):
    from dataclasses import replace

    from pyvmm.errors import AccelError

    state = guest.vcpu.save_state()
    with pytest.raises(AccelError, match="interp: vCPU state version 99 is newer than this pyvmm's"):
        guest.vcpu.restore_state(replace(state, version=99))
    with pytest.raises(AccelError, match="cannot restore a aarch64 vCPU state on an x86_64 vCPU"):
        guest.vcpu.restore_state(replace(state, arch="aarch64"))


def test_an_event_being_injected_is_delivered_on_a_vcpu_that_never_ran(guest):
    """Restoring a state caught mid-injection (from KVM, say) delivers the event through the IDT at once."""
    from pyvmm.accel.x86 import PendingEvents

    guest.setup_long_mode()
    sym = guest.load(".code64\nh30:\n1: jmp 1b\nstart:\n2: jmp 2b\n")
    guest.gate64(0x30, sym["h30"])
    regs = guest.vcpu.get_regs()
    regs.rip, regs.rflags = sym["start"], 0x202
    guest.vcpu.set_regs(regs)
    guest.vcpu.set_events(PendingEvents(interrupt=0x30))
    assert guest.vcpu.get_regs().rip == sym["h30"]
    assert guest.mem.read_int(STACK_TOP - 40, 8) == sym["start"]  # the frame returns to the interrupted RIP


def test_msrs_round_trip(guest):
    vcpu = guest.vcpu
    vcpu.set_msrs({0xC0000082: 0xFFFFFFFF81000000, 0x277: 0x0007040600070406, 0x174: 0x10, 0xC0000102: 0x1234})
    got = vcpu.get_msrs([0xC0000082, 0x277, 0x174, 0xC0000102, 0x1B])
    assert got[0xC0000082] == 0xFFFFFFFF81000000 and got[0x277] == 0x0007040600070406
    assert got[0x174] == 0x10 and got[0xC0000102] == 0x1234 and got[0x1B] == 0xFEE00900
    vcpu.set_msrs({0x10: 1 << 40})
    tsc = vcpu.get_msrs([0x10])[0x10]
    assert (1 << 40) <= tsc < (1 << 40) + (1 << 36)


def test_vcpus_given_the_same_tsc_by_the_vmm_never_warp_against_each_other():
    """The VMM writes each vCPU's TSC in turn; the later vCPU must not run behind (KVM syncs them too)."""
    guest = Guest(vcpus=2)
    try:
        second = guest.vm.create_vcpu(1)
        guest.vcpu.set_msrs({0x10: 0})
        time.sleep(0.05)  # 50 ms between the writes: ~1e8 cycles of skew if each got its own offset
        second.set_msrs({0x10: 0})
        first_tsc = guest.vcpu.get_msrs([0x10])[0x10]
        second_tsc = second.get_msrs([0x10])[0x10]
        assert second_tsc >= first_tsc
        assert second_tsc - first_tsc < 1 << 32  # and both count from the same zero
        second.set_msrs({0x10: 1 << 40})  # another value is a new write, not a sync
        assert second.get_msrs([0x10])[0x10] >= 1 << 40 > guest.vcpu.get_msrs([0x10])[0x10]
    finally:
        guest.close()


# --------------------------------------------------------------------------
# exits


def test_port_io_round_trip_64bit_with_paging(guest):
    guest.setup_long_mode()
    guest.load(
        """
        .code64
        mov $0x3f8, %dx
        mov $'A', %al
        out %al, %dx
        in $0x42, %al
        inc %al
        out %al, $0x43
        mov $0x60, %dx
        in %dx, %eax
        out %eax, %dx
        out %al, $0xf0
        """
    )
    exits = guest.run_until_done(lambda e: {0x42: 0x5A, 0x60: 0xDEADBEEF}[e.port])
    assert outs(exits) == [(0x3F8, ord("A")), (0x43, 0x5B), (0x60, 0xDEADBEEF), (PORT_DONE, 0xEF)]
    assert [e.port for e in exits if isinstance(e, IoIn)] == [0x42, 0x60]
    assert [len(e.data) for e in exits if isinstance(e, IoIn)] == [1, 4]


def test_mmio_read_write_and_read_modify_write(guest):
    guest.setup_long_mode()
    guest.load(
        """
        .code64
        mov $0xd0000000, %rbx
        mov (%rbx), %eax
        add $1, %eax
        mov %eax, 4(%rbx)
        addl $5, 8(%rbx)
        movq (%rbx), %rcx
        mov %rcx, %rax
        out %eax, $0x44
        out %al, $0xf0
        """
    )
    values = {0xD0000000: 41, 0xD0000008: 100}
    exits = guest.run_until_done(lambda e: values.get(e.addr, 0x1122334455667788))
    mmio = [(type(e).__name__, e.addr, len(e.data)) for e in exits if isinstance(e, (MmioRead, MmioWrite))]
    assert mmio == [
        ("MmioRead", 0xD0000000, 4),
        ("MmioWrite", 0xD0000004, 4),
        ("MmioRead", 0xD0000008, 4),
        ("MmioWrite", 0xD0000008, 4),
        # unicorn's MMIO regions take at most 4 bytes per access: a qword read is two exits
        ("MmioRead", 0xD0000000, 4),
        ("MmioRead", 0xD0000004, 4),
    ]
    writes = [int.from_bytes(e.data, "little") for e in exits if isinstance(e, MmioWrite)]
    assert writes == [42, 105]
    assert outs(exits, 0x44) == [(0x44, 41)]


def test_rep_outsb_is_one_exit_per_byte(guest):
    guest.setup_long_mode()
    guest.load(
        """
        .code64
        lea msg(%rip), %rsi
        mov $3, %ecx
        mov $0x3f8, %dx
        rep outsb
        mov %ecx, %eax
        out %al, $0xf0
        msg: .ascii "xyz"
        """
    )
    exits = guest.run_until_done()
    assert outs(exits) == [(0x3F8, ord("x")), (0x3F8, ord("y")), (0x3F8, ord("z")), (PORT_DONE, 0)]


def test_pvh_style_32bit_start():
    g = Guest()
    try:
        g.setup_protected32()
        g.mem.write_int(0x6000, 4, 0x336EC578)  # hvm_start_info magic
        g.load(
            """
            .code32
            mov (%ebx), %eax
            out %eax, $0x44
            xor %eax, %eax
            .byte 0x40, 0x40        # inc %eax twice: a REX prefix if this were decoded as 64-bit code
            out %eax, $0x45
            mov %cs, %ax
            out %ax, $0xf0
            """
        )
        regs = g.vcpu.get_regs()
        regs.rbx = 0x6000
        g.vcpu.set_regs(regs)
        exits = g.run_until_done()
        assert outs(exits) == [(0x44, 0x336EC578), (0x45, 2), (PORT_DONE, 0x08)]
    finally:
        g.close()


def test_real_mode_start(guest):
    blob, _ = assemble(
        """
        .code16
        mov %cs, %ax
        mov %ax, %ds
        mov value - start, %ax
        out %ax, $0x46
        mov $0x1234, %bx
        mov %bx, %ss
        mov $0x100, %sp
        push $0x77
        pop %ax
        out %al, $0xf0
        start = . - (. - 0)
        value: .word 0xBEEF
        """,
        base=0,
    )
    guest.mem.write(0x20000, blob)
    sregs = guest.vcpu.get_sregs()  # the reset state: real mode
    assert sregs.cr0 & 1 == 0
    sregs.cs = Segment(base=0x20000, limit=0xFFFF, selector=0x2000, type=11)
    guest.vcpu.set_sregs(sregs)
    guest.vcpu.set_regs(Regs(rip=0, rflags=2))
    exits = guest.run_until_done()
    assert outs(exits) == [(0x46, 0xBEEF), (PORT_DONE, 0x77)]
    assert guest.mem.read_int(0x12340 + 0xFE, 2) == 0x77  # the push went through SS base 0x12340


# --------------------------------------------------------------------------
# exceptions through the guest IDT

HANDLERS64 = """
        .code64
        .macro handler vec, errcode
        h\\vec:
        .if \\errcode
        pop %rax
        out %eax, $0xE4
        .endif
        mov $\\vec, %al
        out %al, $0xE0
        mov %cr2, %rax
        out %eax, $0xE8
        mov %rsp, %rax
        out %eax, $0xEC
        .if \\vec == 6 || \\vec == 13 || \\vec == 14
        mov %r15, (%rsp)            # resume where the test said (after the faulting instruction)
        .endif
        iretq
        .endm
        handler 3, 0
        handler 6, 0
        handler 13, 1
        handler 14, 1
        handler 128, 0
"""


def test_exceptions_64bit(guest):
    guest.setup_long_mode()
    sym = guest.load(
        HANDLERS64
        + """
        start:
        lea 1f(%rip), %r15
        ud2
        1: lea 1f(%rip), %r15
        mov $0x1230, %ax
        mov %ax, %ds                # beyond the GDT limit: #GP(0x1230)
        1: lea 1f(%rip), %r15
        movl $7, 0x300000           # 2-4 MiB is not mapped: #PF, write, not present
        1: int3
        int $0x80
        out %al, $0xf0
        """
    )
    for vector in (3, 6, 13, 14, 0x80):
        guest.gate64(vector, sym[f"h{vector}"], dpl=3 if vector in (3, 0x80) else 0)
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xE0)] == [6, 13, 14, 3, 0x80]
    assert [v for _, v in outs(exits, 0xE4)] == [0x1230, 0x2]
    cr2_after = [v for _, v in outs(exits, 0xE8)]
    assert cr2_after[2] == 0x300000
    # frames are 16-byte aligned below the current stack (no privilege change, no IST)
    rsps = [v for _, v in outs(exits, 0xEC)]
    assert rsps[0] == STACK_TOP - 40 and rsps[1] == STACK_TOP - 40


def test_rdmsr_wrmsr_and_cr8_are_the_vcpus_not_unicorns(guest):
    """unicorn alone reads IA32_APIC_BASE and CR8 as 0, drops IA32_TSC writes and has no
    IA32_TSC_ADJUST; redirected (accel/interp/redirect.py), the guest sees the irqchip's APIC base,
    a TSC it can set with TSC_ADJUST following it (SDM 18.17.3), CR8 as the TPR's top nibble, and
    #GP for what the CPU refuses (x2APIC enable, CR8's reserved bits), at the faulting instruction."""
    guest.setup_long_mode()
    sym = guest.load(
        HANDLERS64
        + """
        start:
        mov $0x1b, %ecx
        rdmsr
        out %eax, $0xF4             # APIC base
        mov $0x10, %ecx
        rdmsr
        out %eax, $0xF8             # TSC before (low, high)
        mov %edx, %eax
        out %eax, $0xF8
        mov $0x10, %ecx
        mov $0x100, %edx
        xor %eax, %eax
        wrmsr                       # TSC = 0x100_0000_0000
        rdtsc
        mov %edx, %eax
        out %eax, $0xFC             # its high half
        mov $0x3b, %ecx
        rdmsr
        out %eax, $0xF8             # TSC_ADJUST (low, high)
        mov %edx, %eax
        out %eax, $0xF8
        xor %eax, %eax
        xor %edx, %edx
        wrmsr                       # TSC_ADJUST = 0: the TSC moves back as much
        mov $0x10, %ecx
        rdmsr
        out %eax, $0xF8             # TSC after (low, high)
        mov %edx, %eax
        out %eax, $0xF8
        mov $9, %eax
        mov %rax, %cr8
        mov %cr8, %rax
        out %eax, $0xFC             # CR8
        lea 1f(%rip), %r15
        mov $0x1b, %ecx
        rdmsr
        or $0x400, %eax             # x2APIC enable: not offered
        wrmsr
        1: lea 1f(%rip), %r15
        mov $0x10, %eax
        mov %rax, %cr8              # CR8[63:4] are reserved
        1: out %al, $0xf0
        """
    )
    guest.gate64(13, sym["h13"])
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xF4)] == [0xFEE00900]
    low0, high0, adjust_low, adjust_high, low1, high1 = [v for _, v in outs(exits, 0xF8)]
    before, adjust, after = low0 | high0 << 32, adjust_low | adjust_high << 32, low1 | high1 << 32
    tsc_high, cr8 = [v for _, v in outs(exits, 0xFC)]
    assert tsc_high == 0x100
    # TSC_ADJUST moved by the write's change: new - (the old TSC, a few cycles after ``before``)
    assert (0x100_0000_0000 - before - adjust) & ((1 << 64) - 1) < 1 << 34
    assert 0 <= after - before < 1 << 34  # moved back by TSC_ADJUST: the old TSC plus the time taken
    assert cr8 == 9 and guest.chip.tprs[0] == 0x90
    assert [v for _, v in outs(exits, 0xE0)] == [13, 13]
    assert guest.chip.apic_bases[0] == 0xFEE00900  # the refused write changed nothing


def test_smap_is_offered_and_enforced_with_stac_and_clac(guest):
    """CPUID.7.0:EBX.SMAP (bit 20, from the engine's Broadwell model): with CR4.SMAP a supervisor
    read of a user page is #PF (error code: present, not user, read), allowed between STAC and CLAC."""
    cpuid = {e.function: e for e in guest.vm.supported_cpuid() if e.index == 0}
    assert cpuid[7].ebx >> 20 & 1
    guest.setup_long_mode()
    mem = guest.mem
    mem.write_int(PML4, 8, PDPT | 7)
    mem.write_int(PDPT, 8, PD | 7)
    mem.write_int(PD + 8, 8, 0x200000 | 0x87)  # 2-4 MiB: one user page; 0-2 MiB stays supervisor
    mem.write_int(0x300000, 4, 0x5A5A)
    sym = guest.load(
        HANDLERS64
        + """
        start:
        mov %cr4, %rax
        bts $21, %rax
        mov %rax, %cr4              # SMAP on
        lea 1f(%rip), %r15
        mov 0x300000, %eax          # #PF
        1: stac
        mov 0x300000, %eax
        clac
        out %eax, $0xF4
        out %al, $0xf0
        """
    )
    guest.gate64(14, sym["h14"])
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xE0)] == [14]
    assert [v for _, v in outs(exits, 0xE4)] == [0x1]  # present, read, supervisor
    assert [v for _, v in outs(exits, 0xF4)] == [0x5A5A]


def test_tsc_deadline_is_offered_and_the_msr_reaches_the_lapic():
    """CPUID.1:ECX[24] (TSC-deadline) is offered because IA32_TSC_DEADLINE reaches the vCPU
    (accel/interp/redirect.py): the guest's WRMSR arms the LAPIC at the clock time its TSC gets
    there, and its RDMSR reads the deadline back."""
    from pyvmm.accel.irqchip.chip import Irqchip

    chip = Irqchip(1)
    guest = Guest(chip=chip)
    try:
        cpuid = {e.function: e for e in guest.vm.supported_cpuid() if e.index == 0}
        assert cpuid[1].ecx >> 24 & 1
        guest.setup_long_mode()
        chip.mmio_write(0, 0xFEE00000 + 0x320, 4, 0x40 | 2 << 17)  # LVT timer: TSC-deadline, vector 0x40
        sym = guest.load(
            """
            start:
            rdtsc
            shl $32, %rdx
            or %rdx, %rax
            add $0x40000000, %rax       # about a second ahead
            mov %rax, %rdx
            shr $32, %rdx
            mov $0x6e0, %ecx
            wrmsr
            rdmsr
            out %eax, $0xF4
            out %al, $0xF8              # the test looks at the LAPIC here
            rdtsc
            shl $32, %rdx
            or %rdx, %rax
            add $0x100000, %rax         # about a millisecond ahead
            mov %rax, %rdx
            shr $32, %rdx
            mov $0x6e0, %ecx
            wrmsr
            1: sti
            hlt
            jmp 1b
            h40:
            mov $0xFEE000B0, %eax
            movl $0, (%rax)             # EOI
            mov $0x6e0, %ecx
            rdmsr
            out %eax, $0xFC             # the deadline reads 0 once it has passed
            out %al, $0xf0
            """
        )
        guest.gate64(0x40, sym["h40"])
        guest.set_rip(sym["start"])
        seen = []
        for _ in range(20):
            exit_value = guest.vcpu.run()
            seen.append(exit_value)
            if isinstance(exit_value, IoOut) and exit_value.port == 0xF8:
                written = chip.get_tsc_deadline(0)
                assert written and [v for _, v in outs(seen, 0xF4)] == [written & 0xFFFFFFFF]
                ahead = chip.next_deadline(0) - chip.clock()
                assert 0 < ahead < 5  # ~2^30 cycles at the TSC's rate
            if isinstance(exit_value, IoOut) and exit_value.port == PORT_DONE:
                break
        assert [v for _, v in outs(seen, 0xFC)] == [0]
        assert outs(seen)[-1][0] == PORT_DONE
    finally:
        guest.close()


def test_an_msr_the_cpu_lacks_or_a_non_canonical_base_is_gp_and_one_brought_along_is_kept(guest):
    """unicorn read unknown MSRs as 0 and stored any FS_BASE: the CPU raises #GP for both (kvm-unit-
    tests' msr test: from 975 unexpected failures to 20). An MSR another backend's state brought
    along (set_msrs, e.g. KVM's kvmclock) still reads and writes, so a migrated guest goes on."""
    guest.vcpu.set_msrs({0x4B564D01: 0x1234})  # MSR_KVM_SYSTEM_TIME_NEW, as a KVM snapshot has it
    guest.setup_long_mode()
    sym = guest.load(
        HANDLERS64
        + """
        start:
        lea 1f(%rip), %r15
        mov $0x48, %ecx             # IA32_SPEC_CTRL: not in this CPUID
        rdmsr
        1: lea 1f(%rip), %r15
        mov $0xc0000100, %ecx       # FS_BASE = a non-canonical address
        mov $0xaaaaaaaa, %eax
        mov %eax, %edx
        wrmsr
        1: mov $0xc0000100, %ecx
        rdmsr
        out %eax, $0xF4             # unchanged
        mov $0x4b564d01, %ecx
        rdmsr
        out %eax, $0xF8
        mov $0x5678, %eax
        xor %edx, %edx
        wrmsr
        rdmsr
        out %eax, $0xF8
        mov $0x179, %ecx            # MCG_CAP: unicorn's own
        rdmsr
        out %eax, $0xFC
        out %al, $0xf0
        """
    )
    guest.gate64(13, sym["h13"])
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xE0)] == [13, 13]
    assert [v for _, v in outs(exits, 0xF4)] == [0]
    assert [v for _, v in outs(exits, 0xF8)] == [0x1234, 0x5678]
    assert [v for _, v in outs(exits, 0xFC)] != [0]  # banks and flags, as unicorn has them
    assert guest.vcpu.get_msrs([0x4B564D01])[0x4B564D01] == 0x5678


def test_cpuid_apic_bit_follows_the_apic_global_enable(guest):
    """CPUID.1:EDX.APIC (bit 9) reads clear while IA32_APIC_BASE's enable bit is clear (SDM vol. 3
    11.4.3): kvm-unit-tests' apic test checks it after disabling the APIC."""
    guest.setup_long_mode()
    sym = guest.load(
        """
        start:
        mov $1, %eax
        cpuid
        mov %edx, %eax
        out %eax, $0xF4
        mov $0x1b, %ecx
        rdmsr
        btr $11, %eax               # global disable
        wrmsr
        mov $1, %eax
        cpuid
        mov %edx, %eax
        out %eax, $0xF4
        out %al, $0xf0
        """
    )
    exits = guest.run_from(sym["start"])
    enabled, disabled = [v for _, v in outs(exits, 0xF4)]
    assert enabled & (1 << 9) and not disabled & (1 << 9)
    assert guest.chip.apic_bases[0] == 0xFEE00100


def test_a_cr4_bit_the_cpuid_does_not_offer_is_gp_and_an_offered_one_is_set(guest):
    """unicorn drops unsupported CR4 bits silently; the CPU raises #GP (SDM vol. 3 2.5), which is
    how guests (kvm-unit-tests' lam, pcid) probe features."""
    guest.setup_long_mode()
    sym = guest.load(
        HANDLERS64
        + """
        start:
        lea 1f(%rip), %r15
        mov %cr4, %rax
        bts $28, %rax               # LAM_SUP: not in this CPUID
        mov %rax, %cr4
        1: mov %cr4, %rax
        out %eax, $0xF4
        lea 1f(%rip), %r15
        bts $7, %rax                # PGE: always there
        mov %rax, %cr4
        1: mov %cr4, %rax
        out %eax, $0xF4
        out %al, $0xf0
        """
    )
    guest.gate64(13, sym["h13"])
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xE0)] == [13]
    first, second = [v for _, v in outs(exits, 0xF4)]
    assert not first & (1 << 28) and second == first | 1 << 7


def test_a_fault_while_delivering_int_n_is_taken_on_the_int_which_then_runs_again(guest):
    """int $0x40 through a not-present gate: #NP(0x40 * 8 + 2) with RIP on the int itself (it was
    past it), so once the handler makes the gate present, its IRET runs the int again."""
    guest.setup_long_mode()
    sym = guest.load(
        """
        start:
        int $0x40
        out %al, $0xf0
        h11:
        pop %rax
        out %eax, $0xF4             # the error code
        mov (%rsp), %rax
        out %eax, $0xF8             # the RIP it returns to
        btsq $47, 0x1400            # IDT + 0x40 * 16: the gate present now
        iretq
        h64:
        mov $0x40, %al
        out %al, $0xE0
        iretq
        """
    )
    guest.gate64(11, sym["h11"])
    guest.gate64(0x40, sym["h64"])
    guest.mem.write_int(IDT + 0x40 * 16, 8, guest.mem.read_int(IDT + 0x40 * 16, 8) & ~(1 << 47))
    exits = guest.run_from(sym["start"])
    assert [v for _, v in outs(exits, 0xF4)] == [0x40 * 8 + 2]
    assert [v for _, v in outs(exits, 0xF8)] == [sym["start"]]
    assert [v for _, v in outs(exits, 0xE0)] == [0x40]


def test_exceptions_32bit():
    g = Guest()
    try:
        g.setup_protected32()
        sym = g.load(
            """
            .code32
            .macro handler vec, errcode
            h\\vec:
            .if \\errcode
            pop %eax
            out %eax, $0xE4
            .endif
            mov $\\vec, %al
            out %al, $0xE0
            mov %cr2, %eax
            out %eax, $0xE8
            .if \\vec == 6 || \\vec == 13 || \\vec == 14
            mov %edi, (%esp)
            .endif
            iret
            .endm
            handler 3, 0
            handler 6, 0
            handler 13, 1
            handler 14, 1
            handler 128, 0
            start:
            mov $1f, %edi
            ud2
            1: mov $1f, %edi
            mov $0x1230, %ax
            mov %ax, %ds
            1: mov %cr0, %eax
            or $0x80000000, %eax
            mov %eax, %cr0              # paging with the 32-bit table below
            mov $1f, %edi
            movl $7, 0x400000           # not present: #PF write
            1: int3
            int $0x80
            out %al, $0xf0
            """
        )
        # 32-bit paging: one PSE-less page table mapping the first 4 MiB, the next 4 MiB absent
        g.mem.write_int(PD, 4, PDPT | 3)
        for i in range(1024):
            g.mem.write_int(PDPT + 4 * i, 4, (i << 12) | 3)
        sregs = g.vcpu.get_sregs()
        sregs.cr3 = PD
        g.vcpu.set_sregs(sregs)
        for vector in (3, 6, 13, 14, 0x80):
            g.gate32(vector, sym[f"h{vector}"])
        regs = g.vcpu.get_regs()
        regs.rip = sym["start"]
        g.vcpu.set_regs(regs)
        exits = g.run_until_done()
        assert [v for _, v in outs(exits, 0xE0)] == [6, 13, 14, 3, 0x80]
        assert [v for _, v in outs(exits, 0xE4)] == [0x1230, 0x2]
        assert [v for _, v in outs(exits, 0xE8)][2] == 0x400000
    finally:
        g.close()


def test_triple_fault_is_shutdown(guest):
    guest.setup_long_mode()
    guest.load(".code64\n ud2\n")
    sregs = guest.vcpu.get_sregs()
    sregs.idt = DescriptorTable(IDT, 0)  # nothing can be delivered: #UD -> #GP -> #DF -> triple fault
    guest.vcpu.set_sregs(sregs)
    assert isinstance(guest.vcpu.run(), Shutdown)
    assert isinstance(guest.vcpu.run(), Shutdown)


# --------------------------------------------------------------------------
# rings: syscall/sysret, interrupts from ring 3 with TSS stack switch, IST


def test_syscall_sysret_round_trip_through_ring3(guest):
    guest.setup_long_mode(user_pages=True)
    sym = guest.load(
        """
        .code64
        kernel:
        mov $0xC0000081, %ecx       # STAR: sysret CS base 0x18 (-> 0x2B/0x23), syscall CS 0x08
        xor %eax, %eax
        mov $0x001B0008, %edx
        wrmsr
        mov $0xC0000082, %ecx       # LSTAR
        lea syscall_entry(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
        mov $0xC0000084, %ecx       # FMASK: clear IF and TF
        mov $0x300, %eax
        xor %edx, %edx
        wrmsr
        push $0x23                  # iretq to ring 3 with IOPL 3 so ring 3 may use OUT
        push $0x70000
        push $0x3202
        push $0x2B
        lea user(%rip), %rax
        push %rax
        iretq
        syscall_entry:
        mov %cs, %ax
        out %ax, $0xE0              # 0x08
        mov %ss, %ax
        out %ax, $0xE2              # 0x10
        mov %r11, %rax
        out %eax, $0xE4             # user RFLAGS
        pushf
        pop %rax
        out %eax, $0xE6             # IF masked
        mov %rcx, %rax
        out %eax, $0xE8             # return RIP
        sysretq
        user:
        mov %cs, %ax
        out %ax, $0xEA              # 0x2B
        syscall
        after:
        mov %cs, %ax
        out %ax, $0xEA              # sysretq: CS = STAR[63:48] + 16 | 3 = 0x2B
        mov %ss, %ax
        out %al, $0xf0
        """
    )
    exits = guest.run_until_done()
    o = dict(outs(exits))
    assert o[0xE0] == 0x08 and o[0xE2] == 0x10
    assert o[0xE4] & 0x200 and not o[0xE6] & 0x200
    assert o[0xE8] == sym["after"]
    assert [v for _, v in outs(exits, 0xEA)] == [0x2B, 0x2B]
    assert o[PORT_DONE] == 0x23
    assert guest.vcpu.get_sregs().cs.dpl == 3


def test_interrupt_from_ring3_switches_to_rsp0_and_ist(guest):
    guest.setup_long_mode(user_pages=True)
    sym = guest.load(
        """
        .code64
        push $0x23
        push $0x70000
        push $0x3202
        push $0x2B
        lea user(%rip), %rax
        push %rax
        iretq
        h80:
        mov %rsp, %rax
        out %eax, $0xE0
        mov 8(%rsp), %rax           # saved CS
        out %al, $0xE1
        mov 32(%rsp), %rax          # saved SS
        out %al, $0xE2
        mov 24(%rsp), %rax          # saved RSP
        out %eax, $0xE3
        mov %ss, %ax
        out %ax, $0xE4
        iretq
        h81:
        mov %rsp, %rax
        out %eax, $0xE5
        iretq
        user:
        int $0x80
        int $0x81
        mov %cs, %ax
        out %al, $0xf0
        """
    )
    guest.gate64(0x80, sym["h80"], dpl=3)
    guest.gate64(0x81, sym["h81"], dpl=3, ist=1)
    exits = guest.run_until_done()
    o = dict(outs(exits))
    assert o[0xE0] == RSP0_TOP - 40
    assert (o[0xE1], o[0xE2], o[0xE3]) == (0x2B, 0x23, 0x70000)
    assert o[0xE4] == 0  # a null SS at CPL 0
    assert o[0xE5] == IST1_TOP - 40
    assert o[PORT_DONE] == 0x2B


def test_int_gate_dpl_violation_is_gp(guest):
    guest.setup_long_mode(user_pages=True)
    sym = guest.load(
        """
        .code64
        push $0x23
        push $0x70000
        push $0x3202
        push $0x2B
        lea user(%rip), %rax
        push %rax
        iretq
        h13:
        pop %rax
        out %eax, $0xE4
        addq $2, (%rsp)
        iretq
        user:
        int $0x40                   # gate DPL 0: #GP(0x40 * 8 + 2)
        out %al, $0xf0
        """
    )
    guest.gate64(0x40, sym["h13"])
    guest.gate64(13, sym["h13"])
    exits = guest.run_until_done()
    assert outs(exits, 0xE4) == [(0xE4, 0x40 * 8 + 2)]


# --------------------------------------------------------------------------
# interrupts from the chip, HLT, request_stop


INTERRUPT_GUEST = """
        .code64
        h30:
        mov $0x30, %al
        out %al, $0xE0
        iretq
        start:
        sti
        spin:
        jmp spin
"""


def run_async(vcpu):
    result = {}

    def target():
        result["exit"] = vcpu.run()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_chip_interrupt_interrupts_a_spin_loop(guest):
    guest.setup_long_mode()
    sym = guest.load(INTERRUPT_GUEST)
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    thread, result = run_async(guest.vcpu)
    time.sleep(0.05)
    assert thread.is_alive()  # spinning, no exit
    raised = time.monotonic()
    guest.chip.raise_vector(0x30)
    thread.join(2)
    latency = time.monotonic() - raised
    assert outs([result["exit"]]) == [(0xE0, 0x30)]
    assert latency < 0.1


@pytest.mark.parametrize("trap", [False, True])
def test_a_64bit_interrupt_gate_clears_if_and_a_trap_gate_keeps_it(guest, trap):
    """Long-mode delivery of an external interrupt: IF = 0 in the handler through an interrupt
    gate (type 0xE), unchanged through a trap gate (0xF) (SDM vol. 3, 6.12.1.3)."""
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        h30:
        pushfq
        pop %rax
        out %eax, $0xE3
        1: jmp 1b
        start:
        sti
        2: jmp 2b
        """
    )
    guest.gate64(0x30, sym["h30"], trap=trap)
    guest.set_rip(sym["start"])
    thread, result = run_async(guest.vcpu)
    time.sleep(0.02)
    guest.chip.raise_vector(0x30)
    thread.join(2)
    (port, rflags), = outs([result["exit"]])
    assert port == 0xE3 and bool(rflags & 0x200) is trap


def test_an_nmi_waits_for_the_iret_of_the_one_being_handled_and_popf_opens_the_window_at_once(guest):
    """NMI blocking (SDM vol. 3 6.7.1): a second NMI raised while the first one's handler runs is
    delivered after that handler's IRET, not nested into it. Then an interrupt raised under IF=0 is
    taken right after the POPF that sets IF, not at a timed retry much later (the guest counts the
    instructions it ran meanwhile: none). unicorn has no hook on IRET or POPF: accel/interp/redirect.py."""
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        h2:
        out %al, $0xE0              # NMI handler begins (the test raises the next NMI here)
        mov $200000, %ecx
        1: dec %ecx
        jnz 1b
        out %al, $0xE4              # and ends
        iretq
        h30:
        mov %r8, %rax
        out %eax, $0xE8             # instructions counted after the POPF before the interrupt
        out %al, $0xf0
        start:
        cli
        out %al, $0xE1              # the NMIs are raised here
        mov $400000, %ecx
        1: dec %ecx
        jnz 1b
        out %al, $0xE2              # the interrupt is raised here, under IF=0
        pushfq
        orq $0x200, (%rsp)
        xor %r8, %r8
        popfq
        2: inc %r8
        jmp 2b
        """
    )
    guest.gate64(2, sym["h2"])
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    seen = []
    for _ in range(20):
        exit_value = guest.vcpu.run()
        port = exit_value.port if isinstance(exit_value, IoOut) else None
        seen.append(port)
        if port in (0xE1, 0xE0) and seen.count(0xE0) < 2:
            guest.chip.nmi = True
            guest.vcpu.wake()
        elif port == 0xE2:
            guest.chip.raise_vector(0x30)
        elif port == 0xE8:
            assert int.from_bytes(exit_value.data, "little") == 0
        elif port == PORT_DONE:
            break
    assert [p for p in seen if p in (0xE0, 0xE4)] == [0xE0, 0xE4, 0xE0, 0xE4]
    assert seen[-2:] == [0xE8, PORT_DONE]


def test_interrupt_waits_for_if(guest):
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        h30:
        mov $0x30, %al
        out %al, $0xE0
        iretq
        start:
        cli
        mov $2000000, %ecx
        1: dec %ecx
        jnz 1b
        out %al, $0xE1              # still IF=0: no interrupt yet
        sti
        nop
        2: jmp 2b
        """
    )
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    guest.chip.raise_vector(0x30)
    assert outs([guest.vcpu.run()]) == [(0xE1, 0)]
    thread, result = run_async(guest.vcpu)
    thread.join(2)
    assert outs([result["exit"]]) == [(0xE0, 0x30)]


def test_interrupt_reaches_an_sti_pause_idle_loop(guest):
    """``sti; pause`` leaves QEMU's interrupt-shadow flag set past the pause (its helper exits the
    block early); every stop then landed right there and the interrupt waited forever (the
    apictimer guest failed 1 run in 4 this way). Only IF=1 spans ``pause; jmp``."""
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        h30:
        mov $0x30, %al
        out %al, $0xE0
        1: jmp 1b
        start:
        cli
        2: sti
        pause
        cli
        jmp 2b
        """
    )
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    thread, result = run_async(guest.vcpu)
    time.sleep(0.05)
    guest.chip.raise_vector(0x30)
    thread.join(3)
    assert not thread.is_alive(), "the interrupt was never delivered to the sti; pause loop"
    assert outs([result["exit"]]) == [(0xE0, 0x30)]


@pytest.mark.parametrize("before, window_open", [(b"\x90\xfb", False), (b"\x8e\xd0", False), (b"\xf3\x90", True)])
def test_the_shadow_holds_only_right_after_the_instruction_that_makes_it(guest, before, window_open):
    """At a stop with QEMU's shadow flag set and IF = 1: after sti or mov ss the interrupt must
    wait one instruction; after anything else (pause) the flag is stale and is dropped."""
    from pyvmm.accel.interp import engine

    guest.setup_long_mode()
    guest.mem.write(CODE, before + b"\x90")
    regs = guest.vcpu.get_regs()
    regs.rip, regs.rflags = CODE + len(before), 0x202
    guest.vcpu.set_regs(regs)
    blob = engine.Blob(guest.vcpu.uc)
    blob.hflags = blob.hflags | engine.HF_INHIBIT_IRQ
    blob.restore()
    guest.vcpu._sync_memory()
    assert guest.vcpu._window_open() is window_open
    assert bool(guest.vcpu.engine.hflags & engine.HF_INHIBIT_IRQ) is not window_open


def test_hlt_sleeps_until_interrupt(guest):
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        h30:
        iretq
        start:
        sti
        hlt
        out %al, $0xE1
        """
    )
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    thread, result = run_async(guest.vcpu)
    cpu_before = time.process_time()
    time.sleep(0.3)
    cpu_used = time.process_time() - cpu_before
    assert thread.is_alive()
    assert cpu_used < 0.1, f"halted vCPU used {cpu_used:.3f}s of CPU in 0.3s"
    guest.chip.raise_vector(0x30)
    thread.join(2)
    assert outs([result["exit"]]) == [(0xE1, 0)]


def test_hlt_wakes_at_timer_deadline(guest):
    guest.setup_long_mode()
    sym = guest.load(INTERRUPT_GUEST.replace("spin:\n        jmp spin", "hlt\n        out %al, $0xE1"))
    guest.gate64(0x30, sym["h30"])
    guest.set_rip(sym["start"])
    chip = guest.chip
    polls_at = []

    def poll():
        polls_at.append(time.monotonic())
        if chip.deadline is not None and time.monotonic() >= chip.deadline:
            chip.deadline = None
            chip.vectors.append(0x30)

    chip.poll = poll
    start = time.monotonic()
    chip.deadline = start + 0.2
    exit_value = guest.vcpu.run()
    assert outs([exit_value]) == [(0xE0, 0x30)]
    assert time.monotonic() - start >= 0.2
    assert len(polls_at) < 20  # woke for the deadline, did not poll in a loop


def test_request_stop_interrupts_running_and_pending(guest):
    guest.setup_long_mode()
    sym = guest.load(INTERRUPT_GUEST)
    guest.set_rip(sym["start"])
    guest.vcpu.request_stop()
    assert isinstance(guest.vcpu.run(), Interrupted)  # a stop before run() is not lost
    thread, result = run_async(guest.vcpu)
    time.sleep(0.05)
    guest.vcpu.request_stop()
    thread.join(2)
    assert isinstance(result.get("exit"), Interrupted)
    rip = guest.vcpu.get_regs().rip
    assert sym["spin"] <= rip <= sym["spin"] + 2


def test_what_cannot_be_emulated_is_internal_error_with_rip_and_bytes(guest):
    guest.setup_long_mode()
    sregs = guest.vcpu.get_sregs()
    sregs.idt = DescriptorTable(IDT, 8 * 8 - 1)
    guest.vcpu.set_sregs(sregs)
    guest.setup_protected32()  # 32-bit protected mode: IDT entries are 8 bytes
    guest.mem.write_int(IDT + 6 * 8, 8, (0x85 << 40) | (0x30 << 16))  # #UD -> a task gate
    guest.load(".code32\n nop\n ud2\n")
    exit_value = guest.vcpu.run()
    assert isinstance(exit_value, InternalError)
    assert exit_value.rip == CODE + 1
    assert "task gate" in exit_value.reason
    assert "0f 0b" in exit_value.detail


# --------------------------------------------------------------------------
# CPUID


def test_cpuid_from_table(guest):
    table = guest.vm.supported_cpuid()
    leaves = {(e.function, e.index): e for e in table}
    assert leaves[(0, 0)].ebx.to_bytes(4, "little") == b"Genu"
    leaf1 = leaves[(1, 0)]
    assert not leaf1.ecx & (1 << 28)  # AVX
    assert not leaf1.ecx & (1 << 21)  # x2APIC
    assert leaf1.ecx & (1 << 24)  # TSC deadline: IA32_TSC_DEADLINE reaches the vCPU and its LAPIC
    assert leaf1.edx & (1 << 9)  # APIC
    assert not leaves[(7, 0)].ebx & (1 << 5)  # AVX2
    assert leaves[(0xD, 0)].eax == 3
    tsc = leaves[(0x15, 0)]
    assert tsc.ecx == FakeChip.LAPIC_TIMER_HZ
    assert 100_000_000 < tsc.ecx * tsc.ebx // tsc.eax < 10_000_000_000

    guest.setup_long_mode()
    guest.load(
        """
        .code64
        xor %eax, %eax
        cpuid
        mov %ebx, %eax
        out %eax, $0xE0
        mov $0x15, %eax
        cpuid
        mov %ebx, %eax
        out %eax, $0xE1
        mov $0x40000000, %eax
        cpuid
        out %eax, $0xf0
        """
    )
    exits = guest.run_until_done()
    o = dict(outs(exits))
    assert o[0xE0] == int.from_bytes(b"Genu", "little")
    assert o[0xE1] == tsc.ebx
    assert o[PORT_DONE] == 0
    # set_cpuid replaces the table
    from pyvmm.accel.x86 import CpuidEntry

    guest.vcpu.set_cpuid([CpuidEntry(0, 0, 1, 0x11111111, 0x22222222, 0x33333333)])
    guest.set_rip(CODE)
    exits = guest.run_until_done()
    assert dict(outs(exits))[0xE0] == 0x11111111


# --------------------------------------------------------------------------
# SMP start-up


def test_ap_waits_for_init_sipi_then_starts_in_real_mode():
    chip = FakeChip(vcpu_count=2)
    g = Guest(chip=chip, vcpus=2)
    try:
        ap = g.vm.create_vcpu(1)
        blob, _ = assemble(
            """
            .code16
            mov %cs, %ax
            out %ax, $0xE0
            out %al, $0xf0
            """,
            base=0,
        )
        g.mem.write(0x8000, blob)
        thread, result = run_async(ap)
        time.sleep(0.1)
        assert thread.is_alive()  # wait-for-SIPI
        chip.events[1] = [("init", 0), ("sipi", 0x08)]
        g.vm._wake(1)
        thread.join(2)
        assert outs([result["exit"]]) == [(0xE0, 0x0800)]
        sregs = ap.get_sregs()
        assert sregs.cs.base == 0x8000 and sregs.cr0 & 1 == 0
    finally:
        g.close()


# --------------------------------------------------------------------------
# cost of one exit (reported, loosely bounded)


def test_exit_round_trip_cost(guest):
    guest.setup_long_mode()
    guest.load(
        """
        .code64
        1: out %al, $0x80
        jmp 1b
        """
    )
    guest.vcpu.run()
    count = 2000
    start = time.perf_counter()
    for _ in range(count):
        guest.vcpu.run()
    per_exit = (time.perf_counter() - start) / count
    print(f"interp port-I/O exit round trip: {per_exit * 1e6:.1f} us")
    assert per_exit < 0.002


def test_self_modifying_code_through_an_alias_is_seen(guest):
    guest.setup_long_mode()
    guest.mem.write_int(PD + 8, 8, 0x83)  # 2-4 MiB virtual aliases physical 0-2 MiB
    sym = guest.load(
        """
        .code64
        call func
        out %eax, $0xE0
        movb $2, func + 1           # patch the immediate through the identity mapping
        call func
        out %eax, $0xE0
        movb $3, func + 1 + 0x200000  # and through the alias
        call func
        out %eax, $0xE0
        out %al, $0xf0
        func:
        mov $1, %eax
        ret
        """
    )
    assert sym["func"] < 0x200000
    exits = guest.run_until_done()
    assert [v for _, v in outs(exits, 0xE0)] == [1, 2, 3]


def test_sysenter_sysexit_round_trip_32bit():
    g = Guest()
    try:
        g.setup_protected32()
        # GDT for SYSENTER_CS = 0x08: 0x08 code0, 0x10 data0, 0x18 code3, 0x20 data3
        for i, entry in enumerate(
            [0, descriptor(0, 0xFFFFF, 0x9A, 0xC), descriptor(0, 0xFFFFF, 0x92, 0xC),
             descriptor(0, 0xFFFFF, 0xFA, 0xC), descriptor(0, 0xFFFFF, 0xF2, 0xC)]
        ):  # fmt: skip
            g.mem.write_int(GDT + 8 * i, 8, entry)
        sregs = g.vcpu.get_sregs()
        sregs.gdt = DescriptorTable(GDT, 5 * 8 - 1)
        g.vcpu.set_sregs(sregs)
        sym = g.load(
            """
            .code32
            mov $0x174, %ecx            # SYSENTER_CS
            mov $0x08, %eax
            xor %edx, %edx
            wrmsr
            mov $0x175, %ecx            # SYSENTER_ESP
            mov $0x90000, %eax
            wrmsr
            mov $0x176, %ecx            # SYSENTER_EIP
            mov $entry, %eax
            wrmsr
            pushl $0x23                 # iret to ring 3 (IOPL 3)
            pushl $0x70000
            pushl $0x3202
            pushl $0x1B
            pushl $user
            iret
            entry:
            mov %cs, %ax
            out %ax, $0xE0
            mov %esp, %eax
            out %eax, $0xE2
            pushf
            pop %eax
            out %eax, $0xE4             # IF cleared by sysenter
            mov $after, %edx            # sysexit: EIP = EDX, ESP = ECX
            mov $0x6FFF0, %ecx
            sysexit
            user:
            sysenter
            after:
            mov %cs, %ax
            out %ax, $0xE6
            mov %esp, %eax
            out %al, $0xf0
            """
        )
        exits = g.run_until_done()
        o = dict(outs(exits))
        assert o[0xE0] == 0x08 and o[0xE2] == 0x90000 and not o[0xE4] & 0x200
        assert o[0xE6] == 0x1B and o[PORT_DONE] == 0xF0
        assert sym["after"] > sym["user"]
    finally:
        g.close()


def test_real_mode_software_and_external_interrupts_use_the_ivt(guest):
    blob, sym = assemble(
        """
        .code16
        start:
        xor %ax, %ax
        mov %ax, %ss
        mov $0x7000, %sp
        movw $(h21 - start), 0x21 * 4      # IVT entry 0x21 -> 0x2000:h21
        movw $0x2000, 0x21 * 4 + 2
        movw $(h08 - start), 0x08 * 4
        movw $0x2000, 0x08 * 4 + 2
        int $0x21
        out %al, $0xE1
        sti
        1: jmp 1b
        h21:
        mov $0x21, %al
        out %al, $0xE0
        iret
        h08:
        mov $0x08, %al
        out %al, $0xE0
        pushf
        pop %ax
        out %ax, $0xE2                     # IF cleared on entry
        mov %sp, %ax
        out %ax, $0xf0
        """,
        base=0,
    )
    guest.mem.write(0x20000, blob)
    sregs = guest.vcpu.get_sregs()
    sregs.cs = Segment(base=0x20000, limit=0xFFFF, selector=0x2000, type=11)
    sregs.ds = Segment(base=0, limit=0xFFFF, selector=0, type=3)
    guest.vcpu.set_sregs(sregs)
    guest.vcpu.set_regs(Regs(rip=0, rflags=2))
    assert outs([guest.vcpu.run()]) == [(0xE0, 0x21)]
    assert outs([guest.vcpu.run()]) == [(0xE1, 0x21)]
    guest.chip.raise_vector(0x08)
    exits = guest.run_until_done()
    o = dict(outs(exits))
    assert o[0xE0] == 0x08 and not o[0xE2] & 0x200
    assert o[PORT_DONE] == 0x7000 - 6  # FLAGS, CS, IP pushed


def test_two_vcpus_lock_incl_is_atomic():
    chip = FakeChip(vcpu_count=2)
    g = Guest(chip=chip, vcpus=2)
    try:
        ap = g.vm.create_vcpu(1)
        g.setup_long_mode()
        ap.set_sregs(g.vcpu.get_sregs())
        g.load(
            """
            .code64
            mov $3000000, %ecx          # long enough that both engines overlap (~0.1 s each)
            1: lock incl 0x8000
            dec %ecx
            jnz 1b
            out %al, $0xf0
            """
        )
        ap._wait_for_sipi = False  # start the AP directly in long mode for this test
        ap.set_regs(Regs(rip=CODE, rsp=STACK_TOP - 0x1000, rflags=2))
        results = []
        threads = [threading.Thread(target=lambda v=v: results.append(v.run())) for v in (g.vcpu, ap)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [outs([r])[0][0] for r in results] == [PORT_DONE, PORT_DONE]
        # unicorn emulates "lock incl" as load/add/store: two engines running at once lose about
        # half the increments; the backend's engine lock makes every instruction atomic
        assert g.mem.read_int(0x8000, 4) == 6000000
    finally:
        g.close()


def test_state_set_at_an_io_exit_replaces_the_rest_of_the_instruction(guest):
    guest.setup_long_mode()
    sym = guest.load(
        """
        .code64
        out %al, $0x90              # the VMM "resets" the vCPU here
        out %al, $0x91              # never reached
        reset_target:
        out %al, $0xf0
        """
    )
    exit_value = guest.vcpu.run()
    assert outs([exit_value]) == [(0x90, 0)]
    regs = guest.vcpu.get_regs()
    regs.rip = sym["reset_target"]
    regs.rax = 0x42
    guest.vcpu.set_regs(regs)
    exits = guest.run_until_done()
    assert outs(exits) == [(PORT_DONE, 0x42)]


def test_mmio_above_4g_exits(guest):
    guest.setup_long_mode()
    guest.mem.write_int(PDPT + 8 * 8, 8, (8 << 30) | 0x83)  # virtual 8 GiB -> physical 8 GiB, no RAM there
    guest.load(
        """
        .code64
        movabs $0x200000010, %rbx
        mov (%rbx), %eax
        mov %eax, 4(%rbx)
        out %al, $0xf0
        """
    )
    exits = guest.run_until_done(lambda e: 0x5A)
    assert [(type(e).__name__, e.addr) for e in exits if isinstance(e, (MmioRead, MmioWrite))] == [
        ("MmioRead", 0x200000010),
        ("MmioWrite", 0x200000014),
    ]


def test_whole_vcpu_state_moves_to_another_engine_mid_run():
    """What a fallback manager does: stop at an instruction boundary, copy every piece of state
    to a fresh vCPU over the same memory, continue there (ring 3, SSE, FS/GS bases, syscall MSRs)."""
    first = Guest()
    try:
        first.setup_long_mode(user_pages=True)
        first.load(
            """
            .code64
            mov $0xC0000081, %ecx
            xor %eax, %eax
            mov $0x001B0008, %edx
            wrmsr
            mov $0xC0000082, %ecx
            lea entry(%rip), %rax
            xor %edx, %edx
            wrmsr
            mov $0xC0000084, %ecx
            mov $0x200, %eax
            wrmsr
            xor %eax, %eax
            mov %eax, %fs               # a null FS selector, as Linux uses: iretq to ring 3 keeps its base
            mov $0xC0000100, %ecx       # FS base
            mov $0x7000, %eax
            wrmsr
            mov $0x1234, %eax
            movd %eax, %xmm3
            push $0x23
            push $0x70000
            push $0x3202
            push $0x2B
            lea user(%rip), %rax
            push %rax
            iretq
            entry:
            add $1, %r12
            sysretq
            user:
            xor %r12d, %r12d
            1: syscall
            cmp $5000, %r12             # each syscall is emulated by the backend: ~0.1 ms
            jb 1b
            movd %xmm3, %eax
            add %fs:0, %eax
            out %eax, $0xf0
            """
        )
        first.mem.write_int(0x7000, 4, 0x100000)
        thread, result = run_async(first.vcpu)
        time.sleep(0.1)
        first.vcpu.request_stop()
        thread.join(5)
        assert isinstance(result["exit"], Interrupted)
        vcpu = first.vcpu
        regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
        msr_ids = [0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0x277]
        msrs = vcpu.get_msrs(msr_ids)
        assert 0 < regs.r12 < 5000, "stopped in the middle of the loop"
        second_vm = InterpVm(1, irqchip=FakeChip())
        try:
            region = first.mem.regions[0]
            second_vm.map_memory(0, 0, region.buffer)
            moved = second_vm.create_vcpu(0)
            moved.set_msrs(msrs)
            moved.set_sregs(sregs)
            moved.set_fpu(fpu)
            moved.set_regs(regs)
            assert moved.get_regs() == regs and moved.get_sregs() == sregs and moved.get_msrs(msr_ids) == msrs
            exit_value = moved.run()
            assert outs([exit_value]) == [(PORT_DONE, 0x101234)]
            assert moved.get_regs().r12 == 5000
            assert moved.get_sregs().cs.dpl == 3
        finally:
            second_vm.close()
    finally:
        first.close()


def test_close_while_running_returns_promptly():
    g = Guest()
    g.setup_long_mode()
    sym = g.load(INTERRUPT_GUEST)
    regs = g.vcpu.get_regs()
    regs.rip = sym["start"]
    g.vcpu.set_regs(regs)
    thread, result = run_async(g.vcpu)
    time.sleep(0.05)
    started = time.monotonic()
    g.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert isinstance(result["exit"], (InternalError, Interrupted))
    assert isinstance(g.vcpu.run(), InternalError)
