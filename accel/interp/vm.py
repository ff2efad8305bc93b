"""``InterpVm``: the bundled software-CPU backend (``accel = "interp"``) and its ``probe()``."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

from pyvmm.accel.core import Capability
from pyvmm.accel.x86 import ARCH, CpuidEntry
from pyvmm.errors import AccelError

UNICORN_VERSION = "2.1.4"


def _verify_once() -> None:
    from pyvmm.accel.interp import engine

    engine.verify_layout()


def probe() -> tuple[bool, str, list[str]]:
    """For ``pyvmm check``: (usable, reason, notes)."""
    notes = [
        "software x86-64 CPU on unicorn 2.1.4 (QEMU 5.0 TCG); Intel CPUID without AVX/AVX2/FMA, x2APIC, "
        "TSC-deadline, MONITOR, XSAVEC/XSAVES, PCID/INVPCID, PMU; TSC = host TSC, frequency in CPUID 0x15",
        "RDMSR/WRMSR and CR8 through unicorn's redirected helpers: IA32_APIC_BASE, IA32_TSC, IA32_TSC_ADJUST, "
        "IA32_TSC_DEADLINE and CR8 (the TPR) are the VMM's; an MSR neither unicorn nor pyvmm has is #GP",
        "several vCPUs run one at a time (2 ms slices): LOCK-prefixed instructions are not atomic across engines",
        "MMIO accesses wider than 4 bytes reach the VMM as 4-byte pieces; writes to read-only slots are errors",
    ]
    try:
        import unicorn
    except ImportError as err:
        return False, f"unicorn is not importable: {err} (pip install unicorn=={UNICORN_VERSION})", notes
    version = getattr(unicorn, "__version__", "unknown")
    if version != UNICORN_VERSION:
        return False, f"unicorn {version} is installed; the interpreter needs exactly {UNICORN_VERSION}", notes
    try:
        _verify_once()
    except AccelError as err:
        return False, err.cause, notes
    return True, f"unicorn {version}, context layout verified", notes


def _buffer_address(buffer) -> tuple[int, int, object]:
    """(host address, size, export) of a writable buffer (mmap or bytearray), without copying.

    The returned ctypes object holds a buffer export: while it lives the mmap
    cannot be closed under the engine.
    """
    if isinstance(buffer, memoryview):
        buffer = buffer.obj
    size = len(buffer)
    try:
        export = (ctypes.c_char * size).from_buffer(buffer)
        return ctypes.addressof(export), size, export
    except TypeError as err:
        raise AccelError("interp", f"guest memory buffer of type {type(buffer).__name__} is not writable") from err


class InterpVm:
    name = "interp"
    arch = ARCH
    capabilities = frozenset({Capability.USERSPACE_IRQCHIP, Capability.SERVE_IO_DIRECTLY,
                              Capability.READONLY_MEMORY, Capability.SOFTWARE_CPU, Capability.GUEST_DEBUG,
                              Capability.BLOCK_TRACE})  # fmt: skip

    def __init__(self, vcpu_count: int = 1, *, irqchip=None):
        """``irqchip``: the VM-level userspace interrupt controllers (``accel.irqchip.Irqchip``);
        one is made when none is given."""
        _verify_once()
        # xAPIC IDs are 8 bits (0xFF is broadcast); engines are serialized, so host cores do not limit it
        self.max_vcpus = 254
        if not 1 <= vcpu_count <= self.max_vcpus:
            raise AccelError("interp", f"vcpu_count {vcpu_count} is outside 1..{self.max_vcpus}")
        self.vcpu_count = vcpu_count
        self.vcpus: dict[int, object] = {}
        #: slot -> (guest_addr, size, host pointer, readonly)
        self.slots: dict[int, tuple[int, int, int, bool]] = {}
        self._buffers: dict[int, object] = {}  # keep the buffers alive while mapped
        if irqchip is None:
            from pyvmm.accel.irqchip.chip import Irqchip

            irqchip = Irqchip(vcpu_count)
        if irqchip.vcpu_count != vcpu_count:
            raise AccelError("interp", f"the irqchip serves {irqchip.vcpu_count} vCPUs, not {vcpu_count}")
        irqchip.on_wake(self._wake)
        self.irqchip = irqchip
        self._supported: list[CpuidEntry] | None = None
        from pyvmm.accel.interp.vcpu import EngineLock

        # one engine at a time when there are several (see EngineLock)
        self._engine_lock = EngineLock() if vcpu_count > 1 else None
        self._tsc_lock = threading.Lock()
        self._last_tsc_write: tuple[int, int, float] | None = None  # (value, engine offset, when)

    #: VMM writes of the same TSC value this close together are one synchronised write (KVM's rule)
    TSC_SYNC_WINDOW = 1.0

    def tsc_offset_for(self, value: int) -> int:
        """The engine TSC offset (added to the host TSC) for a VMM write of IA32_TSC = ``value``.

        The VMM writes each vCPU's TSC in turn; offsets computed one by one would leave later
        vCPUs behind by the time between the writes, and Linux's TSC sync check then measured
        a warp (~150,000 cycles here) and marked the TSC unstable. As KVM does
        (kvm_synchronize_tsc), a write of the same value within TSC_SYNC_WINDOW of the last
        one gets the same offset.
        """
        from pyvmm.accel.interp.engine import host_tsc

        now = time.monotonic()
        with self._tsc_lock:
            last = self._last_tsc_write
            if last is not None and last[0] == value and now - last[2] < self.TSC_SYNC_WINDOW:
                return last[1]
            offset = (value - host_tsc()) & ((1 << 64) - 1)
            self._last_tsc_write = (value, offset, now)
            return offset

    def _wake(self, vcpu_index: int) -> None:
        vcpu = self.vcpus.get(vcpu_index)
        if vcpu is not None:
            vcpu.wake()

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        address, size, export = _buffer_address(host_buffer)
        if guest_addr % mmap.PAGESIZE or size % mmap.PAGESIZE or size == 0:
            raise AccelError("interp", f"memory slot {slot}: {guest_addr:#x}+{size:#x} is not page-aligned")
        if slot in self.slots:
            raise AccelError("interp", f"memory slot {slot} is already mapped")
        for other, (start, length, _, _) in self.slots.items():
            if guest_addr < start + length and start < guest_addr + size:
                raise AccelError("interp", f"memory slot {slot} at {guest_addr:#x}+{size:#x} overlaps slot {other}")
        self.slots[slot] = (guest_addr, size, address, readonly)
        self._buffers[slot] = export
        for vcpu in self.vcpus.values():
            vcpu._memory_changed = True

    def slot_view(self, slot: int) -> memoryview:
        """A byte view of a mapped slot's host memory (for the backend's own page walks)."""
        return memoryview(self._buffers[slot]).cast("B")

    def supported_cpuid(self) -> list[CpuidEntry]:
        if self._supported is None:
            from pyvmm.accel.interp.cpuid import supported_cpuid
            from pyvmm.accel.irqchip.lapic import LAPIC_TIMER_HZ

            self._supported = supported_cpuid(getattr(self.irqchip, "LAPIC_TIMER_HZ", LAPIC_TIMER_HZ))
        return list(self._supported)

    def _default_cpuid(self, index: int) -> list[CpuidEntry]:
        """The table a vCPU answers from until ``set_cpuid``: supported, with its own APIC ID."""
        out = []
        for e in self.supported_cpuid():
            if e.function == 1:
                e = CpuidEntry(1, 0, e.eax, (e.ebx & 0x00FFFFFF) | (index << 24), e.ecx, e.edx, e.indexed)
            elif e.function == 0xB:
                e = CpuidEntry(0xB, e.index, e.eax, e.ebx, e.ecx, index, e.indexed)
            out.append(e)
        return out

    def create_vcpu(self, index: int):
        from pyvmm.accel.interp.vcpu import InterpVcpu

        if not 0 <= index < self.vcpu_count:
            raise AccelError("interp", f"vCPU index {index} is outside 0..{self.vcpu_count - 1}")
        if index in self.vcpus:
            raise AccelError("interp", f"vCPU {index} already exists")
        vcpu = InterpVcpu(self, index, self._default_cpuid(index), self._engine_lock)
        self.vcpus[index] = vcpu
        return vcpu

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.irqchip.set_irq_line(irq, level)

    def close(self) -> None:
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.vcpus.clear()
        self._buffers.clear()
