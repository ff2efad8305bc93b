"""What the Hypervisor.framework and WHPX backends share, each against its fake (tests/fakes).

The same small real-mode or long-mode programs run on both: cancellation from another
thread, exits taken at their instruction, IN completed by operand size, string I/O and
MMIO executed for the VMM (HVF: the interpreter's stepper; WHPX: WinHvEmulation) and
CPUID answered from the VM's table. Each fake refuses (its run call fails, and
``fake.violations`` says why) a VMM that completes an exit unlike the instruction.
"""

from __future__ import annotations

import importlib
import mmap
import struct
import threading
import time

import pytest

from fakes import install
from pyvmm.accel import registry
from pyvmm.accel.core import Interrupted, IoIn, IoOut, MmioRead, MmioWrite
from pyvmm.accel.x86 import Regs, Segment, SpecialRegs


@pytest.fixture(params=["hvf", "whpx"])
def platform(request):
    """(backend name, the fake library) with the backend routed to its fake."""
    library, undo = install(request.param)
    yield request.param, library
    undo()


def _real_mode_vcpu(name: str, code: bytes):
    """A VM with 64 KiB of RAM holding ``code`` at 0x1000 and vCPU 0 in real mode about to run it."""
    vm = importlib.import_module(registry.BY_NAME[name].module).create_vm(1)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000 : 0x1000 + len(code)] = code
    vm.map_memory(0, 0, ram)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(vm.supported_cpuid())
    sregs = SpecialRegs()
    sregs.cs = Segment(base=0, selector=0, type=11)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0x1000, rflags=2))
    return vm, vcpu


def _long_mode_vcpu(name: str, code: bytes):
    """Like ``_real_mode_vcpu``, with vCPU 0 in 64-bit mode (the first 2 MiB identity-mapped)."""
    vm, vcpu = _real_mode_vcpu(name, code)
    ram = vm.slots[0][1]
    ram[0x2000:0x2008] = struct.pack("<Q", 0x3000 | 3)  # PML4 -> PDPT
    ram[0x3000:0x3008] = struct.pack("<Q", 0x4000 | 3)  # PDPT -> PD
    ram[0x4000:0x4008] = struct.pack("<Q", 0x83)  # one 2 MiB page at 0
    sregs = vcpu.get_sregs()
    sregs.cs = Segment(selector=8, type=11, l=True)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, 0x2000, 0x20, 0x500
    vcpu.set_sregs(sregs)
    return vm, vcpu


def test_request_stop_from_another_thread_ends_a_spinning_guest(platform):
    """A guest that never exits (jmp $) stops within a second of request_stop (hv_vcpu_interrupt or
    WHvCancelRunVirtualProcessor, repeated until the run call has returned, because both fakes drop a
    kick that lands outside the run call: neither platform documents that case)."""
    vm, vcpu = _real_mode_vcpu(platform[0], b"\xeb\xfe")  # jmp $
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


def test_an_io_exit_without_the_vmms_handler_is_returned_as_an_exit(platform):
    """OUT to a port outside the irqchip with no serve_io_directly handler: an IoOut exit, RIP past it."""
    vm, vcpu = _real_mode_vcpu(platform[0], b"\xb0\x41\xe6\xf8")  # mov al, 0x41; out 0xf8, al
    try:
        exit_value = vcpu.run()
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF8 and bytes(exit_value.data) == b"A"
        assert vcpu.get_regs().rip == 0x1004
    finally:
        vm.close()


@pytest.mark.parametrize("trapped", [b"\x0f\xa2", b"\xe6\xf8", b"\xe4\xf8"], ids=["cpuid", "out", "in"])
def test_an_exit_comes_before_the_instructions_after_it(platform, trapped):
    """A VM exit is taken at the instruction (SDM 27.1; WHPX's exit context gives the instruction's
    RIP): the register-only instructions after it run once, after the VMM resumed the guest, not also
    before the exit. Then OUT to 0xf9 ends the test."""
    inc_si = b"\x66\x46"  # inc esi (real mode, operand-size prefix): CPUID leaves ESI alone
    vm, vcpu = _real_mode_vcpu(platform[0], trapped + inc_si * 3 + b"\xe6\xf9")
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


@pytest.mark.parametrize("code, size, rax_after", [
    (b"\xed", 4, 0x11223344),  # in eax, dx: a 32-bit destination zero-extends into RAX
    (b"\x66\xed", 2, 0xAAAAAAAA_BBBB3344),  # in ax, dx: the rest of RAX stays
    (b"\xec", 1, 0xAAAAAAAA_BBBBBB44),  # in al, dx
])  # fmt: skip
def test_an_in_exit_is_completed_as_the_instruction_would(platform, code, size, rax_after):
    """The VMM puts the port's value into RAX by the operand size (SDM vol. 2, IN); the fakes refuse
    to resume a guest whose RAX differs from what the instruction gives."""
    name, fake = platform
    vm, vcpu = _long_mode_vcpu(name, code + b"\xe6\xf9")  # then out 0xf9, al
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


def test_string_io_is_executed_for_the_vmm_one_element_at_a_time(platform):
    """rep outsb of "hey", then rep insb of three bytes (in long mode, through the page tables):
    every element reaches the VMM's handler in order, memory, RSI/RDI and RCX end as the SDM says."""
    name, fake = platform
    code = (b"\x48\xc7\xc6\x00\x05\x00\x00"  # mov rsi, 0x500
            b"\x48\xc7\xc1\x03\x00\x00\x00"  # mov rcx, 3
            b"\x66\xba\xf8\x00"  # mov dx, 0xf8
            b"\xf3\x6e"  # rep outsb
            b"\x48\xc7\xc7\x00\x06\x00\x00"  # mov rdi, 0x600
            b"\x48\xc7\xc1\x03\x00\x00\x00"  # mov rcx, 3
            b"\xf3\x6c"  # rep insb
            b"\xe6\xf9")  # out 0xf9, al  # fmt: skip
    vm, vcpu = _long_mode_vcpu(name, code)
    ram = vm.slots[0][1]
    ram[0x500:0x503] = b"hey"
    seen, answers = [], iter(b"abc")

    def handler(access):
        if access.port == 0xF9:
            vcpu.request_stop()  # the end
            return
        seen.append((type(access).__name__, access.port, bytes(access.data) if isinstance(access, IoOut) else None))
        if isinstance(access, IoIn):
            access.data[:] = bytes([next(answers)])

    vcpu.serve_io_directly(handler)
    try:
        assert isinstance(vcpu.run(), Interrupted)
        assert not fake.violations
        assert seen[:3] == [("IoOut", 0xF8, b"h"), ("IoOut", 0xF8, b"e"), ("IoOut", 0xF8, b"y")]
        assert [kind for kind, _, _ in seen[3:]] == ["IoIn"] * 3
        assert ram[0x600:0x603] == b"abc"
        regs = vcpu.get_regs()
        assert (regs.rsi, regs.rdi, regs.rcx) == (0x503, 0x603, 0)
    finally:
        vm.close()


def test_mmio_is_executed_for_the_vmm(platform):
    """A store to and a load from an unbacked address (real mode, DS = 0x2000: 0x20000 is past the
    64 KiB of RAM) reach the handler with the address and size, and the load's value lands in AX."""
    name, fake = platform
    code = (b"\xb8\x00\x20\x8e\xd8"  # mov ax, 0x2000; mov ds, ax
            b"\xb8\x34\x12\xa3\x10\x00"  # mov ax, 0x1234; mov [0x10], ax
            b"\xa1\x20\x00"  # mov ax, [0x20]
            b"\xe6\xf9")  # out 0xf9, al  # fmt: skip
    vm, vcpu = _real_mode_vcpu(name, code)
    seen = []

    def handler(access):
        if isinstance(access, IoOut):
            vcpu.request_stop()  # out 0xf9: the end
            return
        seen.append((type(access).__name__, access.addr, bytes(access.data) if isinstance(access, MmioWrite) else len(access.data)))
        if isinstance(access, MmioRead):
            access.data[:] = b"\xcd\xab"

    vcpu.serve_io_directly(handler)
    try:
        assert isinstance(vcpu.run(), Interrupted)
        assert not fake.violations
        assert seen == [("MmioWrite", 0x20010, b"\x34\x12"), ("MmioRead", 0x20020, 2)]
        assert vcpu.get_regs().rax & 0xFFFF == 0xABCD
    finally:
        vm.close()


def test_cpuid_is_answered_from_the_vcpus_table(platform):
    """CPUID leaf 0 gives the vendor of the table set_cpuid was given (KVM's policy)."""
    name, _ = platform
    vm, vcpu = _real_mode_vcpu(name, b"\x66\x31\xc0\x0f\xa2\xe6\xf9")  # xor eax, eax; cpuid; out 0xf9, al
    try:
        (leaf0,) = [e for e in vm.supported_cpuid() if e.function == 0]
        exit_value = vcpu.run()
        assert isinstance(exit_value, IoOut) and exit_value.port == 0xF9
        regs = vcpu.get_regs()
        assert (regs.rbx, regs.rdx, regs.rcx) == (leaf0.ebx, leaf0.edx, leaf0.ecx)
    finally:
        vm.close()


def test_an_mmio_exit_keeps_the_translated_code(platform):
    """Completing an MMIO exit does not throw away the software CPU's translated code: a VM exit
    leaves the guest's code alone, and dropping it cost ~10 ms per exit (Linux's LAPIC EOI, 250
    times a second, then took longer than its tick)."""
    name, fake = platform
    code = (b"\xb8\x00\x20\x8e\xd8"  # mov ax, 0x2000; mov ds, ax
            b"\xb9\x14\x00"  # mov cx, 20
            b"\xa3\x10\x00"  # 1: mov [0x10], ax
            b"\x49\x75\xfa"  # dec cx; jnz 1b
            b"\xe6\xf9")  # out 0xf9, al  # fmt: skip
    vm, vcpu = _real_mode_vcpu(name, code)
    cpu = fake.vcpus[0].cpu if name == "hvf" else next(iter(fake.partitions.values())).vps[0].cpu
    flushes, writes = [], []
    flush = cpu.uc.ctl_flush_tb

    def counted_flush():
        flushes.append(1)
        flush()

    def handler(access):
        if isinstance(access, IoOut):
            vcpu.request_stop()
            return
        writes.append(access.addr)

    vcpu.serve_io_directly(handler)
    try:
        cpu.uc.ctl_flush_tb = counted_flush
        assert isinstance(vcpu.run(), Interrupted)
        assert not fake.violations
        assert writes == [0x20010] * 20
        assert len(flushes) < 5, f"{len(flushes)} flushes of translated code for 20 MMIO exits"
    finally:
        vm.close()
