"""The WHPX backend against the fake of WinHvPlatform and WinHvEmulation (tests/fakes/whpx.py).

The test guests run on it through `pyvmm boot` in test_guests.py (the `whpx` column of
the `backend` fixture), the behaviours it shares with Hypervisor.framework in
test_hypervisor_fakes.py; here are the documented behaviours of WHPX alone: the
partition's set-up, MSR exits (scripted: the fake's software CPU executes RDMSR/WRMSR
itself), injection through WHvRegisterPendingInterruption and its InterruptionPending
flag, the interrupt-window notification, errors raised inside WinHvEmulation's
callbacks, state round trips through the register names, and what `pyvmm check` says
for each way the platform refuses.
"""

from __future__ import annotations

import pytest

from fakes import install
from fakes import whpx as fake_whpx
from pyvmm import accel
from pyvmm.accel.core import Interrupted, IoOut, MmioWrite
from pyvmm.accel.x86 import Regs
from pyvmm.errors import AccelError, GuestError
from test_hypervisor_fakes import _long_mode_vcpu, _real_mode_vcpu


@pytest.fixture
def fake():
    library, undo = install("whpx")
    yield library
    undo()


def test_the_partition_is_set_up_as_the_documentation_orders(fake):
    """ProcessorCount, ExtendedVmExits (CPUID, MSR and exception exits), ExceptionExitBitmap with #DB
    and #BP (guest debugging), CpuidExitList with every leaf of the VM's table, no hypervisor APIC,
    then WHvSetupPartition (the fake refuses those properties after it)."""
    from pyvmm.accel.whpx import WhpxVm

    vm = WhpxVm(2)
    try:
        (partition,) = fake.partitions.values()
        assert partition.set_up and partition.processor_count == 2
        assert partition.extended_exits == fake_whpx.X64_CPUID_EXIT | fake_whpx.X64_MSR_EXIT | fake_whpx.EXCEPTION_EXIT
        assert partition.exception_bitmap == 1 << 1 | 1 << 3
        assert partition.cpuid_exit_list == {entry.function for entry in vm.supported_cpuid()}
        assert partition.lapic_mode == 0
    finally:
        vm.close()
    assert fake.partitions == {}, "close() deletes the partition"


def test_scripted_msr_exits_are_completed_with_the_instruction_length(fake):
    """WRMSR then RDMSR of MISC_ENABLE (not a named register: it exits), as the exit context gives them:
    MsrNumber, IsWrite, RAX/RDX; RIP moves by VpContext.InstructionLength (QEMU whpx_vcpu_run)."""
    vm, vcpu = _real_mode_vcpu("whpx", b"\x0f\x30\x0f\x32")
    try:
        fake.script_exit(0, fake_whpx.EXIT_MSR, "MsrAccess", length=2, AccessInfo=1, MsrNumber=0x1A0, Rax=0x89, Rdx=1)
        assert vcpu._run_once() is None
        assert vcpu.get_msrs([0x1A0]) == {0x1A0: 0x1_0000_0089}
        assert vcpu.get_regs().rip == 0x1002
        fake.script_exit(0, fake_whpx.EXIT_MSR, "MsrAccess", length=2, AccessInfo=0, MsrNumber=0x1A0)
        assert vcpu._run_once() is None
        regs = vcpu.get_regs()
        assert (regs.rax, regs.rdx, regs.rip) == (0x89, 1, 0x1004)
    finally:
        vm.close()


# real mode: the IVT entry of vector 0x30 points at 0x0000:0x1100, whose handler does out 0xfa, al
_HANDLER = b"\xe6\xfa\xcf"  # out 0xfa, al; iret


def _with_handler(vm):
    ram = vm.slots[0][1]
    ram[0x30 * 4 : 0x30 * 4 + 4] = (0x1100).to_bytes(2, "little") + b"\0\0"
    ram[0x1100:0x1103] = _HANDLER


def test_an_injected_interrupt_waits_until_it_is_deliverable_and_says_so_in_the_exit_context(fake):
    """WHvRegisterPendingInterruption written while RFLAGS.IF = 0: the next exit (out 0xf8) has
    ExecutionState.InterruptionPending set and no window is open; after sti (and its shadow) the
    guest takes the interrupt: its handler's out 0xfa comes before the jmp $ could spin."""
    vm, vcpu = _real_mode_vcpu("whpx", b"\xe6\xf8\xfb\x90\xeb\xfe")  # out 0xf8; sti; nop; jmp $
    _with_handler(vm)
    try:
        vcpu._inject(0x30)
        first = vcpu.run()
        assert isinstance(first, IoOut) and first.port == 0xF8
        assert vcpu._exit.VpContext.ExecutionState & fake_whpx.EXECUTION_INTERRUPTION_PENDING
        assert not vcpu._window_open()
        second = vcpu.run()
        assert isinstance(second, IoOut) and second.port == 0xFA, second
        assert vcpu.get_regs().rip == 0x1102
    finally:
        vm.close()


def test_the_interrupt_window_notification_exits_once_and_is_consumed(fake):
    """InterruptNotification asked with IF = 0: the X64InterruptWindow exit comes after sti's shadow
    (at the jmp), and the request is gone afterwards (QEMU re-arms it after each window exit)."""
    vm, vcpu = _real_mode_vcpu("whpx", b"\xfb\x90\xeb\xfe")  # sti; nop; jmp $
    try:
        vcpu._request_window(True)
        assert vcpu._run_once() is None
        assert vcpu._exit.ExitReason == fake_whpx.EXIT_WINDOW
        assert vcpu.get_regs().rip == 0x1002
        assert not vcpu._window_requested
        (partition,) = fake.partitions.values()
        assert not partition.vps[0].kept[fake_whpx.DELIVERABILITY]
    finally:
        vm.close()


def test_an_error_raised_in_an_emulator_callback_reaches_the_caller(fake):
    """A device that raises during an MMIO access made by WinHvEmulation: the vCPU's run raises that
    error (the callback returned E_FAIL to the emulator meanwhile), nothing is swallowed."""
    vm, vcpu = _real_mode_vcpu("whpx", b"\xb8\x00\x20\x8e\xd8\xa3\x10\x00")  # mov ds, 0x2000; mov [0x10], ax

    def handler(access):
        assert isinstance(access, MmioWrite)
        raise GuestError("device refused the write", rip=0x1005)

    vcpu.serve_io_directly(handler)
    try:
        with pytest.raises(GuestError, match="device refused the write"):
            vcpu.run()
        assert fake.emulation_failures, "the fake's emulator saw its callback fail"
    finally:
        vm.close()


def test_state_round_trips_through_the_register_names(fake):
    """save_state on one partition, restore_state on another: every register group (GPRs, segments,
    tables, CRs, EFER, FPU/XMM, XCR0, MSRs kept as registers and as exits) comes back the same."""
    vm, vcpu = _long_mode_vcpu("whpx", b"\xeb\xfe")
    other, target = _real_mode_vcpu("whpx", b"\xeb\xfe")
    try:
        vcpu.set_regs(Regs(**{**vcpu.get_regs().__dict__, "rax": 0x1122334455667788, "r15": 7, "rflags": 0x202}))
        fpu = vcpu.get_fpu()
        fpu.xmm[3], fpu.fcw, fpu.mxcsr = bytes(range(16)), 0x27F, 0x1FA0
        vcpu.set_fpu(fpu)
        vcpu.set_msrs({0xC0000082: 0xFFFFFFFF81000000, 0x1A0: 0x89, 0xC0000100: 0x7000})
        state = vcpu.save_state()
        target.restore_state(state)
        again = target.save_state()
        assert again.cpu == state.cpu
        assert again.cpu.msrs[0xC0000082] == 0xFFFFFFFF81000000 and again.cpu.fpu.xmm[3] == bytes(range(16))
        assert target.get_msrs([0x1A0, 0xC0000100]) == {0x1A0: 0x89, 0xC0000100: 0x7000}
    finally:
        vm.close()
        other.close()


def test_vcpu_counts_and_indices_outside_the_partition_are_one_line_errors(fake):
    from pyvmm.accel.whpx import WhpxVm

    with pytest.raises(AccelError, match=r"vcpu_count 300 is outside 1\.\.254"):
        WhpxVm(300)
    vm = WhpxVm(1)
    try:
        with pytest.raises(AccelError, match=r"vCPU index 1 is outside 0\.\.0"):
            vm.create_vcpu(1)
    finally:
        vm.close()


def test_a_spinning_guest_is_cancelled_not_lost(fake):
    """The Canceled exit of a kick returns no exit to the VMM by itself: run() goes on until a stop."""
    vm, vcpu = _real_mode_vcpu("whpx", b"\xeb\xfe")
    try:
        vcpu.request_stop()
        assert isinstance(vcpu.run(), Interrupted)
    finally:
        vm.close()


@pytest.mark.parametrize("setting, words", [
    ("absent", ["no hypervisor present", "HypervisorPlatform", "nested virtualization"]),
    ("unsupported", ["WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG", "nested virtualization"]),
    ("no-dll", ["cannot load WinHvPlatform.dll", "Windows 10 1803"]),
])  # fmt: skip
def test_check_says_why_the_platform_refuses(fake, monkeypatch, setting, words):
    from pyvmm.ffi import whpx as ffi_whpx

    if setting == "absent":
        fake.hypervisor_present = False
    elif setting == "unsupported":
        fake.setup_result = fake_whpx.WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG
    else:
        def missing():
            raise OSError("cannot load library 'WinHvPlatform.dll': error 0x7e")

        monkeypatch.setattr(ffi_whpx, "load", missing)
    probe = accel.probe("whpx")
    assert not probe.usable
    for word in words:
        assert word in probe.reason
    assert "\n" not in probe.reason


def test_check_says_the_fake_platform_is_usable(fake):
    probe = accel.probe("whpx")
    assert probe.usable, probe.reason
    assert any("never run on Windows" in note for note in probe.notes)
