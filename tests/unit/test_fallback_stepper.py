"""The fallback manager without a hypervisor: a fake vCPU (plain state) handed to the stepper.

The guest is 32-bit flat protected mode without paging (the PVH entry state):
GDT at 0x800, IDT at 0x1000 with a #BP gate, code at 0x2000, #BP handler at 0x3000.
"""

from __future__ import annotations

import struct

import pytest

from pyvmm.accel.core import EmulationFailure
from pyvmm.accel.fallback import FallbackManager, fallback_cpuid
from pyvmm.accel.x86 import (
    SHADOW_STI,
    CpuidEntry,
    DescriptorTable,
    FpuState,
    PendingEvents,
    Regs,
    Segment,
    SpecialRegs,
    fpu_from_fxsave,
    fpu_into_xsave,
)
from pyvmm.arch.x86.pc import IRQCHIP_PORTS
from pyvmm.errors import GuestError
from pyvmm.vmm.bus import MmioBus, PioBus
from pyvmm.vmm.memory import GuestMemory

pytest.importorskip("unicorn")

GDT, IDT, CODE, HANDLER, STACK = 0x800, 0x1000, 0x2000, 0x3000, 0x8000


class FakeVcpu:
    """A stopped vCPU whose state is plain data (what KVM's get/set calls would move)."""

    def __init__(self):
        self.index = 0
        flat_code = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, db=True, g=True)
        flat_data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, db=True, g=True)
        self.sregs = SpecialRegs(cs=flat_code, ds=flat_data, es=flat_data, ss=flat_data, fs=flat_data, gs=flat_data,
                                 gdt=DescriptorTable(GDT, 23), idt=DescriptorTable(IDT, 0x7FF), cr0=0x11)  # fmt: skip
        self.regs = Regs(rip=CODE, rsp=STACK, rflags=0x2)
        self.fpu = FpuState()
        self.msrs = {}
        self.xcr0 = 1
        self.events = PendingEvents()
        self.writes = []
        self.events_set = []

    def get_regs(self):
        return Regs(**vars(self.regs))

    def set_regs(self, regs):
        self.writes.append("regs")
        self.regs = regs

    def get_sregs(self):
        import copy

        return copy.deepcopy(self.sregs)

    def set_sregs(self, sregs):
        self.writes.append("sregs")
        self.sregs = sregs

    def get_fpu(self):
        return self.fpu

    def set_fpu(self, fpu):
        self.writes.append("fpu")
        self.fpu = fpu

    def get_msrs(self, indices):
        return {i: self.msrs.get(i, 0) for i in indices}

    def set_msrs(self, msrs):
        self.writes.append("msrs")
        self.msrs.update(msrs)

    def get_xcr0(self):
        return self.xcr0

    def set_xcr0(self, value):
        self.writes.append("xcr0")
        self.xcr0 = value

    def get_events(self):
        import copy

        return copy.deepcopy(self.events)

    def set_events(self, events):
        self.events_set.append(events)
        self.events = events


class Port:
    def __init__(self, value=0):
        self.value, self.written = value, []

    def read(self, offset, data):
        data[:] = self.value.to_bytes(len(data), "little")

    def write(self, offset, data):
        self.written.append((offset, bytes(data)))


@pytest.fixture
def machine():
    memory = GuestMemory.from_buffers([(0, bytearray(0x10000))])
    memory.write_int(GDT + 8, 8, 0x00CF9B000000FFFF)
    memory.write_int(GDT + 16, 8, 0x00CF93000000FFFF)
    gate = (HANDLER & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((HANDLER >> 16) << 48)
    memory.write_int(IDT + 3 * 8, 8, gate)
    pio, mmio = PioBus(), MmioBus()
    port, device = Port(0x5A), Port(0x0F0F0F0F)
    pio.insert(port, 0x510, 1)
    mmio.insert(device, 0xD0000000, 0x1000)
    manager = FallbackManager(memory, pio, mmio)
    yield memory, manager, port, device
    manager.close()


def step(memory, manager, vcpu, code: bytes):
    memory.write(vcpu.regs.rip, code)
    manager(vcpu, EmulationFailure(vcpu.regs.rip, code.ljust(15, b"\x90")))


def test_popcnt_result_and_flags_move_back(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    vcpu.regs.rbx = 0xF0F1
    step(memory, manager, vcpu, b"\xf3\x0f\xb8\xc3")  # popcnt eax, ebx
    assert vcpu.regs.rax == 9 and vcpu.regs.rip == CODE + 4 and not vcpu.regs.rflags & 0x40
    assert vcpu.writes == ["regs"]  # nothing else changed, nothing else written
    assert manager.counts() == {"popcnt eax, ebx (f3 0f b8 c3)": 1}


def test_cmpxchg8b_success_and_failure(machine):
    memory, manager, _, _ = machine
    memory.write(0x5000, struct.pack("<II", 1, 2))
    vcpu = FakeVcpu()
    vcpu.regs.rax, vcpu.regs.rdx, vcpu.regs.rbx, vcpu.regs.rcx, vcpu.regs.rsi = 1, 2, 3, 4, 0x5000
    step(memory, manager, vcpu, b"\xf0\x0f\xc7\x0e")  # lock cmpxchg8b [esi]
    assert vcpu.regs.rflags & 0x40 and memory.read(0x5000, 8) == struct.pack("<II", 3, 4)
    vcpu.regs.rax, vcpu.regs.rdx = 7, 7
    step(memory, manager, vcpu, b"\xf0\x0f\xc7\x0e")
    assert not vcpu.regs.rflags & 0x40 and (vcpu.regs.rax, vcpu.regs.rdx) == (3, 4)
    assert list(manager.counts().values()) == [2]


def test_int3_resumes_at_the_handler_with_a_frame(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    vcpu.regs.rflags = 0x202
    step(memory, manager, vcpu, b"\xcc")
    assert vcpu.regs.rip == HANDLER and vcpu.regs.rsp == STACK - 12
    assert struct.unpack("<III", memory.read(STACK - 12, 12)) == (CODE + 1, 0x08, 0x202)
    assert not vcpu.regs.rflags & 0x200  # interrupt gate clears IF


def test_port_and_mmio_accesses_reach_the_vmm_buses(machine):
    memory, manager, port, device = machine
    vcpu = FakeVcpu()
    vcpu.regs.rdx, vcpu.regs.rax = 0x510, 0x41
    step(memory, manager, vcpu, b"\xee")  # out dx, al
    assert port.written == [(0, b"A")]
    vcpu.regs.rsi = 0xD0000000
    step(memory, manager, vcpu, b"\xf3\x0f\xb8\x06")  # popcnt eax, [esi]
    assert vcpu.regs.rax == 16


def test_lapic_access_is_refused_with_rip_and_address(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    with pytest.raises(GuestError, match=r"rip 0x2000\).*LAPIC register 0xfee000b0"):
        step(memory, manager, vcpu, b"\xa1\xb0\x00\xe0\xfe")  # mov eax, [0xfee000b0]
    assert vcpu.regs.rip == CODE and vcpu.writes == []  # nothing moved back


def test_kvm_irqchip_port_is_refused(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    assert 0x40 in IRQCHIP_PORTS
    with pytest.raises(GuestError, match=r"port 0x40 \(the hypervisor's in-kernel PIC/PIT"):
        step(memory, manager, vcpu, b"\xe4\x40")  # in al, 0x40


def test_instruction_the_interpreter_lacks_is_a_clear_error(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    vcpu.sregs.cr4 = (1 << 9) | (1 << 18)
    with pytest.raises(GuestError, match=r"cannot execute vpxor xmm0, xmm0, xmm0 \(bytes: c5 f9 ef c0\).*does not implement AVX"):
        step(memory, manager, vcpu, b"\xc5\xf9\xef\xc0")


def test_sse_instruction_moves_the_fpu_state_both_ways(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    vcpu.sregs.cr4 = 1 << 9  # OSFXSR
    vcpu.fpu.xmm = [bytes([i]) * 16 for i in range(16)]
    step(memory, manager, vcpu, b"\x66\x0f\xef\xca")  # pxor xmm1, xmm2
    assert vcpu.fpu.xmm[1] == bytes([1 ^ 2]) * 16 and vcpu.fpu.xmm[2] == bytes([2]) * 16
    assert "fpu" in vcpu.writes


def test_fxsave_area_round_trip():
    fpu = FpuState(fcw=0x27F, fsw=0x3800, ftwx=0x81, last_opcode=0x123, last_ip=0x1000, last_dp=0x2000,
                   fpr=[bytes([i]) * 10 + bytes(6) for i in range(8)], xmm=[bytes([0x10 + i]) * 16 for i in range(16)],
                   mxcsr=0x1FA0)  # fmt: skip
    area = fpu_into_xsave(bytes(4096), fpu)
    assert fpu_from_fxsave(area) == fpu
    assert struct.unpack_from("<Q", area, 512)[0] & 3 == 3  # x87/SSE not in init state


def test_fallback_cpuid_intersects_feature_leaves():
    avx, cx16, x2apic, popcnt = 1 << 28, 1 << 13, 1 << 21, 1 << 23
    kvm = [CpuidEntry(0, 0, 0xD, 1, 2, 3), CpuidEntry(1, 0, 0x306C3, 0, avx | cx16 | x2apic | popcnt, 0xFF),
           CpuidEntry(7, 0, 0, 0b111, 0, 0, True), CpuidEntry(0xD, 0, 0x7, 0x340, 0x340, 0, True),
           CpuidEntry(0xD, 2, 0x100, 0x240, 0, 0, True), CpuidEntry(4, 0, 0x121, 1, 2, 3, True)]  # fmt: skip
    interp = [CpuidEntry(1, 0, 0, 0, cx16 | popcnt, 0x0F), CpuidEntry(7, 0, 0, 0b101, 0, 0, True),
              CpuidEntry(0xD, 0, 0x3, 0x240, 0x240, 0, True)]  # fmt: skip
    out = {(e.function, e.index): e for e in fallback_cpuid(kvm, interp)}
    assert out[(1, 0)].ecx == cx16 | x2apic | popcnt and out[(1, 0)].edx == 0x0F  # AVX gone, x2APIC (KVM's) kept
    assert out[(7, 0)].ebx == 0b101
    assert (out[(0xD, 0)].eax, out[(0xD, 0)].ecx) == (3, 576) and (0xD, 2) not in out
    assert out[(4, 0)] == kvm[5] and out[(0, 0)] == kvm[0]  # non-feature leaves are KVM's
    two = {(e.function, e.index): e for e in fallback_cpuid(kvm, interp, vcpu_count=2)}
    assert not two[(1, 0)].ecx & cx16  # a stepped lock cmpxchg16b is not atomic against other vCPUs


def test_legacy_instruction_the_interpreter_lacks_is_a_clear_error(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    with pytest.raises(GuestError, match=r"rip 0x2000\): the interpreter fallback cannot execute monitor .*does not implement"):
        step(memory, manager, vcpu, b"\x0f\x01\xc8")  # monitor
    assert vcpu.writes == []


class EventVcpu(FakeVcpu):
    """A fake vCPU with pending events, as a hypervisor reports them."""

    def __init__(self, events: PendingEvents):
        super().__init__()
        self.events = events


def test_an_event_kvm_was_injecting_is_delivered_first_and_nothing_runs(machine):
    memory, manager, _, _ = machine
    vcpu = EventVcpu(PendingEvents(exception=3))
    vcpu.regs.rbx = 0xFF
    step(memory, manager, vcpu, b"\xf3\x0f\xb8\xc3")  # popcnt eax, ebx: must not run yet
    assert vcpu.regs.rip == HANDLER and vcpu.regs.rax == 0
    assert struct.unpack("<I", memory.read(STACK - 12, 4))[0] == CODE  # the frame returns to the popcnt
    assert vcpu.events_set and vcpu.events.exception is None


@pytest.mark.parametrize("events, vector", [(PendingEvents(interrupt=0x30), 0x30),
                                             (PendingEvents(nmi_injected=True), 2)])  # fmt: skip
def test_an_interrupt_being_injected_is_delivered_once_and_then_cleared(machine, events, vector):
    """An external interrupt (or NMI) the hypervisor was injecting when its emulator failed: the step
    delivers it through the IDT and tells the hypervisor it is done, or the guest would take it twice."""
    memory, manager, _, _ = machine
    gate = (HANDLER & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((HANDLER >> 16) << 48)
    memory.write_int(IDT + vector * 8, 8, gate)
    vcpu = EventVcpu(events)
    vcpu.regs.rflags = 0x202
    step(memory, manager, vcpu, b"\xf3\x0f\xb8\xc3")  # popcnt eax, ebx: must not run yet
    assert vcpu.regs.rip == HANDLER and struct.unpack("<I", memory.read(STACK - 12, 4))[0] == CODE
    assert vcpu.events.interrupt is None and not vcpu.events.nmi_injected
    assert vcpu.events.nmi_masked is (vector == 2)  # an NMI's delivery blocks NMIs until IRET


def test_interrupt_shadow_ends_after_the_stepped_instruction(machine):
    memory, manager, _, _ = machine
    vcpu = EventVcpu(PendingEvents(shadow=SHADOW_STI))
    vcpu.regs.rbx = 3
    step(memory, manager, vcpu, b"\xf3\x0f\xb8\xc3")
    assert vcpu.regs.rax == 2 and vcpu.events.shadow == 0
    quiet = EventVcpu(PendingEvents())
    step(memory, manager, quiet, b"\xf3\x0f\xb8\xc3")
    assert quiet.events_set == []  # nothing changed: no KVM_SET_VCPU_EVENTS


def test_linux_options_only_for_linux_on_pvm(tmp_path, monkeypatch):
    from pyvmm.accel.fallback import pvm_kernel_cmdline

    vmlinux, other = tmp_path / "vmlinux", tmp_path / "guest.elf"
    vmlinux.write_bytes(b"\x7fELF" + bytes(100) + b"Linux version 6.1.0 (gcc)")
    other.write_bytes(b"\x7fELF" + bytes(100))
    assert pvm_kernel_cmdline("console=ttyS0", vmlinux, pvm=True) == "console=ttyS0 noxsave clearcpuid=137,141,151,308"
    assert pvm_kernel_cmdline("noxsave clearcpuid=1", vmlinux, pvm=True) == "noxsave clearcpuid=1"
    assert pvm_kernel_cmdline("console=ttyS0", other, pvm=True) == "console=ttyS0"
    assert pvm_kernel_cmdline("console=ttyS0", vmlinux, pvm=False) == "console=ttyS0"


def test_msrs_move_for_an_instruction_that_reads_them(machine):
    memory, manager, _, _ = machine
    vcpu = FakeVcpu()
    vcpu.msrs[0xC0000103] = 0x1234  # TSC_AUX
    step(memory, manager, vcpu, b"\x0f\x01\xf9")  # rdtscp: ECX = TSC_AUX
    assert vcpu.regs.rcx == 0x1234 and vcpu.regs.rip == CODE + 3
    assert "msrs" not in vcpu.writes  # read, not changed: nothing written back


def test_xrstor_with_avx_in_xcr0_is_refused(machine):
    memory, manager, _, _ = machine

    vcpu = FakeVcpu()
    vcpu.xcr0 = 0x7  # x87 | SSE | AVX
    vcpu.sregs.cr4 = (1 << 9) | (1 << 18)
    vcpu.regs.rdi = 0x6000
    with pytest.raises(GuestError, match=r"cannot execute xrstor .*XCR0 is 0x7: the interpreter's xrstor covers only"):
        step(memory, manager, vcpu, b"\x0f\xae\x2f")  # xrstor [edi]
    assert vcpu.writes == []


@pytest.mark.parametrize("count, rip_after", [(3, CODE), (1, CODE + 2)])
def test_a_rep_string_step_moves_past_the_instruction_after_its_last_iteration(machine, count, rip_after):
    """One iteration per step, as the CPU does between interrupts; after the last one the CPU is past
    the instruction (SDM vol. 2 REP), where unicorn's single step leaves it on it with ECX = 0."""
    memory, manager, port, _ = machine
    vcpu = FakeVcpu()
    memory.write(0x5000, b"ABC")
    vcpu.regs.rdx, vcpu.regs.rsi, vcpu.regs.rcx = 0x510, 0x5000, count
    step(memory, manager, vcpu, b"\xf3\x6e")  # rep outsb
    assert port.written == [(0, b"A")]
    assert (vcpu.regs.rcx, vcpu.regs.rsi, vcpu.regs.rip) == (count - 1, 0x5001, rip_after)


def test_the_rep_count_register_follows_the_address_size():
    from pyvmm.arch.x86.insn import rep_count_mask

    assert rep_count_mask(b"\xf3\x6e", code_bits=64) == (1 << 64) - 1
    assert rep_count_mask(b"\x67\xf3\x6e", code_bits=64) == 0xFFFFFFFF
    assert rep_count_mask(b"\xf3\x48\xa5", code_bits=64) == (1 << 64) - 1  # rep movsq: REX after the prefix
    assert rep_count_mask(b"\xf3\x6e", code_bits=32) == 0xFFFFFFFF
    assert rep_count_mask(b"\x67\xf3\x6e", code_bits=32) == 0xFFFF
    assert rep_count_mask(b"\xf3\x6e", code_bits=16) == 0xFFFF
    assert rep_count_mask(b"\x6e", code_bits=32) is None
    assert rep_count_mask(b"\x48\x89\xc3", code_bits=64) is None  # mov rbx, rax
