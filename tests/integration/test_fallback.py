"""The interpreter fallback on KVM: instructions KVM's emulator cannot run give the same results as the interpreter.

One 64-bit guest (long mode set up by the test with set_sregs/set_regs: identity
2 MiB pages, a flat GDT, an IDT with a #BP handler) executes popcnt (register and
MMIO operand), ``lock cmpxchg16b`` (success and failure), xsetbv/xsave/xrstor and
int3 at CPL0, and reports registers and memory through port 0x510. It runs once
on KVM with the fallback manager and once on the interpreter alone; the reports
must be identical.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import struct
import sys
import time

import pytest

from pyvmm import accel
from pyvmm.accel.core import EmulationFailure, IoIn, IoOut, MmioRead, MmioWrite
from pyvmm.accel.x86 import DescriptorTable, Regs, Segment
from pyvmm.vmm.bus import MmioBus, PioBus
from pyvmm.vmm.memory import GuestMemory
from x86flags import defined_flags

RAM = 0x200000
PML4, PDPT, PD_LOW, PD_MMIO, GDT, IDT = 0x1000, 0x2000, 0x3000, 0x6000, 0x4000, 0x5000
CODE, DATA, XSAVE_AREA, STACK = 0x10000, 0x20000, 0x21000, 0x80000
MMIO_VALUE_ADDR = 0xD0000000
MMIO_VALUE = 0x00FF00FF00FF0F0F
REPORT_PORT, DONE_PORT, FAULT_PORT = 0x510, 0x511, 0x512

GUEST_SOURCE = r"""
.code64
.macro REPORT reg
    push %rax
    push %rdx
    mov \reg, %rax
    mov $0x510, %dx
    out %eax, (%dx)
    shr $32, %rax
    out %eax, (%dx)
    pop %rdx
    pop %rax
.endm
start:
    movabs $0xF0F0F0F0F0F0F0F1, %rax
    popcnt %rax, %rbx
    pushfq
    pop %rcx
    REPORT %rbx
    REPORT %rcx
    mov $0xD0000000, %esi           # an MMIO device: the step's read goes to the VMM's bus
    popcntq (%rsi), %rbx
    REPORT %rbx
    mov $0x1111, %eax               # lock cmpxchg16b: memory holds 0x1111:0x2222 -> success
    mov $0x2222, %edx
    mov $0x3333, %ebx
    mov $0x4444, %ecx
    lock cmpxchg16b 0x20000
    pushfq
    pop %rsi
    REPORT %rsi
    REPORT 0x20000
    REPORT 0x20008
    mov $0x5555, %eax               # ... and failure: RDX:RAX get the memory value
    mov $0x6666, %edx
    lock cmpxchg16b 0x20000
    pushfq
    pop %rsi
    REPORT %rsi
    REPORT %rax
    REPORT %rdx
    xor %ecx, %ecx                  # XCR0 = x87 | SSE
    mov $3, %eax
    xor %edx, %edx
    xsetbv
    movdqu 0x20010, %xmm1
    mov $3, %eax
    xor %edx, %edx
    xsave 0x21000
    pxor %xmm1, %xmm1
    mov $3, %eax
    xor %edx, %edx
    xrstor 0x21000
    movq %xmm1, %rbx
    REPORT %rbx
    REPORT 0x21000+512
    REPORT 0x21000+160+16
    mov $0x77, %ebx
    int3
    REPORT %rbx
    mov %rsp, %rax
    REPORT %rax
    mov $0x511, %dx
    out %al, (%dx)
1:  jmp 1b
bp_handler:                         # reports the frame: RIP after int3, CS, RFLAGS
    mov (%rsp), %rax
    REPORT %rax
    mov 8(%rsp), %rax
    REPORT %rax
    mov 16(%rsp), %rax
    REPORT %rax
    mov $0x99, %ebx
    iretq
other_handler:                      # any other exception: report where and stop
    mov $0x512, %dx
    mov (%rsp), %rax
    out %eax, (%dx)
2:  jmp 2b
"""


def assemble(tmp_path) -> tuple[bytes, int, int]:
    """(code, offset of bp_handler, offset of other_handler)."""
    if not (shutil.which("as") and shutil.which("objcopy") and shutil.which("nm")):
        pytest.skip("needs binutils (as, objcopy, nm) to build the test guest")
    src, obj, raw = tmp_path / "g.S", tmp_path / "g.o", tmp_path / "g.bin"
    src.write_text(GUEST_SOURCE)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    symbols = {}
    for line in subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return raw.read_bytes(), symbols["bp_handler"], symbols["other_handler"]


def idt_gate(target: int) -> bytes:
    low = (target & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((target >> 16) & 0xFFFF) << 48)
    return struct.pack("<QQ", low, target >> 32)


def setup_memory(memory: GuestMemory, code: bytes, bp: int, other: int) -> None:
    memory.write_int(PML4, 8, PDPT | 3)
    memory.write_int(PDPT, 8, PD_LOW | 3)
    memory.write_int(PDPT + 3 * 8, 8, PD_MMIO | 3)
    memory.write_int(PD_LOW, 8, 0x83)  # 0..2 MiB, 2 MiB page
    memory.write_int(PD_MMIO + ((MMIO_VALUE_ADDR >> 21) & 511) * 8, 8, MMIO_VALUE_ADDR | 0x83)
    memory.write_int(GDT + 8, 8, 0x00AF9B000000FFFF)  # 64-bit code
    memory.write_int(GDT + 16, 8, 0x00CF93000000FFFF)  # data
    for vector in range(32):
        memory.write(IDT + 16 * vector, idt_gate(CODE + (bp if vector == 3 else other)))
    memory.write(CODE, code)
    memory.write(DATA, struct.pack("<QQ", 0x1111, 0x2222) + struct.pack("<QQ", 0x0123456789ABCDEF, 0x0FEDCBA987654321))


def long_mode_state(vcpu):
    sregs = vcpu.get_sregs()
    code = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, l=True, g=True, dpl=0)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, db=True, g=True, dpl=0)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = data
    sregs.gdt = DescriptorTable(GDT, 23)
    sregs.idt = DescriptorTable(IDT, 32 * 16 - 1)
    sregs.cr3 = PML4
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10) | (1 << 18)  # PAE, OSFXSR, OSXMMEXCPT, OSXSAVE
    sregs.cr0 = 0x80050033  # PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x500  # LME | LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=CODE, rsp=STACK, rflags=0x2))


class Recorder:
    """Port 0x510: one 32-bit report per out; 0x511: done; 0x512: unexpected exception."""

    def __init__(self):
        self.words: list[int] = []
        self.done = False
        self.fault: int | None = None

    def read(self, offset, data):
        data[:] = bytes(len(data))

    def write(self, offset, data):
        value = int.from_bytes(bytes(data), "little")
        if offset == 0:
            self.words.append(value)
        elif offset == 1:
            self.done = True
        else:
            self.fault = value

    def values(self) -> list[int]:
        return [lo | (hi << 32) for lo, hi in zip(self.words[::2], self.words[1::2])]


class MmioValue:
    def read(self, offset, data):
        data[:] = MMIO_VALUE.to_bytes(8, "little")[offset : offset + len(data)]

    def write(self, offset, data):
        pass


def buses():
    recorder = Recorder()
    pio, mmio = PioBus(), MmioBus()
    pio.insert(recorder, REPORT_PORT, 3)
    mmio.insert(MmioValue(), MMIO_VALUE_ADDR, 0x1000)
    return recorder, pio, mmio


def drive(vcpu, recorder, pio, mmio, fallback=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not recorder.done and recorder.fault is None:
        assert time.monotonic() < deadline, f"guest did not finish; reports so far {recorder.values()}"
        exit_ = vcpu.run()
        kind = type(exit_)
        if kind is IoOut:
            pio.write(exit_.port, exit_.data)
        elif kind is IoIn:
            pio.read(exit_.port, exit_.data)
        elif kind is MmioRead:
            mmio.read(exit_.addr, exit_.data)
        elif kind is MmioWrite:
            mmio.write(exit_.addr, exit_.data)
        elif kind is EmulationFailure and fallback is not None:
            fallback(vcpu, exit_)
        else:
            pytest.fail(f"unexpected exit {exit_!r}")
    assert recorder.fault is None, f"unexpected guest exception at rip {recorder.fault:#x}"
    return recorder.values()


def run_interp(code, bp, other):
    from pyvmm.accel.interp import InterpVm

    vm = InterpVm(1)
    memory = GuestMemory.anonymous([(0, RAM)])
    try:
        vm.map_memory(0, 0, memory.regions[0].buffer)
        setup_memory(memory, code, bp, other)
        vcpu = vm.create_vcpu(0)
        long_mode_state(vcpu)
        recorder, pio, mmio = buses()
        return drive(vcpu, recorder, pio, mmio)
    finally:
        vm.close()
        memory.close()


def run_kvm(code, bp, other):
    from pyvmm.accel import kvm
    from pyvmm.accel.fallback import FallbackManager, fallback_cpuid, interp_supported_cpuid
    from pyvmm.vmm.x86.cpuid import build_cpuid

    kvm.install_kick_handler()
    vm = kvm.KvmVm()
    memory = GuestMemory.anonymous([(0, RAM)])
    recorder, pio, mmio = buses()
    manager = FallbackManager(memory, pio, mmio)
    try:
        vm.map_memory(0, 0, memory.regions[0].buffer)
        setup_memory(memory, code, bp, other)
        vcpu = vm.create_vcpu(0)
        cpuid = build_cpuid(fallback_cpuid(vm.supported_cpuid(), interp_supported_cpuid()), 0, 1,
                            hypervisor_signature="KVMKVMKVM")  # fmt: skip
        vcpu.set_cpuid(cpuid)
        manager.set_cpuid(0, cpuid)
        long_mode_state(vcpu)
        return drive(vcpu, recorder, pio, mmio, fallback=manager), manager
    finally:
        manager.close()
        vm.close()
        memory.close()


@pytest.fixture
def guest(tmp_path):
    return assemble(tmp_path)


def needs(name):
    probe = accel.probe(name)
    if not probe.usable:
        pytest.skip(f"{name} not usable here: {probe.reason}")


def test_interpreter_reference_run(guest):
    needs("interp")
    code, bp, other = guest
    values = run_interp(code, bp, other)
    popcnt, flags, popcnt_mmio = values[0:3]
    assert popcnt == bin(0xF0F0F0F0F0F0F0F1).count("1") and not flags & 0x40  # ZF clear
    assert popcnt_mmio == bin(MMIO_VALUE).count("1")
    ok_flags, mem_lo, mem_hi, fail_flags, rax, rdx = values[3:9]
    assert ok_flags & 0x40 and (mem_lo, mem_hi) == (0x3333, 0x4444)
    assert not fail_flags & 0x40 and (rax, rdx) == (0x3333, 0x4444)
    xmm1, xstate_bv, saved_xmm1 = values[9:12]
    assert xmm1 == saved_xmm1 == 0x0123456789ABCDEF and xstate_bv & 2
    bp_rip, bp_cs, _bp_flags, rbx_after, rsp_after = values[12:17]
    assert bp_rip == CODE + code.index(b"\xcc", 0x100) + 1 and bp_cs == 0x08
    assert rbx_after == 0x99 and rsp_after == STACK


#: report index -> the instruction that last wrote RFLAGS before the value reported there: the
#: cmpxchg16b results and the #BP frame hold flags of REPORT's ``shr $32`` (cmpxchg16b sets ZF only)
FLAG_REPORTS = {1: "popcnt", 3: "shift by more than 1", 6: "shift by more than 1", 14: "shift by more than 1"}


def architecturally_defined(values: list[int]) -> list[int]:
    """The reports with the flags bits their last writer leaves undefined masked (host vendors differ)."""
    return [defined_flags(v, FLAG_REPORTS[i]) if i in FLAG_REPORTS else v for i, v in enumerate(values)]


def test_undefined_flags_are_masked_and_defined_ones_kept():
    assert defined_flags(0x856, "shift by more than 1") == 0x46  # AF (0x10) and OF (0x800) dropped
    assert defined_flags(0x856, "popcnt") == 0x856


def test_kvm_with_fallback_matches_the_interpreter(guest):
    from pyvmm.accel import kvm

    needs("kvm")
    needs("interp")
    code, bp, other = guest
    reference = run_interp(code, bp, other)
    values, manager = run_kvm(code, bp, other)
    assert architecturally_defined(values) == architecturally_defined(reference)
    assert values[3] & 0x40 and not values[6] & 0x40  # ZF: defined by cmpxchg16b, compared above too
    if kvm.is_pvm_host():
        # KVM's emulator (all CPL0 code on PVM) cannot run these: each went through the interpreter
        mnemonics = " ".join(manager.counts())
        for name in ("popcnt", "cmpxchg16b", "xrstor", "int3"):
            assert name in mnemonics, manager.counts()
        assert manager.total >= 6  # two popcnt, two cmpxchg16b, xrstor, int3
        print("\n".join(manager.summary()), file=sys.stderr)


def test_emufail_guest_through_pyvmm_boot_reports_fallbacks(tmp_path):
    """tests/guests/emufail.elf on KVM with the fallback (the default): all checks pass, -v names the steps."""
    from conftest import GUESTS
    from pyvmm.accel import kvm

    needs("kvm")
    needs("interp")
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nmemory_mib = 32\naccel = "kvm"\n[boot]\nkernel = "{GUESTS / "emufail.elf"}"\n')
    result = subprocess.run([sys.executable, "-m", "pyvmm", "boot", str(config), "-v"], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("emufail ok\n") and "\nfail:" not in result.stdout
    if kvm.is_pvm_host():
        summary = result.stderr[result.stderr.index("interpreter fallbacks:"):]
        for name in ("cmpxchg16b", "popcnt", "xrstor", "int3"):
            assert re.search(rf"^pyvmm: INFO pyvmm\.machine: +\d+ x .*{name}", summary, re.MULTILINE), summary
            # and the first time each is seen it is logged
            assert re.search(rf"fallback: vcpu 0 at rip 0x[0-9a-f]+: KVM cannot emulate [^\n]*{name}", result.stderr)


IMPORTS_AFTER_BOOT = """
import sys
from pyvmm.cli import main
status = main(["boot", sys.argv[1]])
print("modules:", " ".join(m for m in ("unicorn", "capstone") if m in sys.modules))
sys.exit(status)
"""


def _boot_and_list_imports(tmp_path, kernel):
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nmemory_mib = 32\naccel = "kvm"\n[boot]\nkernel = "{kernel}"\n')
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER_BOOT, str(config)], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.rsplit("modules:", 1)[1].split()


def test_a_kvm_boot_with_the_fallback_armed_imports_no_interpreter(tmp_path):
    """The fallback costs nothing until an instruction needs it: no unicorn, no capstone."""
    from conftest import GUESTS

    needs("kvm")
    assert _boot_and_list_imports(tmp_path, GUESTS / "hello.elf") == []


def test_the_first_fallback_imports_the_interpreter(tmp_path):
    """The other side of the test above (it must be able to see an import): a guest that needs it."""
    from conftest import GUESTS
    from pyvmm.accel import kvm

    needs("kvm")
    needs("interp")
    if not kvm.is_pvm_host():
        pytest.skip("on a VT-x/AMD-V host KVM's emulator runs emufail's instructions itself")
    assert _boot_and_list_imports(tmp_path, GUESTS / "emufail.elf") == ["unicorn", "capstone"]
