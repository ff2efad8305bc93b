"""The gdb stub's ``DebugTarget`` over a running pyvmm ``Machine``, on every backend with guest debug.

All-stop: the vCPU that meets a breakpoint, a watchpoint or the end of a step makes every vCPU
park at an instruction boundary (the VM controller's pause mechanism, ``VcpuLoop.request_pause``),
and only then is the stop reported. Guest-virtual addresses go through the vCPU's own page tables
(``vmm/introspect.py``); memory is read and written as guest RAM (``GuestMemory``, so a Diff
snapshot sees the debugger's writes). Breakpoints reach the backends as one ``GuestDebug`` per vCPU
(``accel/core.py``), given again at every resume: software breakpoints (the stub's int3s, which
the backend reports instead of handing to the guest), the debug registers for hardware breakpoints
and watchpoints (``pyvmm.gdb.debugregs``), and single-stepping. A backend whose instruction
breakpoints cannot stop exactly (the interpreter: ``Capability.INSTRUCTION_BREAKPOINTS`` absent) gets
an int3 planted by this target instead, hidden from memory reads and kept across writes as the
stub does for its own.

While gdb holds the VM, the controller's state is not changed (it still says Running): a debugger's
stop is not a lifecycle pause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from pyvmm.accel.core import Capability, GuestDebug
from pyvmm.arch.x86.msrs import MSR_KERNEL_GS_BASE
from pyvmm.gdb.debugregs import DR6_SINGLE_STEP, DebugRegisters
from pyvmm.gdb.errors import DebugTargetError, UnmappedAddress
from pyvmm.gdb.stub import BreakpointKind, ResumeAction, StopEvent, StopReason
from pyvmm.gdb.target import VcpuRegisters
from pyvmm.vmm import introspect

log = logging.getLogger("pyvmm.gdb")

PARK_TIMEOUT = 10.0
INT3 = 0xCC


class MachineTarget:
    """``DebugTarget`` for ``machine`` (a built, started ``vmm.machine.Machine``)."""

    def __init__(self, machine):
        if Capability.GUEST_DEBUG not in machine.vm.capabilities:
            raise DebugTargetError(f"the {machine.vm.name} backend offers no guest debugging")
        self.machine = machine
        self.vcpu_count = len(machine.loops)
        self.debug_registers = DebugRegisters()
        self.software: set[int] = set()
        #: instruction breakpoints planted as int3 (backends without exact ones): address -> original byte
        self.planted: dict[int, int] = {}
        self._plant = Capability.INSTRUCTION_BREAKPOINTS not in machine.vm.capabilities
        self._on_stop: Callable[[StopEvent], None] | None = None
        self._lock = threading.Lock()
        self._stop: StopEvent | None = None  # the first stop since the last resume
        self._stopped = threading.Event()
        self._waiter: threading.Thread | None = None
        for loop in machine.loops:
            loop.on_debug = self._debug_exit

    # --- stopping ------------------------------------------------------------------------------
    def attach(self, on_stop: Callable[[StopEvent], None]) -> StopEvent:
        self._on_stop = on_stop
        held = self.machine.paused
        self._park_all()
        return StopEvent(0, StopReason.HALTED if held else StopReason.INTERRUPT)

    def _park_all(self) -> None:
        if not self.machine.pause(PARK_TIMEOUT):
            raise DebugTargetError(f"a vCPU did not stop within {PARK_TIMEOUT:.0f} s")

    def _debug_exit(self, loop, exit_) -> None:
        """On the vCPU's thread: a Debug exit. Record it (the first one wins) and stop every vCPU."""
        vcpu = loop.vcpu.index
        if exit_.kind == "step":
            event = StopEvent(vcpu, StopReason.STEP)
        elif exit_.kind == "breakpoint":
            planted = exit_.pc in self.planted and exit_.pc not in self.software
            event = StopEvent(vcpu, StopReason.HARDWARE_BREAKPOINT if planted else StopReason.SOFTWARE_BREAKPOINT)
        else:
            hit = self.debug_registers.hit(exit_.dr6)
            if hit is None:  # a single step that also set a B bit, or the guest's own registers
                event = StopEvent(vcpu, StopReason.STEP if exit_.dr6 & DR6_SINGLE_STEP else StopReason.INTERRUPT)
            else:
                event = StopEvent(vcpu, hit[0], hit[1])
        self._stop_with(event)

    def _stop_with(self, event: StopEvent) -> None:
        with self._lock:
            if self._stop is None:
                self._stop = event
        for loop in self.machine.loops:
            loop.request_pause()
        self._stopped.set()

    def interrupt(self) -> None:
        self._stop_with(StopEvent(0, StopReason.INTERRUPT))

    def _wait_for_stop(self) -> None:
        """After a resume (its own thread): the first stop, every vCPU parked, then ``on_stop``."""
        exited = self.machine.lifecycle.exited
        while not self._stopped.wait(0.05):
            if exited.is_set():
                status = self.machine.lifecycle.status
                self._report(StopEvent(0, StopReason.EXITED, exit_status=status.code & 0xFF if status else 0))
                return
        try:
            self._park_all()
        except DebugTargetError as err:
            log.warning("gdb: %s", err)
        self._report(self._stop or StopEvent(0, StopReason.INTERRUPT))

    def _report(self, event: StopEvent) -> None:
        if self._on_stop is not None:
            self._on_stop(event)

    # --- registers and memory ----------------------------------------------------------------------
    def _index(self, index: int) -> int:
        if not 0 <= index < self.vcpu_count:
            raise DebugTargetError(f"no vCPU {index}")
        return index

    def _vcpu(self, index: int):
        return self.machine.loops[self._index(index)].vcpu

    def read_registers(self, vcpu: int) -> VcpuRegisters:
        cpu = self._vcpu(vcpu)
        kernel_gs = cpu.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0)
        return VcpuRegisters(cpu.get_regs(), cpu.get_sregs(), cpu.get_fpu(), kernel_gs)

    def write_registers(self, vcpu: int, registers: VcpuRegisters) -> None:
        cpu = self._vcpu(vcpu)
        cpu.set_regs(registers.regs)
        cpu.set_sregs(registers.sregs)
        cpu.set_fpu(registers.fpu)
        cpu.set_msrs({MSR_KERNEL_GS_BASE: registers.kernel_gs_base})

    def read_virtual(self, vcpu: int, address: int, size: int) -> bytes:
        try:
            data = bytearray(introspect.read_virtual(self.machine, self._index(vcpu), address, size))
        except introspect.AddressError as err:
            raise UnmappedAddress(err.address) from err
        for at, original in self.planted.items():  # the planted int3s are not the guest's bytes
            if address <= at < address + size:
                data[at - address] = original
        return bytes(data)

    def write_virtual(self, vcpu: int, address: int, data: bytes) -> None:
        data = bytearray(data)
        for at in self.planted:  # a write over a planted int3 changes the kept byte
            if address <= at < address + len(data):
                self.planted[at], data[at - address] = data[at - address], INT3
        try:
            introspect.write_virtual(self.machine, self._index(vcpu), address, bytes(data))
        except introspect.AddressError as err:
            raise UnmappedAddress(err.address) from err

    def read_physical(self, address: int, size: int) -> bytes:
        try:
            return introspect.read_physical(self.machine, address, size)
        except introspect.AddressError as err:
            raise UnmappedAddress(err.address, "guest-physical") from err

    # --- breakpoints and running ---------------------------------------------------------------------
    def set_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        if kind == BreakpointKind.SOFTWARE:
            self.software.add(address)
        elif kind == BreakpointKind.HARDWARE and self._plant:
            if address not in self.planted:
                original = self.read_virtual(0, address, 1)[0]
                introspect.write_virtual(self.machine, 0, address, bytes([INT3]))
                self.planted[address] = original
        else:
            self.debug_registers.add(kind, address, length)

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        if kind == BreakpointKind.SOFTWARE:
            self.software.discard(address)
        elif kind == BreakpointKind.HARDWARE and self._plant:
            self._unplant(address)
        else:
            self.debug_registers.remove(kind, address, length)

    def _unplant(self, address: int) -> None:
        original = self.planted.pop(address, None)
        if original is None:
            return
        try:
            if introspect.read_virtual(self.machine, 0, address, 1) == bytes([INT3]):  # the guest may have rewritten it
                introspect.write_virtual(self.machine, 0, address, bytes([original]))
        except introspect.AddressError:
            log.warning("gdb: the planted breakpoint at %#x is no longer mapped; left as it was", address)

    def _guest_debug(self, step: bool) -> GuestDebug:
        return GuestDebug(single_step=step, software_breakpoints=frozenset(self.software | set(self.planted)),
                          addresses=tuple(self.debug_registers.addresses()),
                          dr7=self.debug_registers.dr7() if self.debug_registers else 0)  # fmt: skip

    def resume(self, actions: Mapping[int, ResumeAction]) -> None:
        for loop in self.machine.loops:
            loop.vcpu.set_guest_debug(self._guest_debug(actions.get(loop.vcpu.index) == ResumeAction.STEP))
        with self._lock:
            self._stop = None
        self._stopped.clear()
        self._waiter = threading.Thread(target=self._wait_for_stop, name="gdb-wait", daemon=True)
        self._waiter.start()
        machine = self.machine
        if machine.events is not None:
            machine.events.release()
        for loop in machine.loops:
            if actions.get(loop.vcpu.index, ResumeAction.CONTINUE) != ResumeAction.STOP:
                loop.release()

    def detach(self) -> None:
        for address in list(self.planted):
            self._unplant(address)
        self.software.clear()
        self.debug_registers.clear()
        for loop in self.machine.loops:
            loop.vcpu.set_guest_debug(GuestDebug())
            loop.on_debug = None
        self._on_stop = None
        self.machine.resume()

    def kill(self) -> None:
        for address in list(self.planted):
            self._unplant(address)
        self.machine.stop("killed by the debugger", 137)
