"""Guest debugging on the Hypervisor.framework and WHPX backends, each against its fake (tests/fakes).

What each platform documents, and the fakes follow (fakes/hvf.py, fakes/whpx.py, fakes/cpu.py):

* HVF (Intel VMX API): the VMCS exception bitmap (VMCS_CTRL_EXC_BITMAP, bit 1 #DB, bit 3 #BP;
  Intel SDM vol. 3C 24.6.3) turns those exceptions into exits of basic reason 0 "exception or
  NMI" with the VM-exit interruption information; for #DB the exit qualification carries DR6's
  B0-B3 and BS bits (SDM 27.2.1, Table 27-1); DR0-DR3 are hv_x86_reg_t registers and DR7 the
  guest-state field VMCS_GUEST_DR7 (Apple's hv_arch_x86.h, hv_arch_vmx.h).
* WHPX: WHV_EXTENDED_VM_EXITS.ExceptionExit with WHvPartitionPropertyCodeExceptionExitBitmap
  (Microsoft, "Virtual Processor Exception": WHvRunVpExitReasonException with
  WHV_VP_EXCEPTION_CONTEXT), debug registers WHvX64RegisterDr0-Dr3/Dr6/Dr7 (as Hyperlight's WHP
  debugger uses them).
* On both, single steps are RFLAGS.TF (a #DB trap after each instruction, SDM vol. 3B 17.3.1.4),
  an instruction breakpoint in DR0-DR3 is a #DB fault before its instruction, skipped once with
  RFLAGS.RF (17.3.1.1), and INT3 is #BP with the exit's RIP on the instruction (SDM 27.1).
"""

from __future__ import annotations

import importlib
import mmap
import struct
import threading

import pytest

from fakes import install
from pyvmm.accel import registry
from pyvmm.accel.core import Capability, Debug, GuestDebug, IoOut
from pyvmm.accel.x86 import Regs, Segment, SpecialRegs

CODE = 0x1000
TF = 1 << 8
INC_RAX, INC_RBX, NOP = b"\x48\xff\xc0", b"\x48\xff\xc3", b"\x90"
OUT_F9 = b"\xe6\xf9"  # out 0xf9, al: the end of each program


@pytest.fixture(params=["hvf", "whpx"])
def platform(request):
    library, undo = install(request.param)
    yield request.param, library
    undo()


def _vm(name: str, code: bytes, *, long_mode: bool):
    """vCPU 0 about to run ``code`` at 0x1000: 64-bit (first 2 MiB identity-mapped) or real mode."""
    vm = importlib.import_module(registry.BY_NAME[name].module).create_vm(1)
    ram = mmap.mmap(-1, 0x10000)
    ram[CODE : CODE + len(code)] = code
    vm.map_memory(0, 0, ram)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(vm.supported_cpuid())
    sregs = SpecialRegs()
    sregs.cs = Segment(base=0, selector=0, type=11)
    if long_mode:
        ram[0x2000:0x2008] = struct.pack("<Q", 0x3000 | 3)  # PML4 -> PDPT
        ram[0x3000:0x3008] = struct.pack("<Q", 0x4000 | 3)  # PDPT -> PD
        ram[0x4000:0x4008] = struct.pack("<Q", 0x83)  # one 2 MiB page at 0
        sregs.cs = Segment(selector=8, type=11, l=True)
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, 0x2000, 0x20, 0x500
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=CODE, rflags=2, rsp=0x8000))
    return vm, ram, vcpu


def _run(vcpu):
    """vcpu.run(), failing (not hanging) when the guest does not come back within 10 s."""
    result = []
    runner = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    runner.start()
    runner.join(10)
    if runner.is_alive():
        vcpu.request_stop()
        runner.join(5)
        pytest.fail(f"no exit within 10 s (then: {result})")
    return result[0]


def test_both_backends_offer_guest_debug_with_exact_instruction_breakpoints(platform):
    vm, _, _ = _vm(platform[0], OUT_F9, long_mode=True)
    try:
        assert {Capability.GUEST_DEBUG, Capability.INSTRUCTION_BREAKPOINTS} <= vm.capabilities
    finally:
        vm.close()


def test_single_steps_advance_one_instruction_per_step_exit(platform):
    """TF with #DB intercepted: each run ends with Debug("step") one instruction further, and the
    debugger's TF never shows in the registers the VMM reads."""
    program = [INC_RAX, INC_RAX, NOP, INC_RBX, INC_RAX]
    vm, _, vcpu = _vm(platform[0], b"".join(program) + OUT_F9, long_mode=True)
    try:
        vcpu.set_guest_debug(GuestDebug(single_step=True))
        rip = CODE
        for n, instruction in enumerate(program, 1):
            exit_value = _run(vcpu)
            assert isinstance(exit_value, Debug) and exit_value.kind == "step", exit_value
            regs = vcpu.get_regs()
            rip += len(instruction)
            assert regs.rip == rip == exit_value.pc, (n, hex(regs.rip))
            assert not regs.rflags & TF, "the debugger's TF is hidden from register reads"
        assert (regs.rax, regs.rbx) == (3, 1)
        vcpu.set_guest_debug(GuestDebug())
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9
    finally:
        vm.close()


def test_a_step_over_an_instruction_the_vmm_completes_ends_there(platform):
    """An OUT exits instead of executing (the VMM completes it): the step ends after it, once."""
    vm, _, vcpu = _vm(platform[0], INC_RAX + b"\xe6\xf8" + INC_RBX + OUT_F9, long_mode=True)
    try:
        vcpu.set_guest_debug(GuestDebug(single_step=True))
        assert _run(vcpu).kind == "step" and vcpu.get_regs().rip == CODE + 3
        out = _run(vcpu)
        assert isinstance(out, IoOut) and out.port == 0xF8
        step = _run(vcpu)
        assert isinstance(step, Debug) and step.kind == "step" and vcpu.get_regs().rip == CODE + 5
        step = _run(vcpu)
        assert isinstance(step, Debug) and step.kind == "step" and vcpu.get_regs().rip == CODE + 8
        assert vcpu.get_regs().rbx == 1
    finally:
        vm.close()


def test_pushf_while_stepping_does_not_push_the_debuggers_tf(platform):
    """The pushed RFLAGS image is the guest's: the debugger's TF is taken out of it after the step."""
    vm, ram, vcpu = _vm(platform[0], b"\x9c" + NOP + OUT_F9, long_mode=True)  # pushfq
    try:
        vcpu.set_guest_debug(GuestDebug(single_step=True))
        assert _run(vcpu).kind == "step"
        regs = vcpu.get_regs()
        assert regs.rsp == 0x8000 - 8
        pushed = struct.unpack_from("<Q", ram, regs.rsp)[0]
        assert pushed & 2 and not pushed & TF, hex(pushed)
    finally:
        vm.close()


def test_a_software_breakpoint_stops_on_its_int3_and_the_guest_goes_on(platform):
    """The debugger's int3 (#BP intercepted) is a Debug("breakpoint") with RIP left on it; once the
    debugger has put the original byte back, the guest continues from there."""
    code = bytearray(INC_RAX + INC_RAX + INC_RBX + OUT_F9)
    at = CODE + 6
    vm, ram, vcpu = _vm(platform[0], bytes(code), long_mode=True)
    try:
        original = ram[at]
        ram[at] = 0xCC
        vcpu.set_guest_debug(GuestDebug(software_breakpoints=frozenset({at})))
        exit_value = _run(vcpu)
        assert exit_value == Debug("breakpoint", at), exit_value
        regs = vcpu.get_regs()
        assert regs.rip == at and regs.rax == 2 and regs.rbx == 0
        ram[at] = original
        vcpu.set_guest_debug(GuestDebug())
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9
        assert vcpu.get_regs().rbx == 1
    finally:
        vm.close()


def test_a_dr0_execute_breakpoint_stops_before_its_instruction_and_is_stepped_over(platform):
    """DR0 = the third instruction, DR7.L0 with R/W 00: a #DB fault before it (RIP on it, DR6.B0);
    resuming with the breakpoint still armed runs it (RF) instead of stopping again, and the next
    pass over the same address stops again."""
    loop = INC_RAX + INC_RAX + INC_RBX + b"\x48\x83\xfb\x02" + b"\x75\xf1" + OUT_F9  # ...; cmp rbx, 2; jne loop
    vm, _, vcpu = _vm(platform[0], loop, long_mode=True)
    at = CODE + 6
    try:
        vcpu.set_guest_debug(GuestDebug(addresses=(at, 0, 0, 0), dr7=0x401))
        for rbx in (0, 1):
            exit_value = _run(vcpu)
            assert isinstance(exit_value, Debug) and exit_value.kind == "debug-register", exit_value
            assert exit_value.pc == at and exit_value.dr6 & 1 and not exit_value.dr6 & 0xE
            regs = vcpu.get_regs()
            assert regs.rip == at and regs.rbx == rbx and regs.rax == 2 * (rbx + 1)
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9 and vcpu.get_regs().rbx == 2
    finally:
        vm.close()


def test_the_guests_own_int3_goes_to_its_idt(platform):
    """A #BP that is not one of the debugger's int3s is the guest's: its handler (real-mode IVT
    vector 3) runs and returns past the int3, while the debugger has an int3 elsewhere."""
    handler = 0x2000
    vm, ram, vcpu = _vm(platform[0], b"\xcc" + OUT_F9, long_mode=False)
    try:
        ram[3 * 4 : 3 * 4 + 4] = struct.pack("<HH", handler, 0)  # IVT[3] = 0000:2000
        ram[handler : handler + 5] = b"\xb3\x42" + b"\xe6\xf8" + b"\xcf"  # mov bl, 0x42; out 0xf8, al; iret
        vcpu.set_guest_debug(GuestDebug(software_breakpoints=frozenset({CODE + 0x100})))
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF8, exit_value
        assert vcpu.get_regs().rbx & 0xFF == 0x42
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9, exit_value
        assert vcpu.get_regs().rip == CODE + 3  # returned past the int3, once
    finally:
        vm.close()


def test_the_guests_own_single_step_trap_goes_to_its_idt(platform):
    """The guest sets TF itself (pushf; or; popf): its #DB handler runs (IVT vector 1) and reads
    DR6.BS, with the debugger attached but not stepping (WHPX intercepts every #DB and gives it back)."""
    handler = 0x2000
    # pushf; pop ax; or ax, 0x100; push ax; popf; nop; out 0xf9
    code = b"\x9c\x58\x0d\x00\x01\x50\x9d" + NOP + OUT_F9
    vm, ram, vcpu = _vm(platform[0], code, long_mode=False)
    try:
        ram[1 * 4 : 1 * 4 + 4] = struct.pack("<HH", handler, 0)  # IVT[1] = 0000:2000
        # the handler clears TF in the pushed FLAGS and reports DR6:
        # mov bp, sp; and word [bp+4], ~0x100; mov eax, dr6; out 0xf8, eax; iret
        ram[handler : handler + 16] = (b"\x89\xe5" + b"\x81\x66\x04\xff\xfe" + b"\x0f\x21\xf0" + b"\x66\xe7\xf8"
                                       + b"\xcf" + NOP * 2)  # fmt: skip
        vcpu.set_guest_debug(GuestDebug(software_breakpoints=frozenset({CODE + 0x100})))
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF8, exit_value
        assert int.from_bytes(exit_value.data, "little") & 1 << 14, "DR6.BS for the guest's handler"
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9, exit_value
    finally:
        vm.close()


def test_interrupts_are_held_off_while_stepping_and_delivered_after(platform):
    """A pending PIC interrupt (IRQ0, vector 0x20, IF = 1) is not injected while the debugger steps
    (as KVM's KVM_GUESTDBG_BLOCKIRQ and QEMU's gdbstub hold them off), so each step is the guest's
    next instruction; once stepping ends it is delivered (its handler writes port 0xf8)."""
    init_pic = (b"\xb0\x11\xe6\x20" b"\xb0\x20\xe6\x21" b"\xb0\x04\xe6\x21" b"\xb0\x01\xe6\x21"  # ICW1-ICW4
                b"\xb0\xfe\xe6\x21")  # OCW1: only IRQ0 unmasked  # fmt: skip
    spin = b"\x46\xeb\xfd"  # inc si; jmp back to it
    vm, ram, vcpu = _vm(platform[0], init_pic + b"\xfb" + spin, long_mode=False)
    handler, loop = 0x2000, CODE + len(init_pic) + 1
    try:
        ram[0x20 * 4 : 0x20 * 4 + 4] = struct.pack("<HH", handler, 0)  # IVT[0x20] = 0000:2000
        ram[handler : handler + 3] = b"\xe6\xf8\xcf"  # out 0xf8, al; iret
        vcpu.set_guest_debug(GuestDebug(single_step=True))
        while vcpu.get_regs().rip != loop:  # the PIC's set-up and sti, a step each
            assert _run(vcpu).kind == "step"
        vm.set_irq_line(0, True)
        for n in range(8):
            exit_value = _run(vcpu)
            assert isinstance(exit_value, Debug) and exit_value.kind == "step", (n, exit_value)
            assert vcpu.get_regs().rip in (loop, loop + 1), hex(vcpu.get_regs().rip)
        assert vcpu.get_regs().rsi & 0xFFFF == 4
        vcpu.set_guest_debug(GuestDebug())
        exit_value = _run(vcpu)
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF8, exit_value
    finally:
        vm.close()
