"""The hypervisor-neutral interface every backend implements.

``VcpuOps.run()`` returns exactly one ``VcpuExit`` value per return (the
``kvm-ioctls`` ``VcpuExit`` idea). Exits are small immutable tuples: they are
created on the hottest path of the VMM (one per port-I/O or MMIO access), and a
``NamedTuple`` costs a fraction of a frozen dataclass.

For reads (``IoIn``, ``MmioRead``) the exit carries ``data``: a writable buffer
of exactly the access size. The run loop fills it in place (for KVM it is a view
into ``kvm_run``) and the backend completes the instruction on the next
``run()``. No backend-specific call is needed to complete an access.

An exit's ``data`` (reads and writes alike) may be a view of a buffer the
backend reuses: it is valid until the next ``run()`` of that vCPU. A device
that keeps written data must copy it (``bytes(data)``).

Register state uses plain mutable dataclasses with x86 architectural names, so
that state can move between backends (KVM -> interpreter -> KVM).
"""

from __future__ import annotations

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


VcpuExit = IoIn | IoOut | MmioRead | MmioWrite | Halt | Shutdown | SystemEvent | Interrupted | InternalError | EmulationFailure

# --------------------------------------------------------------------------
# Register state


@dataclass
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


GPR_NAMES = tuple(f for f in Regs.__dataclass_fields__ if f not in ("rip", "rflags"))


@dataclass
class Segment:
    """A segment register with its hidden (descriptor cache) part."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3  # read/write data, accessed
    present: bool = True
    dpl: int = 0
    db: bool = False
    s: bool = True
    l: bool = False  # noqa: E741 - architectural name
    g: bool = False
    avl: bool = False
    unusable: bool = False

    @classmethod
    def from_descriptor(cls, selector: int, descriptor: int) -> Segment:
        """Decode a 64-bit GDT entry into a segment cache."""
        base = ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)
        limit = (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)
        flags = (descriptor >> 40) & 0xF0FF
        g = bool(flags & 0x8000)
        if g:
            limit = (limit << 12) | 0xFFF
        return cls(
            base=base,
            limit=limit,
            selector=selector,
            type=flags & 0xF,
            s=bool(flags & 0x10),
            dpl=(flags >> 5) & 3,
            present=bool(flags & 0x80),
            avl=bool(flags & 0x1000),
            l=bool(flags & 0x2000),
            db=bool(flags & 0x4000),
            g=g,
        )


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class SpecialRegs:
    cs: Segment = field(default_factory=lambda: Segment(base=0xFFFF0000, selector=0xF000, type=11))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=False))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=False))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900


@dataclass
class FpuState:
    """x87/SSE state in FXSAVE terms. ``fpr`` are 8 x 16 bytes, ``xmm`` 16 x 16 bytes."""

    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0  # abridged tag word, as FXSAVE stores it
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    fpr: list[bytes] = field(default_factory=lambda: [bytes(16)] * 8)
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    #: True when ``index`` (ECX on input) selects the sub-leaf
    indexed: bool = False


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

    def get_regs(self) -> Regs: ...
    def set_regs(self, regs: Regs) -> None: ...
    def get_sregs(self) -> SpecialRegs: ...
    def set_sregs(self, sregs: SpecialRegs) -> None: ...
    def get_fpu(self) -> FpuState: ...
    def set_fpu(self, fpu: FpuState) -> None: ...
    def get_msrs(self, indices: list[int]) -> dict[int, int]: ...
    def set_msrs(self, msrs: dict[int, int]) -> None: ...
    def set_cpuid(self, entries: list[CpuidEntry]) -> None: ...
    def close(self) -> None: ...

    # Optional (present only where it helps): ``serve_io_directly(handler)`` makes a backend
    # that runs its guest on a thread of its own call ``handler(exit)`` for IoIn/IoOut/
    # MmioRead/MmioWrite on that thread, the access completing when it returns, instead of
    # returning those exits from run() (the interpreter: saves two thread switches per access).


@runtime_checkable
class VmOps(Protocol):
    """A virtual machine: guest memory slots, vCPUs and interrupt lines."""

    #: backend name as used in the config ("kvm", "interp", ...)
    name: str
    #: the largest vCPU count this backend supports on this host
    max_vcpus: int

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        """Make ``host_buffer`` (an ``mmap``) guest RAM at ``guest_addr``; no copy."""

    def supported_cpuid(self) -> list[CpuidEntry]:
        """What this backend can present to a guest, before the VMM's own trimming."""

    def create_vcpu(self, index: int) -> VcpuOps: ...

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive interrupt line ``irq`` (IOAPIC pin / ISA IRQ) to ``level``."""

    def close(self) -> None: ...
