"""The fakes' CPU: pyvmm's interpreter with no interrupt controller, stopping where a VM exit would.

A VM exit happens *instead of* the instruction that causes it (Intel SDM vol. 3
27.1: the state is saved as before the instruction; WHPX reports exits the same
way, with RIP at the instruction). ``TrappingCpu`` gives that:

* port I/O and CPUID: the instruction's hook parks the engine (the interpreter's
  exit-from-inside-an-instruction) with the state still the one before the
  instruction, and the fake reports the exit from there. When the VMM resumes
  the guest, the parked instruction completes with the VMM's result (the IN
  value, the CPUID registers); the fake first checks that the VMM wrote exactly
  what the instruction's completion produces (``expected_completion``), because
  the engine, not the VMM's registers, carries on from there;
* an access outside guest RAM (the interpreter's MMIO callback) parks the engine the
  same way; a memory hook over those addresses makes unicorn keep RIP exact there.
  The VMM executes such an instruction itself (VMX does not decode it), so on
  resume the fake loads the VMM's state instead, and the engine must not finish
  its own copy: the interpreter's replacement rule drops the rest of the block's
  I/O, and guest RAM is read-only to the engine until that block has ended;
* HLT: recorded when the engine halts, RIP put back onto the HLT (VMX) or left past it (WHPX).

The engine keeps the interpreter's rule that stops take effect only between
translation blocks (stops from other threads mid-instruction would re-execute
read-modify-write instructions), so nothing here stops it inside a block.

What the fakes cannot make it do, because the software CPU executes these
itself: exits on RDMSR/WRMSR, MOV to CR0/CR4 and XSETBV. The fakes offer
``script_exit`` for those (a recorded exit with the platform's fields), and
their docstrings say how guest writes of host-owned bits are treated.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import NamedTuple

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ
from unicorn import x86_const as x86

from pyvmm.accel.core import InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, Shutdown
from pyvmm.accel.interp import engine, system
from pyvmm.accel.interp.vcpu import InterpVcpu
from pyvmm.accel.interp.vm import InterpVm
from pyvmm.accel.x86 import Regs

LAPIC_TIMER_HZ = 1_000_000_000
# While the guest runs, a requested interrupt window (or an event waiting to go in) is looked for after
# a delay that starts short and doubles up to a cap: spin-lock sections are brief, long cli sections
# then cost little
WINDOW_POLL_FIRST, WINDOW_POLL_MAX = 0.00002, 0.001
_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))


class CpuidExit(NamedTuple):
    """Posted from the CPUID hook: the engine waits there for the VMM's answer."""


@dataclass
class Trap:
    """Why the CPU stopped: ``kind`` is io, mmio, cpuid, hlt, stop (asked to), shutdown or error."""

    kind: str
    rip: int = 0
    port: int = 0
    addr: int = 0
    size: int = 0
    is_write: bool = False
    value: int = 0
    length: int = 0
    string: bool = False
    rep: bool = False
    detail: str = ""


class NoInterruptController:
    """Stands where the interpreter's irqchip would be: it owns no port and no address (so each one
    becomes an exit) and never has an interrupt; events arrive by injection only."""

    LAPIC_TIMER_HZ = LAPIC_TIMER_HZ

    def __init__(self, vcpu_count: int):
        self.vcpu_count = vcpu_count
        self.cpus: dict[int, TrappingCpu] = {}
        self.clock = time.monotonic

    def on_wake(self, wake) -> None:
        self._wake = wake

    def handles_port(self, port: int) -> bool:
        return False

    def handles_mmio(self, addr: int) -> bool:
        return False

    def poll(self) -> None:
        now = self.clock()
        for cpu in self.cpus.values():
            if cpu.poll_due is not None and now >= cpu.poll_due:
                cpu.poll_due = None
                cpu.request_stop()  # the fake looks for a requested interrupt window

    def next_deadline(self, index: int):
        cpu = self.cpus.get(index)
        return None if cpu is None else cpu.poll_due

    def has_interrupt(self, index: int) -> bool:
        return False

    def ack_interrupt(self, index: int):
        return None

    def has_nmi(self, index: int) -> bool:
        return False

    def ack_nmi(self, index: int) -> bool:
        return False

    def take_init_sipi(self, index: int):
        return []

    def take_cross_cpu_ipi(self, index: int) -> bool:
        cpu = self.cpus.get(index)
        return False if cpu is None else cpu.take_flush()

    def get_apic_base(self, index: int) -> int:
        return 0xFEE00000 | (0x900 if index == 0 else 0x800)

    def set_apic_base(self, index: int, value: int) -> None:
        pass

    def set_irq_line(self, irq: int, level: bool) -> None:
        pass


class TrappingCpu(InterpVcpu):
    """One vCPU of a fake: runs until the next trap (see the module text)."""

    def __init__(self, vm: InterpVm, index: int):
        super().__init__(vm, index, vm._default_cpuid(index), vm._engine_lock)
        self._wait_for_sipi = False  # a hardware vCPU runs from whatever state it is given
        #: a HLT exit reports RIP past the HLT (WHPX) rather than on it (VMX)
        self.halt_completes = False
        self.trap: Trap | None = None
        self.parked = None  # the IoIn/IoOut/CpuidExit the engine waits in, with its Trap
        self.cpuid_answer: tuple[int, int, int, int] | None = None
        self.poll_due: float | None = None
        self.poll_delay = WINDOW_POLL_FIRST
        self._flush = False
        self._mmio_hooks: list = []
        self._frozen = False
        vm.irqchip.cpus[index] = self

    def arm_poll(self, wanted: bool) -> None:
        """Stop the engine after the current poll delay to look again (the delay then doubles), or not."""
        if wanted:
            self.poll_due = time.monotonic() + self.poll_delay
            self.poll_delay = min(self.poll_delay * 2, WINDOW_POLL_MAX)
        else:
            self.poll_due = None

    def reset_poll(self) -> None:
        """An event went in: the next wait for a window starts short again."""
        self.poll_delay = WINDOW_POLL_FIRST

    def take_flush(self) -> bool:
        flush, self._flush = self._flush, False
        return flush

    def flush_code(self) -> None:
        """Drop translated code before the next run (another vCPU or the VMM may have written it)."""
        self._flush = True

    # --- traps ------------------------------------------------------------------------
    def _sync_memory(self) -> None:
        super()._sync_memory()
        # with a memory hook, unicorn keeps RIP exact at memory accesses (else an MMIO callback sees the
        # block's start): one hook per MMIO gap, doing nothing
        for handle in self._mmio_hooks:
            self.uc.hook_del(handle)
        self._mmio_hooks = [self.uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, _no_op, None, start,
                                             start + size - 1) for start, size in self.engine._holes]  # fmt: skip

    def freeze_ram(self) -> None:
        """Guest RAM read-only to this engine (its writes are dropped) until the current block has ended."""
        for addr, size, _, _ in self._vm.slots.values():
            self.uc.mem_protect(addr, size, UC_PROT_READ | UC_PROT_EXEC)
        self._frozen = True

    def _load_replacement(self) -> None:
        """After an MMIO exit the VMM's state replaces the engine's (``freeze_ram``): the instruction's
        completion, in the same code, so translated code is kept. A VM exit discards nothing of the kind
        (SDM 27.5: the host state is loaded, the guest's code untouched); dropping it made every MMIO
        exit cost ~10 ms of retranslation here, and a Linux guest with a 250 Hz LAPIC timer (one EOI
        per tick) then spent longer per tick than the period and never ran anything but its ticks."""
        if not self._frozen:
            super()._load_replacement()
            return
        self.uc.context_restore(self._replacement)
        self._replacement = None

    def _run_engine(self):
        result = super()._run_engine()
        if self._frozen:
            self._frozen = False
            for addr, size, _, readonly in self._vm.slots.values():
                self.uc.mem_protect(addr, size, UC_PROT_READ | UC_PROT_EXEC if readonly else UC_PROT_ALL)
        return result

    def _on_cpuid(self, uc, _):
        self.cpuid_answer = None
        if self._io_from_hook(CpuidExit()) and self.cpuid_answer is not None:
            eax, ebx, ecx, edx = self.cpuid_answer
            uc.reg_write_batch(((x86.UC_X86_REG_RAX, eax), (x86.UC_X86_REG_RBX, ebx), (x86.UC_X86_REG_RCX, ecx),
                                (x86.UC_X86_REG_RDX, edx)))  # fmt: skip
        return 1  # the engine's own CPUID is skipped

    def _sleep(self) -> None:
        if self._halted:
            self._halted = False
            if self.trap is None:
                self.trap = Trap("hlt", rip=self.uc.reg_read(x86.UC_X86_REG_RIP) - 1, length=1)
            with self._cond:
                self._stop_requested = True
            return
        super()._sleep()

    def decode_io(self, rip: int) -> tuple[int, bool, bool]:
        """(length, string, REP) of the I/O instruction at ``rip``: prefixes, one opcode byte, an imm8."""
        state = system.MachineState(self.uc, self._ram)
        code = state.read_bytes(state.segs[engine.CS][1] + rip, 15)
        n, rep = 0, False
        while code[n] in _PREFIXES or (state.code64 and 0x40 <= code[n] <= 0x4F):
            rep |= code[n] == 0xF3
            n += 1
        return n + (2 if code[n] in (0xE4, 0xE5, 0xE6, 0xE7) else 1), code[n] in (0x6C, 0x6D, 0x6E, 0x6F), rep

    def run_until_trap(self) -> Trap:
        """Run (or resume) the guest until it traps, is stopped (``request_stop``) or fails."""
        self.trap = None
        self.parked = None
        result = self.run()
        kind = type(result)
        if kind is IoIn or kind is IoOut:
            rip = self.get_regs().rip
            length, string, rep = self.decode_io(rip)
            trap = Trap("io", rip=rip, port=result.port, size=len(result.data), is_write=kind is IoOut,
                        value=int.from_bytes(result.data, "little") if kind is IoOut else 0, length=length,
                        string=string, rep=rep)  # fmt: skip
            self.parked = (result, trap)
            return trap
        if kind is MmioRead or kind is MmioWrite:
            trap = Trap("mmio", rip=self.get_regs().rip, addr=result.addr, size=len(result.data),
                        is_write=kind is MmioWrite, value=int.from_bytes(result.data, "little") if kind is MmioWrite else 0)
            self.parked = (result, trap)
            return trap
        if kind is CpuidExit:
            trap = Trap("cpuid", rip=self.get_regs().rip, length=2)
            self.parked = (result, trap)
            return trap
        trap, self.trap = self.trap, None
        if trap is not None:
            if trap.kind == "hlt" and not self.halt_completes:
                self.set_regs(dataclasses.replace(self.get_regs(), rip=trap.rip))
            return trap
        if kind is Interrupted:
            return Trap("stop")
        if kind is Shutdown:
            return Trap("shutdown", detail=result.reason)
        return Trap("error", detail=result.detail if kind is InternalError else f"{result}")

    # --- resuming a parked instruction --------------------------------------------------
    def expected_completion(self, before: Regs) -> Regs:
        """The registers the parked instruction leaves, given the VMM's result (SDM vol. 2 IN, OUT, INS,
        OUTS, CPUID): what a VMM must write before resuming, and what the engine will produce."""
        exit_value, trap = self.parked
        regs = dict(before.__dict__)
        if trap.kind == "cpuid":
            regs.update(zip(("rax", "rbx", "rcx", "rdx"), self.cpuid_answer), rip=trap.rip + 2)
            return Regs(**regs)
        size, mask = trap.size, (1 << (8 * trap.size)) - 1
        if not trap.string:
            if not trap.is_write:
                value = int.from_bytes(exit_value.data, "little")
                regs["rax"] = value if size == 4 else (before.rax & ~mask) | value
            regs["rip"] = trap.rip + trap.length
            return Regs(**regs)
        step = -size if before.rflags & (1 << 10) else size  # DF
        pointer = "rdi" if not trap.is_write else "rsi"
        regs[pointer] = (regs[pointer] + step) & ((1 << 64) - 1)
        if trap.rep:
            regs["rcx"] = (before.rcx - 1) & ((1 << 64) - 1)
            regs["rip"] = trap.rip if regs["rcx"] else trap.rip + trap.length
        else:
            regs["rip"] = trap.rip + trap.length
        return Regs(**regs)

    def string_input_bytes(self, rdi: int, size: int) -> bytes:
        """What a VMM's INS left at ES:RDI (the parked INS then stores the same bytes again)."""
        state = system.MachineState(self.uc, self._ram)
        return state.read_bytes(state.segs[engine.ES][1] + rdi, size)


def _no_op(*args) -> None:
    pass


def new_cpus(vcpu_count: int) -> InterpVm:
    """An interpreter VM without an interrupt controller, for a fake's vCPUs."""
    return InterpVm(vcpu_count, irqchip=NoInterruptController(vcpu_count))
