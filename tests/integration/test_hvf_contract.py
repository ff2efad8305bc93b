"""The Hypervisor.framework backend against the fake of Apple's VMX API (tests/fakes/hvf.py).

The test guests run on it through `pyvmm boot` in test_guests.py (the `hvf` column of
the `backend` fixture); here are the documented behaviours a guest run does not show
by itself: the owning-thread rule, exits the fake's software CPU cannot make (scripted
with the VMCS fields the SDM gives them), cancellation from another thread, and what
`pyvmm check` says for each way the framework refuses.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import GUESTS
from fakes import install
from fakes import hvf as fake_hvf
from pyvmm import accel
from pyvmm.accel.core import Interrupted, IoIn, IoOut
from pyvmm.api import VM


@pytest.fixture
def fake():
    library, undo = install("hvf")
    yield library
    undo()


def _vm(fake, guest="hello.elf", vcpus=1):
    config = {"machine": {"vcpus": vcpus, "memory_mib": 64, "accel": "hvf"},
              "boot": {"kernel": str(GUESTS / guest), "cmdline": "console=ttyS0"}}  # fmt: skip
    return VM.from_dict(config)


def _real_mode_vcpu(code: bytes):
    """A VM with 64 KiB of RAM holding ``code`` at 0x1000 and vCPU 0 in real mode about to run it."""
    import mmap

    from pyvmm.accel.hvf import HvfVm
    from pyvmm.accel.x86 import Regs, Segment, SpecialRegs

    vm = HvfVm(1)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000:0x1000 + len(code)] = code
    vm.map_memory(0, 0, ram)
    vcpu = vm.create_vcpu(0)
    sregs = SpecialRegs()
    sregs.cs = Segment(base=0, selector=0, type=11)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0x1000, rflags=2))
    return vm, vcpu


def test_a_guest_run_keeps_every_vcpu_call_on_its_owning_thread(fake):
    vm = _vm(fake, "smp.elf", vcpus=2)
    try:
        status = vm.run(timeout=60)
    finally:
        vm.close()
    assert status.code == 0, status.reason
    assert fake.thread_violations == []
    assert fake.entry_failures == []


def test_scripted_msr_and_cr_exits_are_handled_as_the_sdm_says(fake):
    from pyvmm.accel.hvf import HvfVm
    from pyvmm.accel.x86 import Regs, SpecialRegs

    vm = HvfVm(1)
    try:
        vcpu = vm.create_vcpu(0)
        vm.irqchip  # noqa: B018 - the VM made its own
        vcpu.set_sregs(SpecialRegs())
        vcpu.set_regs(Regs(rip=0x1000, rcx=0x1A0, rax=0x89, rdx=0x1))
        # WRMSR of MISC_ENABLE (not native): exit 32, instruction length 2 (SDM Table C-1, 27.2.5)
        fake.script_exit(0, {fake_hvf.EXIT_REASON: 32, fake_hvf.EXIT_INSTR_LEN: 2})
        vcpu._owner.call(vcpu._run_once)
        assert vcpu.get_msrs([0x1A0]) == {0x1A0: 0x1_0000_0089}
        assert vcpu.get_regs().rip == 0x1002
        # MOV to CR0 from RAX (access type 0, GPR 0: SDM Table 27-3) setting PG with EFER.LME: long mode
        sregs = vcpu.get_sregs()
        sregs.efer, sregs.cr4, sregs.cr0 = 0x100, 0x20, 0x11
        vcpu.set_sregs(sregs)
        vcpu.set_regs(Regs(rip=0x2000, rax=0x80000011))
        fake.script_exit(0, {fake_hvf.EXIT_REASON: 28, fake_hvf.EXIT_QUALIFICATION: 0x0, fake_hvf.EXIT_INSTR_LEN: 3})
        vcpu._owner.call(vcpu._run_once)
        after = vcpu.get_sregs()
        assert after.cr0 == 0x80000011 and after.efer & 0x400, "EFER.LMA follows CR0.PG with LME"
        entry = vcpu._owner.call(vcpu._rvmcs, fake_hvf.ENTRY_CTLS)
        assert entry & fake_hvf.ENTRY_IA32E, "IA-32e mode guest must equal EFER.LMA (SDM 26.3.1.1)"
        assert vcpu._owner.call(vcpu._rvmcs, fake_hvf.GUEST_CR0) & fake_hvf.CR0_NE
        assert vcpu.get_regs().rip == 0x2003
    finally:
        vm.close()


def test_request_stop_from_another_thread_ends_a_spinning_guest(fake, tmp_path):
    """A guest that never exits (jmp $) stops within a second of request_stop (hv_vcpu_interrupt, repeated
    until the run call has returned, because the fake drops a kick that lands outside hv_vcpu_run)."""
    vm, vcpu = _real_mode_vcpu(b"\xeb\xfe")  # jmp $
    try:
        results = []
        runner = threading.Thread(target=lambda: results.append(vcpu.run()))
        runner.start()
        time.sleep(0.3)
        assert runner.is_alive(), f"the guest should spin, not exit: {results}"
        started = time.monotonic()
        vcpu.request_stop()
        runner.join(5)
        assert not runner.is_alive() and isinstance(results[0], Interrupted)
        assert time.monotonic() - started < 1
    finally:
        vm.close()


@pytest.mark.parametrize("code, words", [
    (fake_hvf.HV_UNSUPPORTED, "HV_UNSUPPORTED"),
    (0xFAE94007, "com.apple.security.hypervisor"),
    (0xFAE94001, "kern.hv_support"),
])  # fmt: skip
def test_check_says_why_the_framework_refuses(fake, monkeypatch, code, words):
    monkeypatch.setattr(fake, "hv_vm_create", lambda flags: code)
    probe = accel.probe("hvf")
    assert not probe.usable and words in probe.reason


def test_check_on_apple_silicon_sends_x86_guests_to_the_interpreter(fake, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    probe = accel.probe("hvf")
    assert not probe.usable and "runs only arm64 guests" in probe.reason and "interp" in probe.reason


def test_an_io_exit_without_the_vmms_handler_is_returned_as_an_exit(fake):
    """OUT to a port outside the irqchip with no serve_io_directly handler: an IoOut exit, RIP past it."""
    vm, vcpu = _real_mode_vcpu(b"\xb0\x41\xe6\xf8")  # mov al, 0x41; out 0xf8, al
    try:
        exit_value = vcpu.run()
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF8 and bytes(exit_value.data) == b"A"
        assert vcpu.get_regs().rip == 0x1004
    finally:
        vm.close()


@pytest.mark.parametrize("trapped", [b"\x0f\xa2", b"\xe6\xf8", b"\xe4\xf8"], ids=["cpuid", "out", "in"])
def test_an_exit_comes_before_the_instructions_after_it(fake, trapped):
    """A VM exit is taken at the instruction (SDM 27.1): the register-only instructions after it run
    once, after the VMM resumed the guest, not also before the exit. Then OUT to 0xf9 ends the test."""
    inc_si = b"\x66\x46"  # inc esi (real mode, operand-size prefix): CPUID leaves ESI alone
    vm, vcpu = _real_mode_vcpu(trapped + inc_si * 3 + b"\xe6\xf9")
    try:
        first = vcpu.run()
        if trapped == b"\xe6\xf8":
            assert isinstance(first, IoOut) and first.port == 0xF8
        if trapped == b"\xe4\xf8":
            first.data[:] = b"\x00"
        after_first = vcpu.get_regs()
        if trapped != b"\x0f\xa2":
            assert after_first.rsi == 0, "nothing after the trapped instruction may run before its exit"
        last = vcpu.run() if trapped != b"\x0f\xa2" else first
        assert isinstance(last, IoOut) and last.port == 0xF9
        assert vcpu.get_regs().rsi & 0xFFFFFFFF == 3
    finally:
        vm.close()


def _long_mode_vcpu(code: bytes):
    """Like ``_real_mode_vcpu``, with vCPU 0 in 64-bit mode (the first 2 MiB identity-mapped)."""
    import struct

    from pyvmm.accel.x86 import Segment

    vm, vcpu = _real_mode_vcpu(code)
    ram = vm.slots[0][1]
    ram[0x2000:0x2008] = struct.pack("<Q", 0x3000 | 3)  # PML4 -> PDPT
    ram[0x3000:0x3008] = struct.pack("<Q", 0x4000 | 3)  # PDPT -> PD
    ram[0x4000:0x4008] = struct.pack("<Q", 0x83)  # one 2 MiB page at 0
    sregs = vcpu.get_sregs()
    sregs.cs = Segment(selector=8, type=11, l=True)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, 0x2000, 0x20, 0x500
    vcpu.set_sregs(sregs)
    return vm, vcpu


@pytest.mark.parametrize("code, size, rax_after", [
    (b"\xed", 4, 0x11223344),  # in eax, dx: a 32-bit destination zero-extends into RAX
    (b"\x66\xed", 2, 0xAAAAAAAA_BBBB3344),  # in ax, dx: the rest of RAX stays
    (b"\xec", 1, 0xAAAAAAAA_BBBBBB44),  # in al, dx
])  # fmt: skip
def test_an_in_exit_is_completed_as_the_instruction_would(fake, code, size, rax_after):
    """The VMM puts the port's value into RAX by the operand size (SDM vol. 2, IN); the fake refuses
    to resume a guest whose RAX differs from what the instruction gives (hv_vcpu_run_until fails)."""
    from pyvmm.accel.x86 import Regs

    vm, vcpu = _long_mode_vcpu(code + b"\xe6\xf9")  # then out 0xf9, al
    try:
        regs = vcpu.get_regs()
        vcpu.set_regs(Regs(**{**regs.__dict__, "rax": 0xAAAAAAAA_BBBBBBBB, "rdx": 0xF8}))
        first = vcpu.run()
        assert isinstance(first, IoIn) and first.port == 0xF8 and len(first.data) == size
        first.data[:] = (0x11223344).to_bytes(4, "little")[:size]
        last = vcpu.run()
        assert fake.violations == []
        assert isinstance(last, IoOut) and last.port == 0xF9
        assert vcpu.get_regs().rax == rax_after
    finally:
        vm.close()


def test_a_vcpu_count_the_framework_cannot_take_is_a_one_line_error_and_frees_the_vm(fake):
    from pyvmm.accel.hvf import HvfVm
    from pyvmm.errors import AccelError

    with pytest.raises(AccelError, match=r"vcpu_count 65 is outside 1\.\.64"):
        HvfVm(65)
    HvfVm(1).close()  # the refused VM was destroyed: one VM per process, and a new one can be made
