"""One interpreter vCPU: a unicorn engine on its own thread behind the ``VcpuOps`` interface.

Design (why a dedicated engine thread): unicorn's I/O and MMIO hooks must
answer synchronously, but ``run()`` must *return* ``IoIn``/``MmioRead`` and get
the data filled by the VMM before the instruction completes. So ``emu_start``
runs on an engine thread; a hook that needs the VMM posts the exit and blocks
until the next ``run()`` hands it the completed access. The instruction is
never restarted, so read-modify-write MMIO (``add [mmio], eax``: a read exit,
then a write exit with the computed value) and string I/O (``rep outsb``: one
exit per element, RCX/RSI advancing as on hardware) are exact. The handoff is
two locks used as binary semaphores (``_to_vmm``/``_to_engine``): one
exit costs two thread switches.

Everything the engine leaves out is done on the engine thread while the
engine is stopped: a hook records what happened (exception vector, syscall,
sysenter) and calls ``emu_stop`` from inside emulation (reliable), and the
loop then delivers it (``system.py``). Interrupts from the userspace irqchip
are injected at the boundary where the loop regains control; a per-vCPU
kicker thread stops a running engine when the chip calls ``wake`` or a timer
deadline passes, with ``context.BlockExit`` (never ``emu_stop`` from another
thread: that can make unicorn skip a ``syscall`` or ``cpuid`` hook), repeating
it until the loop acknowledges (a stop issued in the engine's start-up window
is lost). ``hlt`` sleeps on a
condition variable until an interrupt is deliverable, a deadline passes, or
``request_stop`` is called.

Irqchip ports and addresses are served inside the backend (as KVM's in-kernel
irqchip does) and never become exits.
"""

from __future__ import annotations

import threading
import time

from unicorn import UC_ERR_INSN_INVALID, UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UcError
from unicorn import x86_const as x86

from pyvmm.accel.core import (
    Debug,
    GuestDebug,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    StateError,
    VcpuState,
)
from pyvmm.accel.interp import engine, redirect, system
from pyvmm.accel.x86 import CpuidTable
from pyvmm.accel.interp.cpuid import tsc_hz
from pyvmm.accel.interp.engine import NEVER, Engine, host_tsc
from pyvmm.accel.x86 import (
    ARCH,
    SAVED_MSRS,
    SHADOW_STI,
    CpuidEntry,
    FpuState,
    PendingEvents,
    Regs,
    Segment,
    SpecialRegs,
    X86CpuState,
    restorable,
)
from pyvmm.accel.irqchip.delivery import STALE_DEADLINE_RETRY, Delivery, HaltWait, deliver_pending
from pyvmm.arch.x86.insn import ends_with_shadow_instruction
from pyvmm.arch.x86.msrs import MSR_IA32_APIC_BASE as MSR_APIC_BASE
from pyvmm.arch.x86.msrs import MSR_IA32_TSC as MSR_TSC
from pyvmm.arch.x86.msrs import MSR_IA32_TSC_ADJUST as MSR_TSC_ADJUST
from pyvmm.arch.x86.msrs import MSR_IA32_TSC_DEADLINE as MSR_TSC_DEADLINE
from pyvmm.errors import AccelError

STATE_VERSION = 1
U64_MASK = (1 << 64) - 1
APIC_BASE_ENABLE = 1 << 11
#: MSRs holding linear addresses: a non-canonical WRMSR is #GP (FS/GS/KERNEL_GS_BASE, LSTAR, CSTAR,
#: SYSENTER_ESP/EIP)
CANONICAL_ADDRESS_MSRS = frozenset({0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0xC0000083, 0x175, 0x176})


def _canonical(address: int) -> bool:
    """48-bit linear addresses: bits 63:47 all equal (the interpreter offers no LA57)."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1
# An interrupt pending while IF=0 (or in an interrupt shadow): unicorn has no hook on sti/popf/iret,
# so the engine is stopped again after a delay that starts short (spin-lock sections are brief)
# and doubles up to a cap (long cli sections then cost little).
IRQ_WINDOW_FIRST = 0.00002
IRQ_WINDOW_MAX = 0.001
KICK_REPEAT = 0.0002  # a stop request is repeated this often until the loop acknowledges (s)

#: MSRs unicorn implements natively (its helper_rdmsr's cases, QEMU 5.0 target/i386/misc_helper.c;
#: reg_read/reg_write of UC_X86_REG_MSR)
NATIVE_MSRS = frozenset(
    {
        0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
        0x1A0,  # MISC_ENABLE
        0x277,  # PAT
        0x8B,  # UCODE_REV
        0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # EFER STAR LSTAR CSTAR FMASK
        0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,  # FS/GS/KERNEL_GS_BASE, TSC_AUX
        0xFE, 0x2FF, *range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270),  # MTRRs
        0x179, 0x17A, 0x17B, *range(0x400, 0x400 + 4 * 10),  # MCG_CAP/STATUS/CTL, 10 banks of MCi_*
        0x34, 0x198, 0xD90, 0xC0010117,  # SMI_COUNT, PERF_STATUS, BNDCFGS, VM_HSAVE_PA
    }
)  # fmt: skip


def cr4_allowed(cpuid: CpuidTable) -> int:
    """The CR4 bits a CPU with this CPUID accepts (SDM vol. 3 2.5: the others are reserved, #GP)."""
    _, _, ecx1, _ = cpuid.plain.get(1, (0, 0, 0, 0))
    _, ebx7, ecx7, _ = cpuid.indexed.get((7, 0)) or cpuid.plain.get(7, (0, 0, 0, 0))
    eax7_1 = (cpuid.indexed.get((7, 1)) or (0,))[0]
    allowed = 0x7FF  # VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
    for bit, (word, feature) in {11: (ecx7, 2), 12: (ecx7, 16), 13: (ecx1, 5), 14: (ecx1, 6), 16: (ebx7, 0),
                                 17: (ecx1, 17), 18: (ecx1, 26), 20: (ebx7, 7), 21: (ebx7, 20), 22: (ecx7, 3),
                                 23: (ecx7, 7), 24: (ecx7, 31), 28: (eax7_1, 26)}.items():  # fmt: skip
        if word >> feature & 1:
            allowed |= 1 << bit
    return allowed


class EngineLock:
    """Lets one vCPU's engine run at a time, handing over in FIFO order.

    unicorn emulates LOCK-prefixed instructions (``lock cmpxchg``, ``xadd``,
    ``inc``) as plain load/modify/store sequences, so two engines running in
    parallel on shared guest memory break the guest's spinlocks and atomics
    (Linux then sees e.g. TSC warps in its TSC sync check). A waiting vCPU asks
    the running one to stop after ``SLICE`` seconds; stops land between
    translation blocks, so every instruction is atomic with respect to the
    others. A vCPU parked in an I/O exit or asleep in ``hlt`` does not hold it.
    """

    SLICE = 0.002

    def __init__(self):
        self._cond = threading.Condition()
        self._owner = None
        self._queue: list = []

    def acquire(self, vcpu) -> None:
        with self._cond:
            if self._owner is None and not self._queue:
                self._owner = vcpu
                return
            self._queue.append(vcpu)
            if self._owner is not None:
                self._owner.end_slice_soon()
            while self._owner is not None or self._queue[0] is not vcpu:
                self._cond.wait()
            self._queue.pop(0)
            self._owner = vcpu
            if self._queue:  # others queued behind while nobody owned it: they get the next slice
                vcpu.end_slice_soon()

    def release(self, vcpu) -> None:
        with self._cond:
            if self._owner is vcpu:
                self._owner = None
                if self._queue:
                    self._cond.notify_all()


class _Closing(Exception):
    """Raised inside a hook to unwind ``emu_start`` when the vCPU is closed."""


class InterpVcpu(system.EngineHooks):
    def __init__(self, vm, index: int, cpuid: list[CpuidEntry], engine_lock: EngineLock | None = None):
        self.index = index
        self._engine_lock = engine_lock
        self._vm = vm
        self._chip = vm.irqchip
        self.engine = Engine(async_stops=True)
        self.uc = self.engine.uc
        self._memory_changed = True
        self._ram = system.GuestRam()
        self._cpuid = CpuidTable(cpuid)
        self._msr_shadow: dict[int, int] = {}
        self._shutdown = False
        self._halted = False
        self._wait_for_sipi = index != 0  # APs wait for INIT/SIPI, as after power-on
        self._pending: tuple | None = None  # what a hook saw, handled once emu_start returns
        self._in_hook = False  # an exit from inside an instruction is pending
        self._state_replaced = False  # a setter ran while _in_hook
        self._replacement = None  # the context to load once the engine stops
        self._exit = None
        self._io_handler = None  # serve_io_directly(): the VMM's I/O dispatch, called on the engine thread
        # handoff between run() (the VMM's vCPU thread) and the engine thread
        self._to_vmm = threading.Lock()
        self._to_vmm.acquire()
        self._to_engine = threading.Lock()
        self._to_engine.acquire()
        self._engine_thread: threading.Thread | None = None
        self._kicker_thread: threading.Thread | None = None
        # state shared with the kicker and wake callbacks, guarded by _cond
        self._cond = threading.Condition()
        self._closing = False
        self._stop_requested = False
        self._kick = False  # stop the engine if it is running
        self._wakeup = False  # wake the engine if it sleeps (hlt / wait-for-SIPI)
        self._in_emu = False
        self._epoch = 0  # incremented each time emu_start returns
        self._irq_window_due: float | None = None
        self._irq_window_delay = IRQ_WINDOW_FIRST
        self._slice_due: float | None = None  # another vCPU waits for the engine lock
        self._kicked_deadline: float | None = None  # kicker: the past deadline it last stopped the engine for
        self._kicked_at = 0.0
        self._halt_wait = HaltWait(self._chip, index)
        self.exits_posted = 0
        # debugging (set from the VMM's thread while parked, applied by the engine thread)
        self._debug = GuestDebug()
        self._debug_wanted: GuestDebug | None = None
        self._debug_hooks: list = []
        self._watch_hits = 0
        self._step_seen = 0  # instructions begun in this emu_start while single-stepping
        self._block_callback = None
        self._blocks_wanted: tuple | None = None  # (callback or None,) when a change waits
        self._block_hook = None

        self._halted_flag = self.engine.halted
        self._block_exit = self.engine.block_exit
        self.engine.install_hooks(self)
        # IA32_APIC_BASE bits a write must leave clear: 0-7, 9, x2APIC (10: not offered), above MAXPHYADDR
        physical_bits = (self._cpuid.plain.get(0x80000008) or (36,))[0] & 0xFF or 36
        self._apic_base_reserved = (0xFF | 1 << 9 | 1 << 10 | ~((1 << physical_bits) - 1)) & U64_MASK
        self._cr4_allowed = cr4_allowed(self._cpuid)
        self._nmi_blocked = False  # an NMI was delivered and its IRET has not run yet
        self._watching = False
        # RDMSR/WRMSR, CR4/CR8, POPF and IRET reach this vCPU (accel/interp/redirect.py) where possible
        self._helpers_redirected = self.engine.redirect_helpers(self)
        self._reset_state()

    # ------------------------------------------------------------------
    # reset / INIT / SIPI

    def _reset_state(self, cs_selector: int = 0xF000, cs_base: int = 0xFFFF0000, rip: int = 0xFFF0) -> None:
        """The architectural INIT state (real mode), with CS:IP as given."""
        sregs = SpecialRegs()
        sregs.cs = Segment(base=cs_base, selector=cs_selector, type=11)
        sregs.apic_base = self._chip.get_apic_base(self.index)
        self.set_sregs(sregs)
        self.set_regs(Regs(rip=rip, rdx=0x600))
        self.set_fpu(FpuState())
        self.engine.xcr0 = 1  # the architectural reset value (x87 only); unicorn starts at 3

    # ------------------------------------------------------------------
    # memory

    def _sync_memory(self) -> None:
        """Map new RAM slots; every other address up to the physical address width is MMIO (exits)."""
        self.engine.map_memory(list(self._vm.slots.values()), self._mmio_read, self._mmio_write)
        self._ram = system.GuestRam(
            [(guest_addr, memoryview(self._vm.slot_view(slot))) for slot, (guest_addr, _, _, _) in self._vm.slots.items()]
        )
        self._memory_changed = False

    # ------------------------------------------------------------------
    # hooks (engine thread, inside emu_start)

    def _post(self, exit_value):
        """Hand ``exit_value`` to run() and wait until the VMM calls run() again."""
        if self._closing:
            raise _Closing()
        self._exit = exit_value
        self.exits_posted += 1
        self._to_vmm.release()
        self._to_engine.acquire()
        if self._closing:
            raise _Closing()

    def serve_io_directly(self, handler) -> None:
        """Call ``handler(exit)`` for port I/O and MMIO on the engine thread instead of returning them.

        A posted exit costs two thread switches (engine -> run() -> engine), ~70 us each
        access here; Linux's serial console alone makes ~32,000 of them while booting.
        """
        self._io_handler = handler

    def _io_from_hook(self, exit_value) -> bool:
        """Complete an I/O access from inside an instruction; False when it must be dropped.

        The access goes to the VMM's handler on this thread (``serve_io_directly``) or is
        posted to run() as an exit. If the VMM replaced the vCPU state meanwhile (a reset
        at an I/O access), the new state is saved here and loaded once the engine stops;
        the rest of the current translation block runs on regardless (unicorn cannot
        abandon it), with its I/O dropped.
        """
        if self._replacement is not None or self._closing:
            self._block_exit.request()
            return False
        self._in_hook = True
        try:
            if self._io_handler is not None:
                self._io_handler(exit_value)
            elif not self._post_parked(exit_value):
                return False
        finally:
            self._in_hook = False
        if self._state_replaced:
            self._state_replaced = False
            self._replacement = self.uc.context_save()
        if self._stop_requested or self._replacement is not None or self._closing:
            # from inside emulation: never lost; takes effect at the block's end. Not emu_stop: the
            # rest of this block may hold a syscall or cpuid whose hook it would skip.
            self._block_exit.request()
        return True

    def _post_parked(self, exit_value) -> bool:
        """Post an exit while parked mid-instruction; False when the vCPU is closing."""
        lock = self._engine_lock
        if lock is not None:
            lock.release(self)  # parked mid-instruction: other vCPUs may run meanwhile
        try:
            self._post(exit_value)
        except _Closing:
            self._block_exit.request()  # unwound by the loop once emu_start returns (it checks _closing)
            return False
        finally:
            if lock is not None:
                lock.acquire(self)
        return True

    def _state_written(self) -> None:
        if self._in_hook:
            self._state_replaced = True

    def _on_interrupt(self, uc, vector, _):
        if self._replacement is None:
            self._pending = system.exception_record(uc, vector)
        uc.emu_stop()

    def _on_in(self, uc, port, size, _):
        if self._chip.handles_port(port):
            return self._chip.pio_read(self.index, port, size)
        data = bytearray(size)
        if not self._io_from_hook(IoIn(port, memoryview(data))):
            return 0xFFFFFFFF & ((1 << (8 * size)) - 1)
        return int.from_bytes(data, "little")

    def _on_out(self, uc, port, size, value, _):
        if self._chip.handles_port(port):
            self._chip.pio_write(self.index, port, size, value)
            return
        self._io_from_hook(IoOut(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")))

    def _mmio_read(self, uc, offset, size, base):
        addr = base + offset
        if self._chip.handles_mmio(addr):
            return self._chip.mmio_read(self.index, addr, size)
        data = bytearray(size)
        if not self._io_from_hook(MmioRead(addr, memoryview(data))):
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def _mmio_write(self, uc, offset, size, value, base):
        addr = base + offset
        if self._chip.handles_mmio(addr):
            self._chip.mmio_write(self.index, addr, size, value)
            return
        self._io_from_hook(MmioWrite(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")))

    # ------------------------------------------------------------------
    # run() and the engine loop

    def run(self):
        if self._closing:
            return InternalError("vcpu closed", f"interp vCPU {self.index} was closed")
        if self._engine_thread is None:
            self._engine_thread = threading.Thread(target=self._engine_main, name=f"interp-engine-{self.index}", daemon=True)
            self._kicker_thread = threading.Thread(target=self._kicker_main, name=f"interp-kicker-{self.index}", daemon=True)
            self._engine_thread.start()
            self._kicker_thread.start()
        self._to_engine.release()
        self._to_vmm.acquire()
        if self._closing:
            return InternalError("vcpu closed", f"interp vCPU {self.index} was closed while running")
        return self._exit

    def request_stop(self) -> None:
        with self._cond:
            self._stop_requested = True
            self._kick = self._wakeup = True
            self._cond.notify_all()

    def end_slice_soon(self) -> None:
        """Another vCPU waits for the engine lock: stop after one time slice."""
        with self._cond:
            if self._slice_due is None:
                self._slice_due = self._chip.clock() + EngineLock.SLICE
                self._cond.notify_all()

    def wake(self) -> None:
        """The irqchip's ``wake`` callback (any thread): something may be deliverable now."""
        with self._cond:
            self._kick = self._wakeup = True
            self._cond.notify_all()

    def _engine_main(self) -> None:
        self._to_engine.acquire()
        try:
            if not self._closing:
                self._loop()
        except _Closing:
            pass
        except Exception as err:  # a backend bug: report it on every run() rather than hang the VMM
            detail = f"{type(err).__name__}: {err}"
            while not self._closing:
                try:
                    self._post(InternalError("interp backend failure", detail, self._safe_rip()))
                except _Closing:
                    break
        finally:
            self._to_vmm.release()  # never leave run() blocked

    def _safe_rip(self) -> int | None:
        try:
            return self.uc.reg_read(x86.UC_X86_REG_RIP)
        except UcError:
            return None

    def _take_stop(self) -> bool:
        with self._cond:
            stop, self._stop_requested = self._stop_requested, False
            return stop

    def _loop(self) -> None:
        chip = self._chip
        index = self.index
        idle_returns = 0
        last_rip = None
        while not self._closing:
            if self._take_stop():
                self._post(Interrupted())
                continue
            if self._shutdown:
                self._post(Shutdown())
                continue
            chip.poll()
            self._handle_init_sipi()
            if self._wait_for_sipi:
                self._sleep()
                continue
            exit_value = None
            if self._halted:
                if not (chip.has_nmi(index) or (chip.has_interrupt(index) and self._interrupts_enabled())):
                    self._sleep()
                    continue
                self._halted = False
            if self._memory_changed:
                self._sync_memory()  # before a delivery: it reads the IDT and pushes a frame in guest RAM
            if self._debug_wanted is not None or self._blocks_wanted is not None:
                self._apply_debug()
            stepping = self._debug.single_step
            # a single step holds interrupts off, as KVM's BLOCKIRQ and QEMU's gdbstub do
            exit_value = None if stepping else self._inject()
            if exit_value is None:
                self._step_seen = 0
                exit_value, progressed = self._run_engine()
                if exit_value is None and stepping and progressed:
                    exit_value = Debug("step", self._safe_rip())
                if exit_value is None and not progressed:
                    rip = self._safe_rip()
                    idle_returns = idle_returns + 1 if rip == last_rip else 0
                    last_rip = rip
                    if idle_returns > 100000:
                        exit_value = self._internal_error("the engine stops at the same instruction without progress")
                else:
                    idle_returns = 0
            if exit_value is not None:
                self._post(exit_value)

    def _interrupts_enabled(self) -> bool:
        return bool(self.uc.reg_read(x86.UC_X86_REG_RFLAGS) & system.IF)

    def _handle_init_sipi(self) -> None:
        for kind, vector in self._chip.take_init_sipi(self.index):
            if kind == "init":
                self._reset_state()
                self._wait_for_sipi = True
                self._halted = False
            elif kind == "sipi" and self._wait_for_sipi:
                self._reset_state(cs_selector=vector << 8, cs_base=vector << 12, rip=0)
                self._wait_for_sipi = False
                self.uc.ctl_flush_tb()  # other vCPUs may have written the trampoline

    def _sleep(self) -> None:
        """hlt / wait-for-SIPI: block until woken, stopped or the next timer deadline (``HaltWait``)."""
        with self._cond:
            self._halt_wait.wait(self._cond, lambda: self._wakeup or self._stop_requested or self._closing,
                                 timers=not self._wait_for_sipi)  # fmt: skip
            self._wakeup = False

    def _inject(self):
        """Deliver an NMI or a deliverable interrupt at this instruction boundary."""
        try:
            outcome = deliver_pending(self._chip, self.index, self._window_open, self._deliver_interrupt,
                                      self._deliver_nmi, self._nmi_is_blocked)  # fmt: skip
        except system.TripleFault:
            return self._triple_fault()
        except system.Unsupported as err:
            return self._internal_error(str(err))
        if outcome is Delivery.WINDOW:
            # POPF/IRET stop the engine when they may open the window (redirect.watch); a timed
            # look again stays for STI (its window opens one instruction later) and the rest
            self._irq_window_due = self._chip.clock() + self._irq_window_delay
            self._irq_window_delay = min(self._irq_window_delay * 2, IRQ_WINDOW_MAX)
        else:
            self._irq_window_due = None
            if outcome is Delivery.INJECTED:
                self._irq_window_delay = IRQ_WINDOW_FIRST
        self._update_watch()
        return None

    def _nmi_is_blocked(self) -> bool:
        return self._nmi_blocked

    def _update_watch(self) -> None:
        if self._helpers_redirected:
            watching = self._nmi_blocked or self._irq_window_due is not None
            if watching != self._watching:
                self._watching = watching
                self.engine.watch_window(watching)

    def guest_if_set(self) -> None:
        """POPF setting IF is about to run (engine thread): an interrupt waiting for the window is
        taken at the block boundary that follows (right after it: POPF ends its block)."""
        if self._irq_window_due is not None:
            self._block_exit.request()

    def guest_iret(self) -> None:
        """IRET is about to run (engine thread): it ends NMI blocking (SDM vol. 3 6.7.1) and may set IF."""
        if self._nmi_blocked:
            self._nmi_blocked = False
            if self._chip.has_nmi(self.index):
                self._block_exit.request()
        if self._irq_window_due is not None:
            self._block_exit.request()

    def _deliver_interrupt(self, vector: int) -> None:
        system.deliver(self.uc, vector, external=True, ram=self._ram)

    def _deliver_nmi(self) -> None:
        system.deliver(self.uc, system.NMI, external=True, ram=self._ram)
        self._nmi_blocked = self._helpers_redirected  # blocked until IRET, where IRET is seen (redirect)

    def _window_open(self) -> bool:
        """IF = 1 and no interrupt shadow (a stale shadow is dropped first, see ``_shadow_is_stale``)."""
        if not self._interrupts_enabled():
            return False
        if not self.engine.hflags & engine.HF_INHIBIT_IRQ:
            return True
        if self._shadow_is_stale():
            self.engine.clear_shadow()
            return True
        return False

    def _shadow_is_stale(self) -> bool:
        """True when QEMU's interrupt-shadow flag outlived the one instruction it covers.

        The flag is set by sti/mov ss/pop ss and cleared at the end of the next
        translation block. A helper that leaves a block early keeps it: ``sti; pause``
        (QEMU's pause helper exits to the main loop after the pause) left it set at the
        instruction after the pause, where every stop then landed, so an idle loop of
        ``sti; pause; jmp`` never received its timer interrupt (apictimer, 1 run in 4).
        A stop between blocks with a genuine shadow is always right after the
        instruction that made it, so the shadow is real exactly when one ends at RIP.
        """
        state = system.MachineState(self.uc, self._ram)
        before = state.read_bytes((state.segs[engine.CS][1] + state.rip - 8) & ((1 << 64) - 1), 8)
        return bool(before) and not ends_with_shadow_instruction(before, code64=state.code64,
                                                                 addr16=not state.hflags & engine.HF_CS32)

    def _run_engine(self):
        """One ``emu_start`` and whatever stopped it. Returns (exit or None, progressed)."""
        uc = self.uc
        if self._chip.take_cross_cpu_ipi(self.index):
            # Another vCPU's engine may have rewritten code this engine has translated (its
            # writes do not invalidate our blocks). Seen without this: a kprobe-style int3
            # left in a stale block while the memory already held the patched nop; Linux's
            # int3 handler backs RIP up onto it and the vCPU looped there (soft lockup).
            uc.ctl_flush_tb()
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        self._pending = None
        lock = self._engine_lock
        if lock is not None:
            lock.acquire(self)
        with self._cond:
            self._in_emu = True
            self._cond.notify_all()
        error = None
        try:
            uc.emu_start(rip, NEVER)
        except UcError as err:
            if err.errno != engine.STOPPED_ERROR:  # a BlockExit request is a plain stop
                error = err
        except _Closing:
            raise
        except Exception as err:  # an irqchip error raised inside a hook
            error = err
        finally:
            if lock is not None:
                lock.release(self)
            with self._cond:
                self._in_emu = False
                self._epoch += 1
                self._slice_due = None
                self._cond.notify_all()
        if self._closing:
            raise _Closing()
        pending = self._pending
        if self._replacement is not None:
            self._load_replacement()
            return None, True
        if self._watch_hits:  # a watched access: the stop came at the end of its block
            hits, self._watch_hits = self._watch_hits, 0
            return Debug("debug-register", uc.reg_read(x86.UC_X86_REG_RIP), hits), True
        try:
            if pending is not None:
                return self._handle_pending(pending), True
            if isinstance(error, UcError):
                if error.errno == UC_ERR_INSN_INVALID:
                    system.deliver(uc, system.UD, ram=self._ram)
                    return None, True
                return self._internal_error(f"unicorn: {error}"), True
            if error is not None:
                return self._internal_error(f"{type(error).__name__}: {error}"), True
            # OK is returned both for hlt and for a stop; QEMU's CPUState.halted tells them apart
            if self._halted_flag.value == 1:
                self._halted = True
                return None, True
            return None, uc.reg_read(x86.UC_X86_REG_RIP) != rip
        except system.TripleFault:
            return self._triple_fault(), True
        except system.Unsupported as err:
            return self._internal_error(str(err)), True

    def _load_replacement(self) -> None:
        """Load the state the VMM wrote during an exit taken inside an instruction. Translated code
        is dropped: the VMM may have rewritten guest RAM meanwhile (a reset that loads new code)."""
        self.uc.context_restore(self._replacement)
        self._replacement = None
        self.uc.ctl_flush_tb()

    def _handle_pending(self, pending):
        uc = self.uc
        kind = pending[0]
        if kind == "exception" and pending[1] == system.BP and pending[3] and self._debug.software_breakpoints:
            state = system.MachineState(uc, self._ram)
            at = (state.segs[engine.CS][1] + state.rip - 1) & ((1 << 64) - 1)
            if at in self._debug.software_breakpoints:
                uc.reg_write(x86.UC_X86_REG_RIP, state.rip - 1)  # back on the debugger's int3
                return Debug("breakpoint", at)
        try:
            if kind == "exception":
                _, vector, error_code, software, cr2 = pending
                system.deliver(uc, vector, error_code=error_code, software=software, cr2=cr2, ram=self._ram)
            elif kind == "syscall":
                system.do_syscall(uc, uc.reg_read(x86.UC_X86_REG_RIP))
            elif kind == "sysenter":
                system.do_sysenter(uc, uc.reg_read(x86.UC_X86_REG_RIP))
        except system.Fault as fault:
            system.deliver(uc, fault.vector, error_code=fault.error_code, cr2=fault.cr2, ram=self._ram)
        return None

    def _triple_fault(self):
        self._shutdown = True
        return Shutdown("triple fault")

    def _internal_error(self, reason: str) -> InternalError:
        try:
            state = system.MachineState(self.uc, self._ram)
            insn = state.read_bytes(state.segs[engine.CS][1] + state.rip, 15)
            rip = state.rip
        except Exception:  # noqa: BLE001 - a report must not fail
            insn, rip = b"", self._safe_rip()
        detail = f"vcpu {self.index} at rip {rip:#x}: {reason}; instruction bytes: {insn.hex(' ') or 'unreadable'}"
        return InternalError(reason, detail, rip)

    # ------------------------------------------------------------------
    # the kicker: stops a running engine on wake/stop/timer deadlines

    def _kicker_main(self) -> None:
        cond, chip = self._cond, self._chip
        while True:
            with cond:
                while True:
                    if self._closing:
                        return
                    if not self._in_emu:
                        cond.wait()
                        continue
                    if self._kick:
                        break
                    due = chip.next_deadline(self.index)
                    for extra in (self._irq_window_due, self._slice_due):
                        if extra is not None and (due is None or extra < due):
                            due = extra
                    if due is not None:
                        timeout = due - chip.clock()
                        if timeout <= 0:
                            now = chip.clock()
                            if due != self._kicked_deadline or now - self._kicked_at >= STALE_DEADLINE_RETRY:
                                self._kicked_deadline, self._kicked_at = due, now
                                break
                            timeout = STALE_DEADLINE_RETRY  # not consumed by poll() yet: retry, never drop
                    cond.wait(None if due is None else timeout)
                self._kick = False
                epoch = self._epoch
            while True:
                with cond:
                    if self._epoch != epoch or not self._in_emu or self._closing:
                        break
                    if not self._debug.single_step:  # a step ends by itself, and must not be cut mid-store
                        self._block_exit.request()
                    cond.wait(KICK_REPEAT)

    # ------------------------------------------------------------------
    # state

    def get_regs(self) -> Regs:
        return self.engine.read_regs()

    def set_regs(self, regs: Regs) -> None:
        self._state_written()
        self.engine.write_regs(regs)

    def get_sregs(self) -> SpecialRegs:
        # CR8 is the local APIC's TPR[7:4], as KVM reports it with its in-kernel APIC
        return self.engine.read_sregs(cr8=self._chip.get_tpr(self.index) >> 4,
                                      apic_base=self._chip.get_apic_base(self.index))  # fmt: skip

    def set_sregs(self, sregs: SpecialRegs) -> None:
        self._state_written()
        if sregs.cr8 != self._chip.get_tpr(self.index) >> 4:  # unchanged: TPR[3:0] are kept
            self._chip.set_tpr(self.index, (sregs.cr8 & 0xF) << 4)
        if sregs.apic_base != self._chip.get_apic_base(self.index):
            self._chip.set_apic_base(self.index, sregs.apic_base)
        self.engine.write_sregs(sregs)
        self._shutdown = False

    def get_fpu(self) -> FpuState:
        return self.engine.read_fpu()

    def set_fpu(self, fpu: FpuState) -> None:
        self._state_written()
        self.engine.write_fpu(fpu)

    def get_xcr0(self) -> int:
        return self.engine.xcr0

    def set_xcr0(self, value: int) -> None:
        self._state_written()
        self.engine.xcr0 = value

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        out = {}
        for msr in indices:
            if msr == MSR_APIC_BASE:
                out[msr] = self._chip.get_apic_base(self.index)
            elif msr == MSR_TSC:
                out[msr] = (host_tsc() + self.engine.tsc_offset) & ((1 << 64) - 1)
            elif msr in NATIVE_MSRS:
                out[msr] = self.uc.reg_read(x86.UC_X86_REG_MSR, msr)
            else:
                out[msr] = self._msr_shadow.get(msr, 0)
        return out

    def set_msrs(self, msrs: dict[int, int]) -> None:
        self._state_written()
        for msr, value in msrs.items():
            if msr == MSR_APIC_BASE:
                self._chip.set_apic_base(self.index, value)
            elif msr == MSR_TSC:
                self.engine.tsc_offset = self._vm.tsc_offset_for(value)
            elif msr in NATIVE_MSRS:
                self.uc.reg_write(x86.UC_X86_REG_MSR, (msr, value))
            else:
                # not implemented by the engine: the guest's RDMSR reads 0; kept here so state moves intact
                self._msr_shadow[msr] = value

    # ------------------------------------------------------------------
    # RDMSR, WRMSR and CR8 (accel/interp/redirect.py: on the engine thread, mid-instruction)

    def guest_rdmsr(self, msr: int) -> tuple[int, int]:
        """IA32_APIC_BASE from the irqchip, IA32_TSC and IA32_TSC_ADJUST as the SDM ties them; the
        rest as unicorn has them."""
        if msr == MSR_APIC_BASE:
            return redirect.HANDLED, self._chip.get_apic_base(self.index)
        if msr == MSR_TSC:
            return redirect.HANDLED, (host_tsc() + self.engine.live_tsc_offset) & U64_MASK
        if msr == MSR_TSC_ADJUST:
            return redirect.HANDLED, self._msr_shadow.get(MSR_TSC_ADJUST, 0)
        if msr == MSR_TSC_DEADLINE:
            return redirect.HANDLED, self._chip.get_tsc_deadline(self.index)
        return self._other_msr(msr, None)

    def guest_wrmsr(self, msr: int, value: int) -> int:
        if msr in CANONICAL_ADDRESS_MSRS and not _canonical(value):
            return redirect.GENERAL_PROTECTION  # unicorn stored any value; the CPU raises #GP (SDM WRMSR)
        if msr == MSR_APIC_BASE:
            if value & self._apic_base_reserved:  # reserved bits, x2APIC (not offered), beyond MAXPHYADDR
                return redirect.GENERAL_PROTECTION
            self._chip.set_apic_base(self.index, value)
            return redirect.HANDLED
        if msr == MSR_TSC:  # IA32_TSC_ADJUST moves by as much as the TSC (SDM 18.17.3)
            now = (host_tsc() + self.engine.live_tsc_offset) & U64_MASK
            self.engine.live_tsc_offset = (value - host_tsc()) & U64_MASK
            self._msr_shadow[MSR_TSC_ADJUST] = (self._msr_shadow.get(MSR_TSC_ADJUST, 0) + value - now) & U64_MASK
            return redirect.HANDLED
        if msr == MSR_TSC_DEADLINE:  # the clock time this vCPU's TSC reaches the value
            now = self._chip.clock()
            ahead = value - ((host_tsc() + self.engine.live_tsc_offset) & U64_MASK)
            self._chip.set_tsc_deadline(self.index, value, now + max(ahead, 0) / tsc_hz() if value else None)
            return redirect.HANDLED
        if msr == MSR_TSC_ADJUST:  # and the TSC by as much as IA32_TSC_ADJUST
            adjust = self._msr_shadow.get(MSR_TSC_ADJUST, 0)
            self.engine.live_tsc_offset = self.engine.live_tsc_offset + value - adjust
            self._msr_shadow[MSR_TSC_ADJUST] = value
            return redirect.HANDLED
        return self._other_msr(msr, value)[0]

    def _other_msr(self, msr: int, value: int | None) -> tuple[int, int]:
        """An MSR pyvmm does not model: unicorn's own where it implements it; one another backend's
        state brought along (``set_msrs``) keeps working from the shadow; any other is #GP, as the
        CPU raises for an MSR it does not have (unicorn read 0 and dropped writes)."""
        if msr in NATIVE_MSRS:
            return redirect.NATIVE, 0
        if msr in self._msr_shadow:
            if value is not None:
                self._msr_shadow[msr] = value
            return redirect.HANDLED, self._msr_shadow[msr]
        return redirect.GENERAL_PROTECTION, 0

    def _apic_enabled(self) -> bool:
        return bool(self._chip.get_apic_base(self.index) & APIC_BASE_ENABLE)

    def guest_write_cr4(self, value: int) -> int:
        """#GP for a CR4 bit the CPUID does not offer (unicorn would drop it silently)."""
        if value & ~self._cr4_allowed:
            return redirect.GENERAL_PROTECTION
        return redirect.NATIVE

    def guest_read_cr8(self) -> int:
        return self._chip.get_tpr(self.index) >> 4

    def guest_write_cr8(self, value: int) -> int:
        if value & ~0xF:
            return redirect.GENERAL_PROTECTION  # CR8[63:4] are reserved
        self._chip.set_tpr(self.index, value << 4)
        return redirect.HANDLED

    def get_events(self) -> PendingEvents:
        """Nothing is ever half-delivered here (delivery is done between engine runs); the shadow may be set."""
        shadow = bool(self.engine.hflags & engine.HF_INHIBIT_IRQ) and not self._shadow_is_stale()
        return PendingEvents(shadow=SHADOW_STI if shadow else 0)

    def set_events(self, events: PendingEvents) -> None:
        """Deliver what another backend was injecting, and take over its interrupt shadow."""
        self._state_written()
        blob = engine.Blob(self.uc)
        blob.hflags = (blob.hflags | engine.HF_INHIBIT_IRQ) if events.shadow else (blob.hflags & ~engine.HF_INHIBIT_IRQ)
        blob.restore()
        if events.injecting and self._memory_changed:
            self._sync_memory()  # delivery reads the IDT and pushes a frame: guest RAM must be mapped
        if events.injecting:
            self._halted = False  # a delivered event ends the HLT state (its handler returns past the HLT)
        try:
            if events.exception is not None:
                system.deliver(self.uc, events.exception, error_code=events.exception_error_code, ram=self._ram)
            elif events.nmi_injected:
                system.deliver(self.uc, system.NMI, external=True, ram=self._ram)
            elif events.interrupt is not None:
                system.deliver(self.uc, events.interrupt, software=events.interrupt_soft,
                               external=not events.interrupt_soft, ram=self._ram)  # fmt: skip
        except system.TripleFault:
            self._shutdown = True
        except system.Unsupported as err:
            raise AccelError("interp", f"vCPU {self.index}: cannot deliver the pending event: {err}") from err

    def save_state(self) -> VcpuState:
        mp_state = "wait-for-sipi" if self._wait_for_sipi else "halted" if self._halted else "runnable"
        cpu = X86CpuState(
            regs=self.get_regs(), sregs=self.get_sregs(), fpu=self.get_fpu(), xcr0=self.get_xcr0(),
            msrs=self.get_msrs(list(SAVED_MSRS)), events=self.get_events(), mp_state=mp_state,
        )  # fmt: skip
        return VcpuState("interp", ARCH, STATE_VERSION, cpu, {"msr_shadow": dict(self._msr_shadow)})

    def restore_state(self, state: VcpuState) -> None:
        try:
            cpu = restorable(state, "interp", STATE_VERSION)
        except StateError as err:
            raise AccelError("interp", str(err)) from err
        self.set_sregs(cpu.sregs)
        self.set_regs(cpu.regs)
        self.set_fpu(cpu.fpu)
        self.set_xcr0(cpu.xcr0)
        self.set_msrs(cpu.msrs)
        if state.backend == "interp":
            self._msr_shadow.update(state.private.get("msr_shadow", {}))
        self._wait_for_sipi = cpu.mp_state == "wait-for-sipi"
        self._halted = cpu.mp_state == "halted"
        self.set_events(cpu.events)

    # ------------------------------------------------------------------
    # debugging and tracing (called while the vCPU is not running; applied before it runs again)

    def set_guest_debug(self, debug: GuestDebug) -> None:
        """Single steps stop before the second instruction an emu_start begins; the debugger's int3s
        are told from the guest's at #BP; DR7's data watchpoints are memory hooks on the linear range
        (x86's are linear too) whose stop lands at the end of the translation block holding the
        access (straight-line code: up to a few instructions after it); DR7's instruction
        breakpoints are not taken (see _apply_debug). The debugger's int3s are in guest RAM:
        translated code is dropped so the engine sees them."""
        self._debug_wanted = debug

    def trace_blocks(self, callback) -> None:
        self._blocks_wanted = (callback,)

    def _apply_debug(self) -> None:
        uc = self.uc
        if self._debug_wanted is not None:
            debug, self._debug_wanted = self._debug_wanted, None
            for handle in self._debug_hooks:
                uc.hook_del(handle)
            self._debug_hooks = []
            if debug.single_step:
                # a code hook stops before the second instruction; mid-block stops are off in this
                # engine (engine._disable_midblock_exits), so they are turned on while stepping, and
                # the kicker leaves the engine alone meanwhile (the step ends by itself)
                self._debug_hooks.append(uc.hook_add(UC_HOOK_CODE, self._on_step))
            self.engine.exact_stops(debug.single_step)
            for slot in range(4):
                if not debug.dr7 >> (2 * slot) & 3:
                    continue
                address = debug.addresses[slot]
                access = debug.dr7 >> (16 + 4 * slot) & 3
                length = (1, 2, 8, 4)[debug.dr7 >> (18 + 4 * slot) & 3]
                # instruction breakpoints (access 0) are not taken here: a hook could not stop before a
                # mid-block instruction; debuggers put an int3 there (pyvmm/gdb/machine.py)
                if access in (1, 3):  # 2: I/O breakpoints, not offered
                    kinds = UC_HOOK_MEM_WRITE | (UC_HOOK_MEM_READ if access == 3 else 0)
                    self._debug_hooks.append(uc.hook_add(kinds, self._on_watch, slot, address, address + length - 1))
            self._debug = debug
        if self._blocks_wanted is not None:
            (callback,), self._blocks_wanted = self._blocks_wanted, None
            if self._block_hook is not None:
                uc.hook_del(self._block_hook)
                self._block_hook = None
            self._block_callback = callback
            if callback is not None:
                self._block_hook = uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        uc.ctl_flush_tb()

    def _on_step(self, uc, address, size, _data) -> None:
        self._step_seen += 1
        if self._step_seen == 2:
            uc.reg_write(x86.UC_X86_REG_RIP, address)  # unicorn leaves this instruction unexecuted
            uc.emu_stop()

    def _on_watch(self, uc, access, address, size, value, slot) -> None:
        self._watch_hits |= 1 << slot
        uc.emu_stop()

    def _on_block(self, uc, address, size, _data) -> None:
        callback = self._block_callback
        if callback is not None:
            callback(address, size, self.engine.physical_address(address))

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        if not entries:
            raise AccelError("interp", "set_cpuid: empty CPUID table")
        self._cpuid = CpuidTable(list(entries))
        self._cr4_allowed = cr4_allowed(self._cpuid)

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._engine_thread is not None:
            self._block_exit.request()
            self._to_engine.release()
            deadline = time.monotonic() + 2
            while self._engine_thread.is_alive() and time.monotonic() < deadline:
                self._block_exit.request()
                self._engine_thread.join(0.01)
            self._kicker_thread.join(1)
        self.engine.release_helpers()
