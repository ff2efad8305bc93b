"""The KVM backend against tiny hand-assembled guests (32-bit flat protected mode).

Each guest is a few instructions at GUEST_CODE in 64 KiB of RAM; segments are
loaded straight into the hidden caches with set_sregs, so no GDT is needed.
With the in-kernel irqchip HLT never exits to userspace, so guests end in a
``jmp $`` loop and each test stops reading exits once it has what it needs.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from pyvmm import accel
from pyvmm.accel import kvm
from pyvmm.accel.core import EmulationFailure, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, Shutdown
from pyvmm.accel.x86 import CpuidEntry, DescriptorTable, FpuState, Regs, Segment
from pyvmm.errors import AccelError
from pyvmm.ffi import kvm as k
from pyvmm.vmm.memory import GuestMemory
from pyvmm.arch.x86 import msrs
from pyvmm.vmm.x86.msrs import boot_msrs

usable, reason, _notes = kvm.probe()
needs_kvm = pytest.mark.skipif(not usable, reason=f"KVM not usable: {reason}")
pytestmark = pytest.mark.kvm

RAM_SIZE = 0x10000
GUEST_CODE = 0x1000
GUEST_DATA = 0x2000
UNMAPPED = 0xD000_0000  # far above RAM: every access is an MMIO exit


# --- a few 32-bit instructions, hand-assembled -------------------------------
def mov_edx(value: int) -> bytes:
    return b"\xBA" + struct.pack("<I", value)


def mov_eax(value: int) -> bytes:
    return b"\xB8" + struct.pack("<I", value)


def mov_esi(value: int) -> bytes:
    return b"\xBE" + struct.pack("<I", value)


def mov_ecx(value: int) -> bytes:
    return b"\xB9" + struct.pack("<I", value)


def mov_al(value: int) -> bytes:
    return b"\xB0" + bytes([value])


def load_eax_from(addr: int) -> bytes:  # mov eax, [addr]
    return b"\xA1" + struct.pack("<I", addr)


def store_eax_to(addr: int) -> bytes:  # mov [addr], eax
    return b"\xA3" + struct.pack("<I", addr)


OUT_DX_AL = b"\xEE"
OUT_DX_EAX = b"\xEF"
IN_AL_DX = b"\xEC"
REP_OUTSB = b"\xF3\x6E"
UD2 = b"\x0F\x0B"
JMP_SELF = b"\xEB\xFE"
JMP_BACK_3 = b"\xEB\xFD"  # jmp to the 1-byte instruction just before this 2-byte jmp


class Guest:
    def __init__(self, code: bytes, data: bytes = b"", **vm_options):
        kvm.install_kick_handler()
        self.vm = kvm.KvmVm(**vm_options)
        self.memory = GuestMemory.anonymous([(0, RAM_SIZE)])
        self.vm.map_memory(0, 0, self.memory.regions[0].buffer)
        self.memory.write(GUEST_CODE, code)
        self.memory.write(GUEST_DATA, data)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        flat_code = Segment(base=0, limit=0xFFFFFFFF, selector=0x8, type=11, db=True, g=True)
        flat_data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, db=True, g=True)
        sregs.cs = flat_code
        sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = flat_data
        sregs.idt = DescriptorTable(base=0, limit=0)  # any exception escalates to a triple fault
        sregs.cr0 = 0x11  # PE | ET
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(Regs(rip=GUEST_CODE, rsp=0x8000, rflags=0x2))

    def close(self):
        self.vm.close()
        self.memory.close()


@pytest.fixture
def make_guest():
    if not usable:
        pytest.skip(f"KVM not usable: {reason}")
    guests = []

    def make(code: bytes, data: bytes = b"", **vm_options) -> Guest:
        guest = Guest(code, data, **vm_options)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()


@needs_kvm
def test_probe_reports_usable_with_notes():
    ok, why, notes = kvm.probe()
    assert ok and why.startswith("/dev/kvm, KVM API 12, all required capabilities, up to ")
    assert why.endswith(" vCPUs")
    assert any("PVM host" in note for note in notes) == kvm.is_pvm_host()


def test_probe_missing_device(tmp_path):
    ok, why, _ = kvm.probe(str(tmp_path / "kvm"))
    assert not ok and "does not exist" in why


def test_probe_not_a_kvm_device():
    ok, why, _ = kvm.probe("/dev/null")
    assert not ok and "not a KVM device" in why


@needs_kvm
def test_probe_names_each_missing_capability(monkeypatch):
    real = kvm._check_extension
    absent = {k.KVM_CAP_IRQCHIP, k.KVM_CAP_IMMEDIATE_EXIT}
    monkeypatch.setattr(kvm, "_check_extension", lambda fd, cap: 0 if cap in absent else real(fd, cap))
    ok, why, _ = kvm.probe()
    assert not ok
    assert "KVM_CAP_IRQCHIP" in why and "KVM_CAP_IMMEDIATE_EXIT" in why and "KVM_CAP_PIT2" not in why


def test_probe_notes_a_pvm_host(monkeypatch, tmp_path):
    monkeypatch.setattr(kvm, "_PVM_MODULE", str(tmp_path))
    _, _, notes = kvm.probe(str(tmp_path / "kvm"))
    assert any("PVM" in note and "emulated" in note for note in notes)
    monkeypatch.setattr(kvm, "_PVM_MODULE", str(tmp_path / "absent"))
    _, _, notes = kvm.probe(str(tmp_path / "kvm"))
    assert not any("PVM" in note for note in notes)


def test_request_stop_without_kick_handler_only_sets_immediate_exit(make_guest, monkeypatch):
    guest = make_guest(JMP_SELF)
    sent = []
    monkeypatch.setattr(kvm, "kick_handler_installed", lambda: False)
    monkeypatch.setattr(kvm.signal, "pthread_kill", lambda *args: sent.append(args))
    guest.vcpu._in_kvm_run, guest.vcpu.thread_id = True, 12345  # as if another thread were in KVM_RUN
    guest.vcpu.request_stop()
    guest.vcpu._in_kvm_run = False
    assert sent == []  # the signal's default action would kill the process
    assert guest.vcpu.kvm_run.immediate_exit == 1
    assert isinstance(guest.vcpu.run(), Interrupted)


def test_request_stop_reaches_a_vcpu_in_a_worker_thread(make_guest):
    guest = make_guest(JMP_SELF)
    results = []
    worker = threading.Thread(target=lambda: results.append(guest.vcpu.run()))
    worker.start()
    deadline = time.monotonic() + 5
    while not guest.vcpu._in_kvm_run and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    guest.vcpu.request_stop()
    worker.join(5)
    assert not worker.is_alive()
    assert results == [Interrupted()]


def test_out_al_and_out_eax(make_guest):
    guest = make_guest(mov_edx(0x3F8) + mov_al(0x41) + OUT_DX_AL + mov_eax(0x12345678) + OUT_DX_EAX + JMP_SELF)
    first = guest.vcpu.run()
    assert isinstance(first, IoOut) and first.port == 0x3F8 and bytes(first.data) == b"A"
    second = guest.vcpu.run()
    assert isinstance(second, IoOut) and second.port == 0x3F8
    assert bytes(second.data) == struct.pack("<I", 0x12345678)


def test_in_al_value_reaches_the_guest(make_guest):
    # in al, dx from 0x510, then echo al to port 0x511 (ports no in-kernel device claims)
    guest = make_guest(mov_edx(0x510) + IN_AL_DX + mov_edx(0x511) + OUT_DX_AL + JMP_SELF)
    exit_in = guest.vcpu.run()
    assert isinstance(exit_in, IoIn) and exit_in.port == 0x510 and len(exit_in.data) == 1
    exit_in.data[0] = 0xA5
    echo = guest.vcpu.run()
    assert isinstance(echo, IoOut) and echo.port == 0x511 and bytes(echo.data) == b"\xA5"


def test_rep_outsb_returns_each_access(make_guest):
    guest = make_guest(mov_edx(0x512) + mov_esi(GUEST_DATA) + mov_ecx(3) + REP_OUTSB + mov_al(0x7) + OUT_DX_AL
                       + JMP_SELF, data=b"xyz")
    # an exit's data is valid until the next run(): copy it at once, as the run loop does
    exits = [(type(e), e.port, bytes(e.data)) for e in (guest.vcpu.run() for _ in range(4))]
    assert exits == [
        (IoOut, 0x512, b"x"), (IoOut, 0x512, b"y"), (IoOut, 0x512, b"z"), (IoOut, 0x512, b"\x07")]
    assert guest.vcpu.get_regs().rcx == 0


def test_rep_insb_fills_each_access_before_reentry(make_guest):
    mov_edi = b"\xBF" + struct.pack("<I", GUEST_DATA + 0x10)
    guest = make_guest(mov_edx(0x518) + mov_edi + mov_ecx(3) + b"\xF3\x6C" + OUT_DX_AL + JMP_SELF)  # rep insb
    for value in b"abc":
        access = guest.vcpu.run()
        assert isinstance(access, IoIn) and access.port == 0x518 and len(access.data) == 1
        access.data[0] = value
    marker = guest.vcpu.run()
    assert isinstance(marker, IoOut) and marker.port == 0x518
    assert guest.memory.read(GUEST_DATA + 0x10, 3) == b"abc"


def test_mmio_read_and_write_round_trip(make_guest):
    guest = make_guest(load_eax_from(UNMAPPED) + store_eax_to(UNMAPPED + 8) + JMP_SELF)
    read = guest.vcpu.run()
    assert isinstance(read, MmioRead) and read.addr == UNMAPPED and len(read.data) == 4
    read.data[:] = struct.pack("<I", 0xCAFEBABE)
    write = guest.vcpu.run()
    assert isinstance(write, MmioWrite) and write.addr == UNMAPPED + 8
    assert bytes(write.data) == struct.pack("<I", 0xCAFEBABE)
    assert guest.vcpu.get_regs().rax == 0xCAFEBABE


def test_request_stop_from_another_thread_interrupts_a_spinning_guest(make_guest):
    guest = make_guest(JMP_SELF)
    timer = threading.Timer(0.1, guest.vcpu.request_stop)
    start = time.monotonic()
    timer.start()
    result = guest.vcpu.run()
    elapsed = time.monotonic() - start
    timer.join()
    assert isinstance(result, Interrupted)
    assert 0.05 < elapsed < 5
    assert guest.vcpu.get_regs().rip == GUEST_CODE
    # immediate_exit was reset: a second stop request is needed to interrupt again
    assert guest.vcpu.kvm_run.immediate_exit == 0


def test_request_stop_before_run_makes_the_next_run_return_at_once(make_guest):
    guest = make_guest(JMP_SELF)
    guest.vcpu.request_stop()
    assert isinstance(guest.vcpu.run(), Interrupted)


def test_triple_fault_is_a_shutdown(make_guest):
    guest = make_guest(UD2)  # #UD with an empty IDT -> #GP -> #DF -> triple fault
    assert guest.vcpu.run() == Shutdown("triple fault")


def test_register_and_state_round_trips(make_guest):
    guest = make_guest(JMP_SELF)
    vcpu = guest.vcpu
    regs = vcpu.get_regs()
    regs.rbx, regs.r15 = 0x1122334455667788, 0xFFFF_0000_FFFF_0000
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs

    sregs = vcpu.get_sregs()
    assert sregs.cs.selector == 0x8 and sregs.cs.db and sregs.cs.limit == 0xFFFFFFFF
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs

    fpu = FpuState(fcw=0x27F, mxcsr=0x1F80, xmm=[bytes([i]) * 16 for i in range(16)])
    vcpu.set_fpu(fpu)
    got = vcpu.get_fpu()
    assert got.fcw == 0x27F and got.xmm == fpu.xmm

    vcpu.set_msrs({msrs.MSR_KERNEL_GS_BASE: 0x1234000, msrs.MSR_IA32_SYSENTER_CS: 0x10})
    assert vcpu.get_msrs([msrs.MSR_KERNEL_GS_BASE, msrs.MSR_IA32_SYSENTER_CS]) == {
        msrs.MSR_KERNEL_GS_BASE: 0x1234000, msrs.MSR_IA32_SYSENTER_CS: 0x10}
    vcpu.set_msrs(boot_msrs())

    lapic = vcpu.get_lapic()
    assert len(lapic) == 1024
    vcpu.set_lapic(lapic)
    events = vcpu.get_vcpu_events()
    assert events["exception"]["injected"] == 0
    vcpu.set_vcpu_events(events)
    xsave = vcpu.get_xsave()
    vcpu.set_xsave(xsave)
    xcrs = vcpu.get_xcrs()
    assert xcrs.get(0, 1) & 1  # XCR0.x87 is always set
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_mp_state() == k.KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(k.KVM_MP_STATE_RUNNABLE)


def test_save_and_restore_state_round_trip(make_guest):
    """save_state is tagged by backend and arch and restores into a fresh vCPU exactly."""
    from pyvmm.accel.core import Capability

    guest = make_guest(JMP_SELF)
    assert {Capability.IN_KERNEL_IRQCHIP, Capability.IRQFD, Capability.IOEVENTFD} <= guest.vm.capabilities
    vcpu = guest.vcpu
    regs = vcpu.get_regs()
    regs.rbx, regs.r12 = 0xABCDEF, 0x1234
    vcpu.set_regs(regs)
    vcpu.set_msrs({msrs.MSR_LSTAR: 0xFFFFFFFF81000000, msrs.MSR_IA32_SYSENTER_ESP: 0x9000})
    vcpu.set_fpu(FpuState(fcw=0x27F, xmm=[bytes([i + 1]) * 16 for i in range(16)]))
    state = vcpu.save_state()
    assert (state.backend, state.arch) == ("kvm", "x86_64")
    other = make_guest(JMP_SELF)
    other.vcpu.restore_state(state)
    assert other.vcpu.get_regs() == regs
    assert other.vcpu.get_sregs() == vcpu.get_sregs()
    assert other.vcpu.get_fpu().xmm == [bytes([i + 1]) * 16 for i in range(16)]
    assert other.vcpu.get_msrs([msrs.MSR_LSTAR, msrs.MSR_IA32_SYSENTER_ESP]) == {
        msrs.MSR_LSTAR: 0xFFFFFFFF81000000, msrs.MSR_IA32_SYSENTER_ESP: 0x9000}
    assert other.vcpu.get_events() == vcpu.get_events()


def test_an_interpreter_state_restores_on_kvm(make_guest):
    """The architectural part of another backend's state maps onto KVM (cross-backend restore)."""
    from pyvmm.accel.interp import InterpVm

    if not accel.probe("interp").usable:
        pytest.skip("interpreter not usable here")
    guest = make_guest(JMP_SELF)
    interp = InterpVm(1)
    try:
        source = interp.create_vcpu(0)
        source.set_sregs(guest.vcpu.get_sregs())
        source.set_regs(Regs(rip=GUEST_CODE, rsp=0x7000, rax=42, rflags=0x2))
        source.set_msrs({msrs.MSR_STAR: 0x0023001000000000})
        state = source.save_state()
    finally:
        interp.close()
    assert state.backend == "interp"
    guest.vcpu.restore_state(state)
    assert guest.vcpu.get_regs() == Regs(rip=GUEST_CODE, rsp=0x7000, rax=42, rflags=0x2)
    assert guest.vcpu.get_msrs([msrs.MSR_STAR]) == {msrs.MSR_STAR: 0x0023001000000000}


def test_unreadable_msr_is_named(make_guest):
    guest = make_guest(JMP_SELF)
    with pytest.raises(AccelError, match="0xdead0000"):
        guest.vcpu.get_msrs([0xDEAD0000])


def test_supported_cpuid_and_set_cpuid(make_guest):
    guest = make_guest(JMP_SELF)
    supported = guest.vm.supported_cpuid()
    leaves = {e.function for e in supported}
    assert 0 in leaves and 1 in leaves and 0x80000000 in leaves
    assert all(isinstance(e, CpuidEntry) for e in supported)
    guest.vcpu.set_cpuid(supported)


def test_irq_line_irqfd_and_ioeventfd(make_guest):
    import os

    guest = make_guest(JMP_SELF)
    guest.vm.set_irq_line(4, True)
    guest.vm.set_irq_line(4, False)
    irq_event = os.eventfd(0)
    io_event = os.eventfd(0)
    try:
        guest.vm.irqfd(5, irq_event)
        guest.vm.ioeventfd(UNMAPPED, 4, io_event)
        guest.vm.ioeventfd(0x514, 2, io_event, datamatch=7, pio=True)
    finally:
        guest.vm.irqfd(5, irq_event, deassign=True)
        guest.vm.ioeventfd(UNMAPPED, 4, io_event, deassign=True)
        os.close(irq_event)
        os.close(io_event)


def test_level_irqfd_with_resample_for_virtio_lines(make_guest, tmp_path):
    """virtio GSIs are level-triggered: the builder registers their irqfds with a resample fd."""
    import os

    from pyvmm.vmm import layout
    from pyvmm.vmm.events import EventLoop
    from pyvmm.vmm.irqfd import IrqfdLine

    guest = make_guest(JMP_SELF)
    events = EventLoop("test-irqfd")
    events.start()
    try:
        gsi = layout.virtio_irqs()[0]
        line = IrqfdLine(gsi, guest.vm, events)
        line.set_level(True)
        line.set_level(False)
        line.close()
        line.close()  # idempotent
        # after close the same GSI can be registered again (the deassign reached KVM)
        again = IrqfdLine(gsi, guest.vm, events)
        again.close()
        trigger = os.eventfd(0)
        with pytest.raises(Exception, match="KVM_IRQFD"):  # KVM refuses a second irqfd on the same eventfd
            guest.vm.irqfd(gsi, trigger)
            guest.vm.irqfd(gsi + 1, trigger)
        guest.vm.irqfd(gsi, trigger, deassign=True)
        os.close(trigger)
    finally:
        events.close()


def test_ioeventfd_consumes_the_write_without_an_exit(make_guest):
    import os

    guest = make_guest(mov_eax(0x55) + store_eax_to(UNMAPPED) + mov_edx(0x513) + OUT_DX_AL + JMP_SELF)
    event = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        guest.vm.ioeventfd(UNMAPPED, 4, event)
        exit_ = guest.vcpu.run()
        assert isinstance(exit_, IoOut) and exit_.port == 0x513
        assert os.eventfd_read(event) == 1
    finally:
        os.close(event)


def test_bad_memory_slot_is_rejected(make_guest):
    guest = make_guest(JMP_SELF)
    with pytest.raises(AccelError, match="not page-aligned"):
        guest.vm.map_memory(1, 0x100123, bytearray(4096))


def test_port_io_round_trip_cost(make_guest):
    """The Python overhead per port-I/O exit (reported, loosely bounded)."""
    guest = make_guest(mov_edx(0x512) + OUT_DX_AL + JMP_BACK_3)
    run = guest.vcpu.run
    for _ in range(100):
        run()
    count = 2000
    start = time.perf_counter()
    for _ in range(count):
        run()
    per_exit = (time.perf_counter() - start) / count
    print(f"\nport-I/O exit round trip through KvmVcpu.run(): {per_exit * 1e6:.1f} us")
    assert per_exit < 200e-6


def test_guest_sees_the_filtered_cpuid(make_guest):
    from pyvmm.vmm.x86.cpuid import build_cpuid

    # mov eax, 1; cpuid; mov eax, ebx; out 0x515, eax; mov eax, 1; cpuid; mov eax, ecx; out 0x516, eax
    leaf1_to = lambda reg_to_eax, port: (mov_eax(1) + b"\x0F\xA2" + reg_to_eax + mov_edx(port) + OUT_DX_EAX)
    guest = make_guest(leaf1_to(b"\x89\xD8", 0x515) + leaf1_to(b"\x89\xC8", 0x516) + JMP_SELF)
    table = build_cpuid(guest.vm.supported_cpuid(), 0, 2, hypervisor_signature="KVMKVMKVM")
    guest.vcpu.set_cpuid(table)
    ebx = int.from_bytes(guest.vcpu.run().data, "little")
    ecx = int.from_bytes(guest.vcpu.run().data, "little")
    assert ebx >> 24 == 0 and (ebx >> 16) & 0xFF == 2
    assert ecx & (1 << 31)  # hypervisor bit
    assert not ecx & (1 << 3)  # no MONITOR


POPCNT_EAX_EBX = b"\xF3\x0F\xB8\xC3"  # an instruction KVM's emulator does not implement


@pytest.mark.skipif(not kvm.is_pvm_host(), reason="needs a PVM host, where guest CPL0 code goes through KVM's emulator")
def test_emulation_failure_carries_rip_and_instruction_bytes(make_guest):
    guest = make_guest(POPCNT_EAX_EBX + JMP_SELF)
    if not guest.vm.emulation_failure_exits:
        pytest.skip("KVM_CAP_EXIT_ON_EMULATION_FAILURE is not available")
    failure = guest.vcpu.run()
    assert isinstance(failure, EmulationFailure)
    assert failure.rip == GUEST_CODE
    assert failure.insn.startswith(POPCNT_EAX_EBX)


@pytest.mark.skipif(not kvm.is_pvm_host(), reason="needs a PVM host, where guest CPL0 code goes through KVM's emulator")
def test_emulation_failure_without_the_capability(make_guest):
    guest = make_guest(POPCNT_EAX_EBX + JMP_SELF, emulation_failure_exits=False)
    assert guest.vm.emulation_failure_exits is False
    failure = guest.vcpu.run()
    # CPL0 failures still exit; whether the bytes come along depends on the kernel version
    assert isinstance(failure, EmulationFailure) and failure.rip == GUEST_CODE
    assert failure.insn == b"" or failure.insn.startswith(POPCNT_EAX_EBX)


def test_long_mode_guest(make_guest):
    """64-bit entry as the Linux boot path uses it: identity-mapped 2 MiB page, EFER.LME|LMA, CS.L."""
    mov_rax = b"\x48\xB8" + struct.pack("<Q", 0x1122334455667788)
    guest = make_guest(mov_rax + mov_edx(0x517) + OUT_DX_EAX + JMP_SELF)
    memory = guest.memory
    memory.write_int(0x9000, 8, 0xA000 | 0x3)  # PML4[0] -> PDPT
    memory.write_int(0xA000, 8, 0xB000 | 0x3)  # PDPT[0] -> PD
    memory.write_int(0xB000, 8, 0x0 | 0x83)  # PD[0]: 2 MiB page at 0, present, writable
    sregs = guest.vcpu.get_sregs()
    sregs.cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x8, type=11, l=True, g=True)
    sregs.cr3, sregs.cr4 = 0x9000, 0x20  # PAE
    sregs.cr0 = 0x80000011  # PG | ET | PE
    sregs.efer = msrs.EFER_LME | msrs.EFER_LMA
    guest.vcpu.set_sregs(sregs)
    out = guest.vcpu.run()
    assert isinstance(out, IoOut) and out.port == 0x517 and bytes(out.data) == struct.pack("<I", 0x55667788)
    assert guest.vcpu.get_regs().rax == 0x1122334455667788
    assert guest.vcpu.get_sregs().efer & msrs.EFER_LMA


@needs_kvm
def test_create_vm_installs_the_kick_handler_and_checks_the_vcpu_count():
    vm = kvm.create_vm(1)
    try:
        assert kvm.kick_handler_installed()
        assert vm.name == "kvm" and vm.max_vcpus >= 1
    finally:
        vm.close()
    with pytest.raises(AccelError, match="vCPUs requested"):
        kvm.create_vm(vm.max_vcpus + 1)


def test_virtio_devices_on_kvm_get_irqfd_lines_and_release_them(tmp_path):
    """The builder wires virtio interrupts through irqfds on KVM; closing the VM frees every fd."""
    import os

    from conftest import GUESTS
    from pyvmm.api import VM
    from pyvmm.vmm.irqfd import IrqfdLine

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    fds_before = len(os.listdir("/proc/self/fd"))
    vm = VM.from_dict(
        {
            "machine": {"memory_mib": 64, "accel": "kvm"},
            "boot": {"kernel": str(GUESTS / "hello.elf")},
            "drive": [{"path": str(image)}],
            "rng": {"enabled": True},
        }
    )
    with vm:
        lines = [transport.irq for transport in vm.machine.virtio]
        assert len(lines) == 2 and all(isinstance(line, IrqfdLine) for line in lines)
        assert vm.run(timeout=30).ok
    assert len(os.listdir("/proc/self/fd")) == fds_before


@needs_kvm
def test_guest_ram_is_registered_beside_the_set_up_and_its_failure_is_the_builds(monkeypatch):
    """KVM's slot registration (CONCURRENT_MAP) runs on its own thread during the build; the machine
    is returned only once it is done, and its error is the build's, with nothing left open."""
    import threading

    from pyvmm.accel.core import Capability
    from pyvmm.config import config_from_dict
    from pyvmm.vmm.builder import build_machine
    from conftest import GUESTS

    config = config_from_dict({"machine": {"memory_mib": 32, "accel": "kvm"}, "boot": {"kernel": str(GUESTS / "hello.elf")}})
    original, threads = kvm.KvmVm.map_memory, []

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(0.2)  # a slow registration: the build must still wait for it
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kvm.KvmVm, "map_memory", recording)
    machine = build_machine(config, console_output=lambda data: None)
    try:
        assert Capability.CONCURRENT_MAP in machine.vm.capabilities
        assert threads and set(threads) == {"map-memory"}
        assert len(machine.vm._slots) == len(machine.memory.regions)  # every slot in place at return
    finally:
        machine.close()

    def failing(self, slot, *args, **kwargs):
        raise AccelError("kvm", f"memory slot {slot}: refused by the test")

    monkeypatch.setattr(kvm.KvmVm, "map_memory", failing)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(AccelError, match="refused by the test"):
        build_machine(config, console_output=lambda data: None)
    assert len(os.listdir("/proc/self/fd")) == before
