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

Debug exceptions (Intel SDM vol. 3B, 17.2-17.3), as a VMX or Hyper-V guest's CPU raises them:

* RFLAGS.TF: a #DB trap after each instruction, DR6.BS (the engine's own TF support);
* INT3: #BP, a software exception with RIP past the int3;
* DR0-DR3 with DR7 (``set_debug_registers``; the guest's own MOV to DR does not reach them):
  an instruction breakpoint (R/W 00) is a #DB *fault* before the instruction, with RIP on it,
  unless RFLAGS.RF is set when the instruction starts (RF is then cleared once it completed,
  17.3.1.1); a data breakpoint (R/W 01 write, 11 read or write) is a #DB trap after the access.
  The B bits of DR6 say which slot hit. Instruction breakpoints are exact here (unicorn's exit
  addresses end translation before the instruction); a data breakpoint's trap comes at the end of
  the translation block holding the access (the engine cannot stop inside a block without
  re-running stores, see engine._disable_midblock_exits): straight-line code may run up to a few
  instructions further before the #DB than on hardware.
* an exception whose vector the fake intercepts (``intercepted``: VMX's exception bitmap,
  WHPX's ExceptionExitBitmap) is not delivered but stops the CPU: ``Trap("exception")`` with the
  vector, the instruction length (INT3) and DR6's bits; any other goes through the guest IDT.
* an instruction a VM exit came instead of (port I/O, CPUID: ``completed_by_vmm``) raises no TF
  trap when the engine completes it: on hardware the guest never executed it (SDM 27.1), and the
  VMM's step handling stands for the trap (KVM: kvm_skip_emulated_instruction).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import NamedTuple

from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ
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
DB, BP = 1, 3
RFLAGS_RF = 1 << 16
DR6_FIXED, DR6_BS = 0xFFFF0FF0, 1 << 14  # DR6's reserved bits read as 1 (SDM 17.2.3)


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
    #: an "exception" trap: its vector and DR6's B0-B3/BS bits (#DB)
    vector: int = 0
    dr6: int = 0


class NoInterruptController:
    """Stands where the interpreter's irqchip would be: it owns no port and no address (so each one
    becomes an exit) and never has an interrupt; events arrive by injection only."""

    LAPIC_TIMER_HZ = LAPIC_TIMER_HZ

    def __init__(self, vcpu_count: int):
        self.vcpu_count = vcpu_count
        self.cpus: dict[int, TrappingCpu] = {}
        self.clock = time.monotonic
        self._tprs: dict[int, int] = {}

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

    def get_tpr(self, index: int) -> int:
        """CR8 (TPR[7:4]) as the interpreter keeps it in its irqchip: here only stored, never applied."""
        return self._tprs.get(index, 0)

    def set_tpr(self, index: int, value: int) -> None:
        self._tprs[index] = value & 0xFF

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
        # debug exceptions (see the module text)
        self.intercepted: frozenset[int] = frozenset()
        self._exec_breakpoints: dict[int, int] = {}  # linear address -> DR slot bit
        self._data_hooks: list = []
        self._data_hits = 0
        self._exits_armed: frozenset[int] = frozenset()
        self._rf_skip: int | None = None  # an instruction breakpoint RF suppresses once
        self._rf_hook = None
        self._rf_done = False
        self._rf_blocks = 0
        #: the VMM completed the parked instruction (a VM exit comes instead of it): no TF trap after it
        self.completed_by_vmm = False
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

    # --- debug registers and intercepted exceptions ------------------------------------
    def set_debug_registers(self, addresses: tuple[int, int, int, int], dr7: int) -> None:
        """Load DR0-DR3 and DR7: enabled slots (L or G bit) become breakpoints (SDM 17.2.4)."""
        uc = self.uc
        for handle in self._data_hooks:
            uc.hook_del(handle)
        self._data_hooks = []
        self._exec_breakpoints = {}
        for slot in range(4):
            if not dr7 >> (2 * slot) & 3:
                continue
            address = addresses[slot] & 0xFFFFFFFFFFFFFFFF
            access = dr7 >> (16 + 4 * slot) & 3
            length = (1, 2, 8, 4)[dr7 >> (18 + 4 * slot) & 3]
            if access == 0:
                self._exec_breakpoints[address] = self._exec_breakpoints.get(address, 0) | 1 << slot
            elif access in (1, 3):  # 2: I/O breakpoints (CR4.DE), not modelled
                kinds = UC_HOOK_MEM_WRITE | (UC_HOOK_MEM_READ if access == 3 else 0)
                self._data_hooks.append(uc.hook_add(kinds, self._on_data_breakpoint, 1 << slot, address,
                                                    address + length - 1))  # fmt: skip

    def set_dr6(self, value: int) -> None:
        """DR6 as the guest's MOV from DR6 reads it."""
        self.uc.reg_write(x86.UC_X86_REG_DR6, value)

    def _on_data_breakpoint(self, uc, access, address, size, value, bits) -> None:
        self._data_hits |= bits
        uc.emu_stop()  # a trap after the access: at the end of this block (see the module text)

    def _linear_rip(self) -> int:
        state = system.MachineState(self.uc, self._ram)
        return (state.segs[engine.CS][1] + state.rip) & 0xFFFFFFFFFFFFFFFF

    def _arm_breakpoints(self) -> None:
        """Exit addresses end translation before the instruction at each instruction breakpoint."""
        wanted = frozenset(self._exec_breakpoints) - ({self._rf_skip} if self._rf_skip is not None else set())
        if wanted != self._exits_armed:
            self.uc.ctl_set_exits(sorted(wanted))
            self.uc.ctl_flush_tb()
            self._exits_armed = wanted

    def _on_rf_block(self, uc, address, size, _data) -> None:
        # the first block begins at the RF-suppressed instruction; a stop requested at the next block's
        # hook lands before that block runs (exact there), and the breakpoint is armed again
        self._rf_blocks += 1
        if self._rf_blocks == 2:
            self._rf_done = True
            self._block_exit.request()

    def _debug_exception(self, vector: int, rip: int, *, length: int = 0, dr6: int = 0) -> None:
        """A #DB or #BP the fake intercepts: stop with it instead of delivering it."""
        if self.trap is None:
            self.trap = Trap("exception", rip=rip, vector=vector, length=length, dr6=dr6)
        with self._cond:
            self._stop_requested = True

    def _handle_pending(self, pending):
        if pending[0] == "exception" and pending[1] in (DB, BP) and pending[1] in self.intercepted:
            _, vector, _, software, _ = pending
            uc = self.uc
            rip = uc.reg_read(x86.UC_X86_REG_RIP)
            if vector == BP and software and self._code_byte(-1) == 0xCC:
                # INT3: the exit reports RIP at the instruction (SDM 27.1; WHPX's exit context the same)
                uc.reg_write(x86.UC_X86_REG_RIP, rip - 1)
                self._debug_exception(BP, rip - 1, length=1)
                return None
            if vector == DB and not software and self.completed_by_vmm:
                # the exit came instead of the instruction, so on hardware it raised no TF trap; the
                # VMM's own step handling (or none) stands for it
                self.completed_by_vmm = False
                uc.reg_write(x86.UC_X86_REG_DR6, DR6_FIXED)
                return None
            if vector == DB and not software:  # TF's trap: the engine set DR6.BS
                bits = (uc.reg_read(x86.UC_X86_REG_DR6) & DR6_BS) | self._take_data_hits()
                uc.reg_write(x86.UC_X86_REG_DR6, DR6_FIXED)
                self._debug_exception(DB, rip, dr6=bits)
                return None
        return super()._handle_pending(pending)

    def _code_byte(self, offset: int) -> int | None:
        try:
            state = system.MachineState(self.uc, self._ram)
            return state.read_bytes(state.segs[engine.CS][1] + state.rip + offset, 1)[0]
        except Exception:  # noqa: BLE001 - unreadable: not an int3
            return None

    def _take_data_hits(self) -> int:
        hits, self._data_hits = self._data_hits, 0
        return hits

    def _raise_db(self, rip: int, bits: int) -> None:
        """#DB with DR6 ``bits``: intercepted, or delivered through the guest IDT with DR6 set."""
        if DB in self.intercepted:
            self._debug_exception(DB, rip, dr6=bits)
            return
        self.uc.reg_write(x86.UC_X86_REG_DR6, DR6_FIXED | bits)
        system.deliver(self.uc, DB, ram=self._ram)

    def begin_run(self) -> None:
        """At VM entry: RF set in RFLAGS suppresses an instruction breakpoint at the first instruction."""
        uc = self.uc
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        if rflags & RFLAGS_RF and self._exec_breakpoints:
            at = self._linear_rip()
            if at in self._exec_breakpoints:
                self._rf_skip = at
        if rflags & RFLAGS_RF:
            uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~RFLAGS_RF)

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
        self._arm_breakpoints()
        if self._rf_skip is not None and self._rf_hook is None:
            self._rf_done, self._rf_blocks = False, 0
            self._rf_hook = self.uc.hook_add(UC_HOOK_BLOCK, self._on_rf_block)
        result = super()._run_engine()
        self.completed_by_vmm = False
        if self._frozen:
            self._frozen = False
            for addr, size, _, readonly in self._vm.slots.values():
                self.uc.mem_protect(addr, size, UC_PROT_READ | UC_PROT_EXEC if readonly else UC_PROT_ALL)
        if self._rf_hook is not None and self._rf_done:
            self.uc.hook_del(self._rf_hook)
            self._rf_hook, self._rf_skip = None, None
        if self._halted and self._exits_armed:
            at = self._linear_rip()
            if at in self._exits_armed:  # stopped at an exit address, which unicorn reports as a HLT
                self._halted = False
                self._halted_flag.value = 0
                self._raise_db(self.uc.reg_read(x86.UC_X86_REG_RIP), self._exec_breakpoints[at])
                return None, True
        if self._data_hits and self.trap is None:
            self._raise_db(self.uc.reg_read(x86.UC_X86_REG_RIP), self._take_data_hits())
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
