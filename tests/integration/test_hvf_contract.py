"""The Hypervisor.framework backend against the fake of Apple's VMX API (tests/fakes/hvf.py).

The test guests run on it through `pyvmm boot` in test_guests.py (the `hvf` column of
the `backend` fixture), the behaviours it shares with WHPX in test_hypervisor_fakes.py;
here are the documented behaviours of Hypervisor.framework alone: the owning-thread
rule, exits the fake's software CPU cannot make (scripted with the VMCS fields the
SDM gives them), and what `pyvmm check` says for each way the framework refuses.
"""

from __future__ import annotations

import pytest

from conftest import GUESTS
from fakes import install
from fakes import hvf as fake_hvf
from pyvmm import accel
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


def test_a_vcpu_count_the_framework_cannot_take_is_a_one_line_error_and_frees_the_vm(fake):
    from pyvmm.accel.hvf import HvfVm
    from pyvmm.errors import AccelError

    with pytest.raises(AccelError, match=r"vcpu_count 65 is outside 1\.\.64"):
        HvfVm(65)
    HvfVm(1).close()  # the refused VM was destroyed: one VM per process, and a new one can be made
