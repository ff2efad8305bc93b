"""The arch-neutral part of the backend interface: exits, capabilities, state, the VM and vCPU.

``VcpuOps.run()`` returns exactly one exit value per return (the ``kvm-ioctls``
``VcpuExit`` idea). Exits are small immutable tuples: they are created on the
hottest path of the VMM (one per port-I/O or MMIO access), and a ``NamedTuple``
costs a fraction of a frozen dataclass.

For reads (``IoIn``, ``MmioRead``) the exit carries ``data``: a writable buffer
of exactly the access size. The run loop fills it in place (for KVM it is a view
into ``kvm_run``) and the backend completes the instruction on the next
``run()``. An exit's ``data`` may be a view of a buffer the backend reuses: it
is valid until the next ``run()`` of that vCPU; a device that keeps written data
copies it (``bytes(data)``).

What a backend can do is a set of ``Capability`` values read once
(``vm.capabilities``), never probed with ``hasattr``: a capability's methods
exist exactly when it is in the set (psutil's rule: unsupported features are
absent, not stubbed). The architecture-specific part of the interface (for x86:
registers, MSRs, CPUID, interrupt injection) lives beside this module
(``accel/x86.py``); an arm64 part can be added without touching this one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

# --------------------------------------------------------------------------
# Exits


class IoIn(NamedTuple):
    """``in`` from ``port``: fill ``data`` (``len(data)`` is the access size)."""

    port: int
    data: memoryview


class IoOut(NamedTuple):
    """``out`` to ``port`` of ``data``."""

    port: int
    data: bytes | memoryview


class MmioRead(NamedTuple):
    """Read of unbacked guest-physical ``addr``: fill ``data``."""

    addr: int
    data: memoryview


class MmioWrite(NamedTuple):
    """Write of ``data`` to unbacked guest-physical ``addr``."""

    addr: int
    data: bytes | memoryview


class Halt(NamedTuple):
    """``hlt`` with no interrupt pending (only backends without an in-kernel LAPIC)."""


class Shutdown(NamedTuple):
    """The vCPU shut down: a triple fault on x86."""

    reason: str = "triple fault"


class SystemEvent(NamedTuple):
    """A platform event requested by the guest: ``kind`` is "reset", "shutdown" or "crash"."""

    kind: str


class Interrupted(NamedTuple):
    """``run()`` returned because ``request_stop()`` was called (or a signal arrived)."""


class InternalError(NamedTuple):
    """The backend could not continue. ``detail`` is free text for the user."""

    reason: str
    detail: str = ""
    rip: int | None = None


class EmulationFailure(NamedTuple):
    """The hypervisor's instruction emulator could not execute the instruction at ``rip``.

    ``insn`` holds the instruction bytes when the hypervisor reports them. The
    fallback manager hands the vCPU to the interpreter on this exit.
    """

    rip: int
    insn: bytes


class Debug(NamedTuple):
    """The vCPU stopped for a debugger (``vcpu.set_guest_debug``), at an instruction boundary.

    ``kind``: "step" (one instruction done), "breakpoint" (one of the debugger's int3s: ``pc`` is
    the int3's address and RIP is left there), or "debug-register" (a hardware breakpoint or
    watchpoint: ``dr6`` has the B bit of each debug register that hit).
    """

    kind: str
    pc: int
    dr6: int = 0


VcpuExit = (IoIn | IoOut | MmioRead | MmioWrite | Halt | Shutdown | SystemEvent | Interrupted | InternalError
            | EmulationFailure | Debug)  # fmt: skip

# --------------------------------------------------------------------------
# Capabilities


class Capability(enum.Enum):
    """What a backend offers beyond the core interface; each names the methods it brings."""

    #: the hypervisor emulates the interrupt controllers and timers (KVM's in-kernel irqchip)
    IN_KERNEL_IRQCHIP = "in-kernel irqchip"
    #: the backend takes the VM-level userspace irqchip (``create_vm(irqchip=...)``) and
    #: serves its ports and pages itself
    USERSPACE_IRQCHIP = "userspace irqchip"
    #: ``vm.irqfd(irq, fd, resample=...)``: a host fd raises an interrupt line
    IRQFD = "irqfd"
    #: ``vm.ioeventfd(addr, length, fd, datamatch=...)``: a guest write signals a host fd
    IOEVENTFD = "ioeventfd"
    #: ``EmulationFailure`` exits (with the instruction bytes): the fallback can be armed
    EMULATION_FAILURE_EXITS = "emulation-failure exits"
    #: ``vcpu.serve_io_directly(handler)``: port I/O and MMIO served on the backend's thread
    SERVE_IO_DIRECTLY = "serve I/O directly"
    #: ``map_memory(..., readonly=True)``
    READONLY_MEMORY = "read-only memory"
    #: ``vcpu.get_xsave()``/``set_xsave(area)``: the whole XSAVE area (x86), beyond ``FpuState``
    XSAVE_STATE = "XSAVE area"
    #: ``vcpu.interrupt_window_open()``, ``inject_interrupt(vector)``, ``inject_nmi()``
    INTERRUPT_INJECTION = "interrupt injection"
    #: ``vm.start_dirty_log()`` then ``vm.dirty_bitmap(slot)``: the pages the guest wrote in each
    #: memory slot since the last call, as the hypervisor logged them (KVM_GET_DIRTY_LOG)
    DIRTY_LOG = "dirty-page log"
    #: ``map_memory`` may run on another thread while the rest of the VM is set up (vCPUs made and
    #: given their state); no vCPU runs before it has returned
    CONCURRENT_MAP = "memory mapped beside the set-up"
    #: ``vcpu.set_guest_debug(GuestDebug)``: single steps, the debugger's int3s and the debug
    #: registers stop the vCPU with ``Debug`` exits
    GUEST_DEBUG = "guest debug"
    #: ``GuestDebug``'s DR7 instruction breakpoints stop exactly before their instruction (without
    #: it a debugger plants an int3 instead)
    INSTRUCTION_BREAKPOINTS = "instruction breakpoints"
    #: ``vcpu.trace_blocks(callback)``: ``callback(linear address, size, guest-physical address or
    #: None)`` for every block of guest code the vCPU executes (None turns it off)
    BLOCK_TRACE = "block trace"
    #: the backend's instructions run one at a time in software (exact traces, no atomicity
    #: across vCPUs running in parallel)
    SOFTWARE_CPU = "software CPU"


@dataclass(frozen=True)
class GuestDebug:
    """What a vCPU stops on for a debugger; the default stops on nothing (the guest runs freely)."""

    #: stop after each instruction (interrupts are held off meanwhile, where the backend can)
    single_step: bool = False
    #: linear addresses of the debugger's int3s: a #BP there is a Debug exit, any other is the guest's
    software_breakpoints: frozenset[int] = frozenset()
    #: the debug registers for hardware breakpoints and watchpoints (x86: DR0-DR3, DR7; 0: none)
    addresses: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr7: int = 0

    @property
    def active(self) -> bool:
        return self.single_step or bool(self.software_breakpoints) or bool(self.dr7 & 0xFF)


# --------------------------------------------------------------------------
# Saved state


@dataclass
class VcpuState:
    """A vCPU's whole state as one backend saved it: opaque to the VMM, tagged by its origin.

    ``cpu`` holds the architectural state in the arch part's neutral form (for x86:
    ``accel.x86.X86CpuState``), so another backend of the same ``arch`` can restore
    it; ``private`` holds what only ``backend`` understands (dropped elsewhere).
    """

    backend: str
    arch: str
    version: int
    cpu: object
    private: dict = field(default_factory=dict)


class StateError(Exception):
    """A saved state this backend cannot restore (other arch, newer version)."""


# --------------------------------------------------------------------------
# Backends


@runtime_checkable
class VcpuOps(Protocol):
    """One virtual CPU. All calls except ``request_stop`` come from the vCPU's own thread."""

    index: int

    def run(self) -> VcpuExit:
        """Run until the next exit the VMM must handle; return it."""

    def request_stop(self) -> None:
        """From any thread: make the current or next ``run()`` return ``Interrupted`` promptly."""

    def save_state(self) -> VcpuState:
        """The whole vCPU state (the vCPU is not running)."""

    def restore_state(self, state: VcpuState) -> None:
        """Load a state saved by this backend, or by another of the same arch (architectural part)."""

    def close(self) -> None: ...


@runtime_checkable
class VmOps(Protocol):
    """A virtual machine: guest memory slots, vCPUs and interrupt lines."""

    #: backend name as in ``accel.registry`` ("kvm", "interp", ...)
    name: str
    #: the guest architecture ("x86_64")
    arch: str
    #: what this VM offers beyond the core interface, read once at creation
    capabilities: frozenset[Capability]
    #: the largest vCPU count this backend supports on this host
    max_vcpus: int

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        """Make ``host_buffer`` (an ``mmap``) guest RAM at ``guest_addr``; no copy."""

    def create_vcpu(self, index: int) -> VcpuOps: ...

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive interrupt line ``irq`` (IOAPIC pin / ISA IRQ) to ``level``."""

    def close(self) -> None: ...
