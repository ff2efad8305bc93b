"""The fakes' CPU: pyvmm's interpreter with no interrupt controller, stopping where a VM exit would.

A VM exit happens *instead of* the instruction that causes it (Intel SDM vol. 3
27.1: the state is saved as before the instruction; WHPX reports exits the same
way, with RIP at the instruction). ``TrappingCpu`` gives that:

* port I/O: the IN/OUT hook records the access and the engine context (still the
  one before the instruction) and stops the engine; the context is put back after
  the stop, undoing the instruction and anything unicorn ran past it;
* every address outside guest RAM: the MMIO callback records the access and stops
  the engine, which abandons the instruction (RIP stays on it, nothing written);
* CPUID: recorded and skipped, the context before it put back the same way;
* HLT: recorded when the engine halts, RIP put back onto the HLT.

Why the context: after an emu_stop from an instruction hook unicorn notices the stop
only at the next guest memory access or block end, so register-only instructions
after the trapped one (``cpuid; inc esi``) would otherwise run twice.

What the fakes cannot make it do, because the software CPU executes these
itself: exits on RDMSR/WRMSR, MOV to CR0/CR4 and XSETBV. The fakes offer
``script_exit`` for those (a recorded exit with the platform's fields), and
their docstrings say how guest writes of host-owned bits are treated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn import x86_const as x86

from pyvmm.accel.core import Interrupted, Shutdown
from pyvmm.accel.interp.vcpu import InterpVcpu
from pyvmm.accel.interp.vm import InterpVm

LAPIC_TIMER_HZ = 1_000_000_000


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
    """Stands where the interpreter's irqchip would be: it owns every port and unbacked address
    (so each one traps) and never has an interrupt; events arrive by injection only."""

    LAPIC_TIMER_HZ = LAPIC_TIMER_HZ

    def __init__(self, vcpu_count: int):
        self.vcpu_count = vcpu_count
        self.cpus: dict[int, TrappingCpu] = {}
        self.clock = time.monotonic

    def on_wake(self, wake) -> None:
        self._wake = wake

    def handles_port(self, port: int) -> bool:
        return True

    def handles_mmio(self, addr: int) -> bool:
        return True

    def pio_read(self, index, port, size):
        return self.cpus[index].trap_port(port, size, None)

    def pio_write(self, index, port, size, value):
        self.cpus[index].trap_port(port, size, value)

    def mmio_read(self, index, addr, size):
        return self.cpus[index].trap_mmio(addr, size, None)

    def mmio_write(self, index, addr, size, value):
        self.cpus[index].trap_mmio(addr, size, value)

    def poll(self) -> None:
        pass

    def next_deadline(self, index: int):
        return self.cpus[index].poll_due if index in self.cpus else None

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
        return self.cpus[index].take_flush() if index in self.cpus else False

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
        self.trap: Trap | None = None
        self._before = None  # the engine context at an instruction-hook trap
        self.poll_due: float | None = None
        self._flush = False
        vm.irqchip.cpus[index] = self
        # The interpreter makes emu_stop take effect only at block boundaries (engine._disable_midblock_exits,
        # against stops from other threads). Here emu_stop is called only from this engine's own hooks, and a
        # VM exit must come right at the instruction: unicorn's own behaviour (stop after an I/O or CPUID
        # instruction; an MMIO access abandons its instruction) is restored for this engine.
        import ctypes

        from pyvmm.accel.interp import engine as interp_engine

        flag = interp_engine._anchor_fast(self.uc) + interp_engine.NO_EXIT_REQUEST_FROM_ANCHOR
        ctypes.c_uint8.from_address(flag).value = 0

    def take_flush(self) -> bool:
        flush, self._flush = self._flush, False
        return flush

    def flush_code(self) -> None:
        """Drop translated code before the next run (another vCPU or the VMM may have written it)."""
        self._flush = True

    def _trapped(self, trap: Trap, *, snapshot: bool = False) -> None:
        """Record ``trap`` and stop. ``snapshot``: from an instruction hook, where the state is still the
        one before the instruction but unicorn may run on past it (to the next memory access or the
        block's end) before it stops: that state is kept and put back after the stop."""
        if self.trap is None:
            self.trap = trap
            self._before = self.uc.context_save() if snapshot else None
        self.uc.emu_stop()
        with self._cond:
            self._stop_requested = True

    def trap_port(self, port: int, size: int, value):
        if self.trap is None:
            self._trapped(Trap("io", rip=self.uc.reg_read(x86.UC_X86_REG_RIP), port=port, size=size,
                               is_write=value is not None, value=value or 0), snapshot=True)  # fmt: skip
        return 0

    def trap_mmio(self, addr: int, size: int, value):
        if self.trap is None:
            self._trapped(Trap("mmio", addr=addr, size=size, is_write=value is not None, value=value or 0))
        return 0

    def _on_cpuid(self, uc, _):
        if self.trap is None:
            self._trapped(Trap("cpuid", rip=uc.reg_read(x86.UC_X86_REG_RIP)), snapshot=True)
        return 1  # skipped; the state before it is put back

    def _sleep(self) -> None:
        if self._halted:
            self._halted = False
            if self.trap is None:
                self.trap = Trap("hlt", rip=self.uc.reg_read(x86.UC_X86_REG_RIP) - 1, length=1)
            with self._cond:
                self._stop_requested = True
            return
        super()._sleep()

    def run_until_trap(self) -> Trap:
        """Run the guest until it traps, is stopped (``request_stop``) or fails."""
        self.trap = None
        result = self.run()
        trap, self.trap = self.trap, None
        if trap is None:
            if isinstance(result, Interrupted):
                return Trap("stop")
            if isinstance(result, Shutdown):
                return Trap("shutdown", detail=result.reason)
            return Trap("error", detail=f"{result}")
        uc = self.uc
        if self._before is not None:
            paging = (x86.UC_X86_REG_CR0, x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4)
            ran_past = [uc.reg_read(r) for r in paging]
            uc.context_restore(self._before)  # whatever ran past the trapped instruction is undone
            self._before = None
            if ran_past != [uc.reg_read(r) for r in paging]:
                uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)  # translations made under the undone paging state
        if trap.kind == "io":
            trap.length, trap.string, trap.rep = self.decode_io(trap.rip)
        elif trap.kind == "cpuid":
            trap.length = 2
        elif trap.kind == "hlt":
            uc.reg_write(x86.UC_X86_REG_RIP, trap.rip)
        elif trap.kind == "mmio":
            trap.rip = uc.reg_read(x86.UC_X86_REG_RIP)
        return trap

    def decode_io(self, rip: int) -> tuple[int, bool, bool]:
        """(length, string, REP) of the I/O instruction at ``rip``: prefixes, one opcode byte, an imm8."""
        from pyvmm.accel.interp import engine, system

        state = system.MachineState(self.uc, self._ram)
        code = state.read_bytes(state.segs[engine.CS][1] + rip, 15)
        n, rep = 0, False
        while code[n] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65) or (
                state.code64 and 0x40 <= code[n] <= 0x4F):  # fmt: skip
            rep |= code[n] == 0xF3
            n += 1
        return n + (2 if code[n] in (0xE4, 0xE5, 0xE6, 0xE7) else 1), code[n] in (0x6C, 0x6D, 0x6E, 0x6F), rep


def new_cpus(vcpu_count: int) -> InterpVm:
    """An interpreter VM without an interrupt controller, for a fake's vCPUs."""
    return InterpVm(vcpu_count, irqchip=NoInterruptController(vcpu_count))

