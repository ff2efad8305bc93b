"""What a hypervisor backend without in-kernel interrupt controllers does around its run call.

Hypervisor.framework (Intel) and WHPX (as pyvmm drives it) leave the LAPIC,
IOAPIC, PIC and PIT to the VMM: the VM-level userspace irqchip
(``accel/irqchip``). ``HypervisorVcpu`` holds the part of such a vCPU that does
not depend on the hypervisor:

* the loop around one hypervisor run (``_run_once``, the backend's): timer
  polling, INIT/SIPI, ``hlt`` (the vCPU sleeps in the VMM until an interrupt is
  deliverable), interrupt and NMI delivery at an instruction boundary, and an
  interrupt-window request when the guest cannot take one yet;
* port I/O and MMIO routing: irqchip ports and pages are served here, the rest
  goes to the VMM's handler (``serve_io_directly``) or becomes an exit;
* instructions the hypervisor leaves undecoded (MMIO, string I/O) are executed
  by the interpreter's stepper, with their accesses routed the same way;
* stopping: ``request_stop``/``wake`` kick a running vCPU out of the
  hypervisor, repeating the kick until the run call has returned, because a
  kick that lands just before the run call starts may be lost; a kicker thread
  does the same when the irqchip's next timer deadline passes;
* guest debugging (``set_guest_debug``, the "guest debugging" part of ``HypervisorVcpu``): what a
  #DB or #BP the hypervisor intercepted means, single steps with interrupts held off, the
  debugger's TF hidden from the guest's registers and from a stepped PUSHF's image.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from pyvmm.accel.core import (
    Debug,
    EmulationFailure,
    GuestDebug,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    StateError,
    VcpuState,
)
from pyvmm.accel.irqchip.delivery import STALE_DEADLINE_RETRY, Delivery, HaltWait, deliver_pending
from pyvmm.accel.x86 import ARCH, SAVED_MSRS, CpuidTable, PendingEvents, Regs, Segment, SpecialRegs, X86CpuState, restorable
from pyvmm.arch.x86.pc import PAGE_SIZE
from pyvmm.arch.x86 import paging
from pyvmm.arch.x86.registers import RFLAGS_IF, RFLAGS_RF, RFLAGS_TF
from pyvmm.errors import AccelError, PyvmmError

KICK_REPEAT = 0.0005  # a kick is repeated this often until the run call returns (s)
DB, BP = 1, 3  # the debug exception and the breakpoint exception (INT3)
DR6_B_BITS, DR6_BS = 0xF, 1 << 14  # SDM vol. 3B 17.2.3: which DR0-DR3 hit; a single step
DR7_ENABLE = 0xFF  # L0-L3, G0-G3
_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))


def init_state(cs_selector: int = 0xF000, cs_base: int = 0xFFFF0000, rip: int = 0xFFF0) -> tuple[Regs, SpecialRegs]:
    """The architectural INIT state (real mode) with CS:IP as given; a SIPI gives vector << 8 : 0."""
    sregs = SpecialRegs()
    sregs.cs = Segment(base=cs_base, selector=cs_selector, type=11)
    return Regs(rip=rip, rdx=0x600), sregs


class HypervisorVm:
    """What the VMs of hypervisors without in-kernel irqchips share (HVF, WHPX): the vCPU table,
    the VM-level userspace irqchip, guest RAM slots and the CPUID model they present.

    A subclass sets ``name`` and ``vcpu_class`` and calls ``_init_platform`` in its constructor."""

    name = "?"
    vcpu_class = None

    def _init_platform(self, vcpu_count: int, irqchip) -> None:
        if irqchip is None:
            from pyvmm.accel.irqchip import Irqchip

            irqchip = Irqchip(vcpu_count)
        self.vcpu_count = vcpu_count
        self.irqchip = irqchip
        self.vcpus: dict[int, HypervisorVcpu] = {}
        self.slots: dict[int, tuple[int, object]] = {}  # slot -> (guest_addr, host buffer)
        self._supported = None

    def _wake(self, index: int) -> None:
        vcpu = self.vcpus.get(index)
        if vcpu is not None:
            vcpu.wake()

    def ram_at(self, gpa: int, size: int):
        """(buffer, offset) when ``gpa``..+size lies in one RAM slot, else None."""
        for start, buf in self.slots.values():
            if start <= gpa and gpa + size <= start + len(buf):
                return buf, gpa - start
        return None

    def in_ram(self, gpa: int) -> bool:
        return self.ram_at(gpa, 1) is not None

    def supported_cpuid(self):
        """The interpreter's baseline model: what the stepper can also execute for these backends."""
        if self._supported is None:
            from pyvmm.accel.interp.cpuid import supported_cpuid

            self._supported = supported_cpuid(self.irqchip.LAPIC_TIMER_HZ)
        return list(self._supported)

    def create_vcpu(self, index: int):
        if not 0 <= index < self.vcpu_count:
            raise AccelError(self.name, f"vCPU index {index} is outside 0..{self.vcpu_count - 1}")
        if index in self.vcpus:
            raise AccelError(self.name, f"vCPU {index} already exists")
        vcpu = self.vcpu_class(self, index)
        self.vcpus[index] = vcpu
        return vcpu

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.irqchip.set_irq_line(irq, level)

    def _close_vcpus(self) -> None:
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.vcpus.clear()


class SlotMemory:
    """Guest RAM as the stepper sees it (``regions`` of guest_addr, size, buffer), from a VM's slots."""

    def __init__(self, slots: dict[int, tuple[int, object]]):
        self.regions = [SimpleNamespace(guest_addr=addr, size=len(buf), buffer=buf) for addr, buf in slots.values()]


class _Bus:
    """The stepper's view of port I/O or MMIO: irqchip first, then the VMM's handler."""

    def __init__(self, vcpu: HypervisorVcpu, mmio: bool):
        self.vcpu, self.is_mmio = vcpu, mmio

    def read(self, addr: int, data: memoryview) -> None:
        self.vcpu._access(MmioRead(addr, data) if self.is_mmio else IoIn(addr, data))

    def write(self, addr: int, data) -> None:
        self.vcpu._access(MmioWrite(addr, bytes(data)) if self.is_mmio else IoOut(addr, bytes(data)))


class HypervisorVcpu:
    """The hypervisor-neutral part of a vCPU served by the userspace irqchip; see the module text.

    A backend subclass provides ``_run_once()`` (one hypervisor run; returns an exit for the
    VMM or None), ``_hv_kick()`` (make a run in progress return; callable from any thread),
    ``_window_open()``, ``_inject(vector)``, ``_inject_nmi()``, ``_request_window(on)`` and the
    register accessors of ``accel/x86.py``.
    """

    backend = "?"

    def __init__(self, vm, index: int):
        self.index = index
        self._vm = vm
        self._chip = vm.irqchip
        self._cpuid_entries: list = []
        self._cpuid = CpuidTable([])
        self._io_handler = None
        self._emulator = None
        self._cond = threading.Condition()
        self._stop_requested = False
        self._kick_wanted = False
        self._in_run = False
        self._epoch = 0
        self._closing = False
        self._halted = False
        self._wait_for_sipi = index != 0
        self._kicker: threading.Thread | None = None
        self._halt_wait = HaltWait(self._chip, index)
        self._msr_shadow: dict[int, int] = {}  # MSRs the hypervisor leaves to the VMM (RDMSR/WRMSR exits)
        # guest debugging (see "guest debugging" below)
        self._debug = GuestDebug()
        self._guest_tf = False  # TF was the guest's own when the debugger began to step
        self._guest_drs: tuple | None = None  # the guest's DR0-DR3, DR7 while the debugger owns them
        self._completed = False  # the last exit's instruction was completed by the VMM (RIP moved on)
        self._step_after_exit = False  # a step ends once the VMM has handled the exit returned last
        self._resume_rf: int | None = None  # RIP of an instruction breakpoint to step over (RFLAGS.RF)
        self._step_from: bytes | None = None  # the code at the start of the step under way

    # ------------------------------------------------------------------ I/O
    def serve_io_directly(self, handler) -> None:
        """Call ``handler(exit)`` for port I/O and MMIO on the vCPU's thread instead of returning them."""
        self._io_handler = handler

    def _access(self, access) -> None:
        """One access of an emulated instruction: irqchip, else the VMM's handler (synchronous)."""
        chip, kind = self._chip, type(access)
        if kind is IoIn or kind is IoOut:
            if chip.handles_port(access.port):
                if kind is IoIn:
                    access.data[:] = chip.pio_read(self.index, access.port, len(access.data)).to_bytes(len(access.data), "little")
                else:
                    chip.pio_write(self.index, access.port, len(access.data), int.from_bytes(access.data, "little"))
                return
        elif chip.handles_mmio(access.addr):
            if kind is MmioRead:
                access.data[:] = chip.mmio_read(self.index, access.addr, len(access.data)).to_bytes(len(access.data), "little")
            else:
                chip.mmio_write(self.index, access.addr, len(access.data), int.from_bytes(access.data, "little"))
            return
        if self._io_handler is None:
            raise AccelError(self.backend, f"vCPU {self.index}: an emulated instruction's {kind.__name__} needs the "
                                           "VMM's I/O handler (serve_io_directly)")  # fmt: skip
        self._io_handler(access)

    def _port_io(self, port: int, data, is_in: bool):
        """A decoded IN/OUT: served here or by the handler (None), or the exit for the VMM."""
        access = IoIn(port, data) if is_in else IoOut(port, data)
        if self._chip.handles_port(port) or self._io_handler is not None:
            self._access(access)
            return None
        return access

    def _emulate(self, rip: int) -> None:
        """Execute the instruction at ``rip`` in the interpreter's stepper (MMIO, string I/O)."""
        if self._emulator is None:
            from pyvmm.accel.fallback.manager import FallbackManager

            bus_pio, bus_mmio = _Bus(self, mmio=False), _Bus(self, mmio=True)
            self._emulator = FallbackManager(SlotMemory(self._vm.slots), bus_pio, bus_mmio, self._vm.capabilities,
                                             hypervisor=self._vm.title, why="leaves to the VMM")  # fmt: skip
            self._emulator.set_cpuid(self.index, self._cpuid_entries)
        try:
            self._emulator(self, EmulationFailure(rip, b""))
        except PyvmmError:
            raise
        except Exception as err:  # the stepper's own failure: say where
            raise AccelError(self.backend, f"vCPU {self.index}: emulating the instruction at {rip:#x} failed: {err}") from err

    # ------------------------------------------------------------------ CPUID
    def set_cpuid(self, entries) -> None:
        if not entries:
            raise AccelError(self.backend, "set_cpuid: empty CPUID table")
        self._cpuid_entries = list(entries)
        self._cpuid = CpuidTable(self._cpuid_entries)
        if self._emulator is not None:
            self._emulator.set_cpuid(self.index, self._cpuid_entries)

    def cpuid_answer(self, leaf: int, index: int, cr4: int) -> tuple[int, int, int, int]:
        return self._cpuid.lookup(leaf & 0xFFFFFFFF, index & 0xFFFFFFFF, cr4)

    # ------------------------------------------------------------------ stopping and waking
    def request_stop(self) -> None:
        """From any thread: the current or next ``run()`` returns ``Interrupted`` promptly."""
        with self._cond:
            self._stop_requested = True
        self.wake()

    def wake(self) -> None:
        """The irqchip's wake callback (any thread): something may be deliverable now."""
        with self._cond:
            self._kick_wanted = True
            self._cond.notify_all()

    def _enter_run(self) -> bool:
        """Just before the hypervisor run: False when a stop or kick is already due (do not enter)."""
        with self._cond:
            if self._stop_requested or self._kick_wanted or self._closing:
                self._kick_wanted = False
                return False
            self._in_run = True
            self._cond.notify_all()
            return True

    def _left_run(self) -> None:
        with self._cond:
            self._in_run = False
            self._kick_wanted = False
            self._epoch += 1
            self._cond.notify_all()

    def _start_kicker(self) -> None:
        if self._kicker is None:
            self._kicker = threading.Thread(target=self._kicker_main, name=f"{self.backend}-kicker-{self.index}",
                                            daemon=True)  # fmt: skip
            self._kicker.start()

    def _kicker_main(self) -> None:
        """Kick the running vCPU when asked to or when a timer deadline passes; repeat until it left the run."""
        cond, chip = self._cond, self._chip
        last_kicked_due = None
        while True:
            with cond:
                while True:
                    if self._closing:
                        return
                    if not self._in_run:
                        cond.wait()
                        continue
                    if self._kick_wanted:
                        break
                    due = chip.next_deadline(self.index)
                    if due is not None:
                        timeout = due - chip.clock()
                        if timeout <= 0 and due != last_kicked_due:
                            last_kicked_due = due
                            break
                        timeout = max(timeout, STALE_DEADLINE_RETRY)
                    cond.wait(None if due is None else timeout)
                epoch = self._epoch
            while True:
                self._hv_kick()
                with cond:
                    if self._epoch != epoch or not self._in_run or self._closing:
                        break
                    cond.wait(KICK_REPEAT)

    def _sleep(self) -> None:
        """hlt / wait-for-SIPI: block until woken, stopped or the next timer deadline (``HaltWait``)."""
        with self._cond:
            self._halt_wait.wait(self._cond, lambda: self._kick_wanted or self._stop_requested or self._closing,
                                 timers=not self._wait_for_sipi)  # fmt: skip
            self._kick_wanted = False

    def _take_stop(self) -> bool:
        with self._cond:
            stop, self._stop_requested = self._stop_requested, False
            return stop

    # ------------------------------------------------------------------ the loop
    def _complete_pending(self) -> None:
        """Finish the instruction of the exit returned last (the VMM has filled its data)."""

    def run(self):
        if self._closing:
            return Interrupted()
        self._start_kicker()
        self._complete_pending()
        if self._step_after_exit:
            self._step_after_exit = False
            if self._debug.single_step:  # the VMM finished the exit's instruction: that was the step
                return Debug("step", self._linear_rip())
        self._before_resume()
        chip, index = self._chip, self.index
        while True:
            if self._take_stop():
                return Interrupted()
            chip.poll()
            self._handle_init_sipi()
            if self._wait_for_sipi:
                self._sleep()
                continue
            if self._halted:
                if not (chip.has_nmi(index) or (chip.has_interrupt(index) and self._interrupts_enabled())):
                    self._sleep()
                    continue
                self._halted = False
            stepping = self._debug.single_step
            if stepping:  # a single step holds interrupts off (KVM's BLOCKIRQ): nothing is injected
                self._request_window(False)
                self._step_from = self._read_linear(self._linear_rip(), 16)
            else:
                outcome = deliver_pending(chip, index, self._window_open, self._inject, self._inject_nmi)
                self._request_window(outcome is Delivery.WINDOW)
            self._completed = False
            exit_value = self._run_once()
            if stepping and self._completed:
                # VMX and WHPX exits come instead of the instruction; the VMM completed it, so no TF
                # trap follows it (KVM ends the step itself too: kvm_skip_emulated_instruction)
                if exit_value is None:
                    return Debug("step", self._linear_rip())
                self._step_after_exit = True
            if exit_value is not None:
                return exit_value

    def _interrupts_enabled(self) -> bool:
        """RFLAGS.IF (a backend reads just that register where it can)."""
        return bool(self.get_regs().rflags & RFLAGS_IF)

    def _handle_init_sipi(self) -> None:
        for kind, vector in self._chip.take_init_sipi(self.index):
            if kind == "init":
                self._load_init_state(*init_state())
                self._wait_for_sipi = True
                self._halted = False
            elif kind == "sipi" and self._wait_for_sipi:
                self._load_init_state(*init_state(vector << 8, vector << 12, 0))
                self._wait_for_sipi = False

    def _load_init_state(self, regs: Regs, sregs: SpecialRegs) -> None:
        sregs.apic_base = self._chip.get_apic_base(self.index)
        self.set_sregs(sregs)
        self.set_regs(regs)

    # ------------------------------------------------------------------ guest debugging
    # A backend provides ``_apply_guest_debug(debug)`` (what makes its hypervisor intercept #DB/#BP),
    # ``_read_rflags()``/``_write_rflags(value)`` (raw, unlike get_regs), ``_read_drs()``/
    # ``_write_drs(addresses, dr7)``, ``_cs_base()`` and ``_reinject(vector, length, dr6)`` (give the
    # guest its own #DB or #BP), and calls ``_debug_exception`` for an intercepted #DB/#BP.
    def set_guest_debug(self, debug: GuestDebug) -> None:
        """Single steps through RFLAGS.TF with #DB intercepted; the debugger's int3s through #BP
        intercepted; hardware breakpoints in DR0-DR3/DR7 (the guest's own values are kept meanwhile
        and given back once the debugger's are off). How each hypervisor intercepts: the backend's
        ``_apply_guest_debug``."""
        old = self._debug
        if debug.dr7 & DR7_ENABLE:
            if self._guest_drs is None:
                self._guest_drs = self._read_drs()
            self._write_drs(debug.addresses, debug.dr7)
        elif self._guest_drs is not None:
            self._write_drs(*self._guest_drs)
            self._guest_drs = None
        if debug.single_step != old.single_step:
            rflags = self._read_rflags()
            if debug.single_step:
                self._guest_tf = bool(rflags & RFLAGS_TF)
                self._write_rflags(rflags | RFLAGS_TF)
            elif not self._guest_tf:
                self._write_rflags(rflags & ~RFLAGS_TF)
        self._debug = debug
        self._apply_guest_debug(debug)

    def _apply_guest_debug(self, debug: GuestDebug) -> None:
        """The hypervisor's side (the exception bitmap on HVF; WHPX intercepts #DB/#BP from set-up)."""

    def _debugger_tf(self) -> bool:
        """TF in RFLAGS is the debugger's, not the guest's (hidden from reads, kept across writes, as KVM's
        kvm_get_rflags/kvm_set_rflags do)."""
        return self._debug.single_step and not self._guest_tf

    def _guest_rflags(self, rflags: int) -> int:
        return rflags & ~RFLAGS_TF if self._debugger_tf() else rflags

    def _hardware_rflags(self, rflags: int) -> int:
        return rflags | RFLAGS_TF if self._debugger_tf() else rflags

    def _linear_rip(self) -> int:
        return (self._cs_base() + self._read_rip()) & 0xFFFFFFFFFFFFFFFF

    def _before_resume(self) -> None:
        """Resuming at an instruction breakpoint's instruction: RF makes it run once without hitting
        again (SDM vol. 3B 17.3.1.1: the CPU sets RF in the RFLAGS image of the fault's delivery; an
        intercepted fault leaves that to the VMM)."""
        at, self._resume_rf = self._resume_rf, None
        if at is not None and self._linear_rip() == at:
            self._write_rflags(self._read_rflags() | RFLAGS_RF)

    def _debug_exception(self, vector: int, rip: int, *, length: int = 0, dr6: int = 0):
        """An intercepted #DB or #BP (``rip`` as the exit reports it: on the INT3, past a trap): the
        debugger's Debug exit, or None once the guest's own exception has been handed back to it."""
        debug = self._debug
        at = (self._cs_base() + rip) & 0xFFFFFFFFFFFFFFFF
        if vector == BP:
            if at in debug.software_breakpoints:
                return Debug("breakpoint", at)  # RIP stays on the int3 the debugger will take out
            self._reinject(BP, length, 0)  # the guest's own int3 (Linux uses them: jump labels, kprobes)
            return None
        mine = dr6 & DR6_B_BITS & _enabled_slots(debug.dr7)
        if mine:
            if any(mine >> slot & 1 and not debug.dr7 >> (16 + 4 * slot) & 3 for slot in range(4)):
                self._resume_rf = at  # an instruction breakpoint is a fault: RIP is on the instruction
            if dr6 & DR6_BS and debug.single_step:
                self._fix_pushed_flags()
            return Debug("debug-register", at, dr6)
        if dr6 & DR6_BS and debug.single_step:  # while the debugger steps, every TF trap is its step (as KVM)
            self._fix_pushed_flags()
            return Debug("step", at, dr6)
        self._reinject(DB, 0, dr6)  # the guest's own single step or debug registers
        return None

    def _fix_pushed_flags(self) -> None:
        """A PUSHF stepped with the debugger's TF pushed TF: clear it in the pushed image, so the
        guest never sees it there (POPF/IRET would otherwise set TF for good)."""
        code, self._step_from = self._step_from, None
        if not code or not self._debugger_tf():
            return
        n = 0
        while n < len(code) - 1 and (code[n] in _PREFIXES or 0x40 <= code[n] <= 0x4F):
            n += 1
        if code[n] != 0x9C:  # PUSHF/PUSHFD/PUSHFQ
            return
        sregs = self.get_sregs()
        top = (sregs.ss.base + self.get_regs().rsp) & 0xFFFFFFFFFFFFFFFF
        byte = self._read_linear(top + 1, 1)  # RFLAGS bits 8-15
        if byte is not None:
            self._write_linear(top + 1, bytes([byte[0] & ~(RFLAGS_TF >> 8) & 0xFF]))

    def _physical(self, linear: int) -> int | None:
        sregs = self.get_sregs()

        def read_phys(address: int, size: int) -> int | None:
            ram = self._vm.ram_at(address, size)
            return None if ram is None else int.from_bytes(ram[0][ram[1] : ram[1] + size], "little")

        return paging.translate(read_phys, linear, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)

    def _read_linear(self, linear: int, size: int) -> bytes | None:
        """Guest memory at a linear address through the vCPU's page tables (RAM only; one page)."""
        size = min(size, PAGE_SIZE - linear % PAGE_SIZE)
        physical = self._physical(linear)
        ram = None if physical is None else self._vm.ram_at(physical, size)
        return None if ram is None else bytes(ram[0][ram[1] : ram[1] + size])

    def _write_linear(self, linear: int, data: bytes) -> None:
        physical = self._physical(linear)
        ram = None if physical is None else self._vm.ram_at(physical, len(data))
        if ram is not None:
            ram[0][ram[1] : ram[1] + len(data)] = data

    # ------------------------------------------------------------------ saved state
    STATE_VERSION = 1

    def _save_state(self):
        """The whole vCPU through the public accessors (on HVF they run on the owner thread already)."""
        cpu = X86CpuState(
            regs=self.get_regs(), sregs=self.get_sregs(), fpu=self.get_fpu(), xcr0=self.get_xcr0(),
            msrs=self.get_msrs(list(SAVED_MSRS)), events=self.get_events(), mp_state=self.mp_state,
        )  # fmt: skip
        return VcpuState(self.backend, ARCH, self.STATE_VERSION, cpu, {"msr_shadow": dict(self._msr_shadow)})

    def _restore_state(self, state) -> None:
        try:
            cpu = restorable(state, self.backend, self.STATE_VERSION)
        except StateError as err:
            raise AccelError(self.backend, str(err)) from err
        self.set_sregs(cpu.sregs)
        self.set_regs(cpu.regs)
        self.set_xcr0(cpu.xcr0)
        self.set_fpu(cpu.fpu)
        self.set_msrs(cpu.msrs)
        if state.backend == self.backend:
            self._msr_shadow.update(state.private.get("msr_shadow", {}))
        self._set_mp_state(cpu.mp_state)
        events = cpu.events
        self.set_events(PendingEvents(**{f: getattr(events, f) for f in events.__dataclass_fields__ if f != "private"}))

    @property
    def mp_state(self) -> str:
        return "wait-for-sipi" if self._wait_for_sipi else "halted" if self._halted else "runnable"

    def _set_mp_state(self, state: str) -> None:
        self._wait_for_sipi = state == "wait-for-sipi"
        self._halted = state == "halted"

    def _stop_threads(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._kicker is not None:
            self._kicker.join(1)
        if self._emulator is not None:
            self._emulator.close()
            self._emulator = None


def _enabled_slots(dr7: int) -> int:
    """DR6's B-bit mask of the slots DR7 enables (L or G)."""
    return sum(1 << slot for slot in range(4) if dr7 >> (2 * slot) & 3)


def page_aligned(guest_addr: int, size: int) -> bool:
    return not (guest_addr % PAGE_SIZE or size % PAGE_SIZE or size == 0)
