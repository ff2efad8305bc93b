"""The userspace interrupt controllers and timers of a PC, for backends without in-kernel ones.

``Irqchip`` wires one local APIC per vCPU, the IOAPIC, the 8259 pair and the 8254
PIT together, and is the only object a backend talks to. It is sans-IO: no
threads, time only from the injected ``clock`` (seconds, monotonic), and timers fire
when someone calls ``poll()``. A backend's loop is, per vCPU::

    chip.poll()
    if guest_if and chip.has_interrupt(i): vector = chip.ack_interrupt(i); deliver it
    if halted: sleep until chip.next_deadline(i) or until ``wake(i)`` is called
    if running: stop the guest at chip.next_deadline(i) or at ``wake(i)`` to poll again

``wake(i)`` means "look again": vCPU i may have a new interrupt, NMI, INIT or SIPI,
or its ``next_deadline`` moved earlier than the value it last returned (a timer
was programmed or unmasked, possibly by another vCPU). It can be called from any
thread, including vCPU i's own, from inside ``pio_write``/``mmio_write``.

Locking: one ``threading.Lock`` guards all models (vCPU threads and device threads
call in concurrently); ``wake`` callbacks run after it is released.

Time: every counter is computed from ``clock()`` when read (see ``timebase`` for how
a backend keeps the guest's TSC consistent with it). TSC-deadline mode and x2APIC are
not offered: a backend that cannot trap RDMSR/WRMSR cannot emulate their MSRs.

Interrupt routing:

* ISA IRQ n (0-15) drives 8259 input n and IOAPIC pin ``ISA_IRQ_TO_IOAPIC_PIN[n]``:
  identity except IRQ0 (PIT) -> pin 2, as on PCs with the MP/MADT override (QEMU routes
  GSI 0 the same way). IRQ0 drives pin 0 as well (``PIT_IDENTITY_PIN``), so MP/MADT
  tables with identity routing and no override (what pyvmm writes, as for KVM's default
  GSI routing) work unchanged: Linux programs only the pin its table names for IRQ0 and
  leaves the other masked. IRQ2 is the 8259 cascade and cannot be driven; the 8259's
  INTR is not wired to an IOAPIC pin (virtual wire mode uses the BSP's LINT0 instead).
* GSI 16-23 drive IOAPIC pins 16-23 only. Inputs are logical levels (True = asserted),
  so the MP table should describe every pin as active-high ("conforming" for ISA).
* The 8259's INTR goes to every local APIC whose LINT0 is unmasked ExtINT (or that is
  globally disabled); at reset that is the BSP, in the state firmware leaves.
* ``poll()`` pulses IRQ0 on each rising edge of PIT OUT0 (edges a late poll missed are
  merged into one) and fires expired LAPIC timers.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from pyvmm.accel.irqchip.ioapic import (
    DM_EXTINT, DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI, DM_SIPI, IOAPIC_PIN_COUNT, ApicMessage, IoApic,
)
from pyvmm.accel.irqchip.lapic import (
    APIC_BASE_ADDRESS_MASK, APIC_BASE_BSP, APIC_BASE_ENABLE, LAPIC_DEFAULT_BASE, LAPIC_TIMER_HZ, LVT_MASKED, LVT_TIMER,
    LocalApic,
)
from pyvmm.accel.irqchip.pic import PIC_PORTS, DualPic
from pyvmm.accel.irqchip.pit import PIT_HZ, PIT_PORTS, PORT_SYSTEM_CONTROL_B, Pit
from pyvmm.errors import AccelError

IOAPIC_DEFAULT_BASE = 0xFEC0_0000
PAGE = 0x1000

#: ISA IRQ -> IOAPIC pin (GSI). IRQ2 is the 8259 cascade: no device may use it.
ISA_IRQ_TO_IOAPIC_PIN = {irq: (2 if irq == 0 else irq) for irq in range(16) if irq != 2}
#: IOAPIC pins a device can drive: the ISA ones above plus 16-23.
IOAPIC_PIN_OF_IRQ = {**ISA_IRQ_TO_IOAPIC_PIN, **{gsi: gsi for gsi in range(16, IOAPIC_PIN_COUNT)}}
PIT_IRQ = 0
#: IRQ0 also drives this pin, so tables with identity routing (no override) work as well
PIT_IDENTITY_PIN = 0

# LAPIC registers written on every interrupt that cannot move a timer deadline: TPR, EOI, ICR
_NO_DEADLINE_EFFECT = frozenset((0x80, 0xB0, 0x300, 0x310))
# TPR, EOI: may make a vector waiting in IRR deliverable
_UNBLOCKING = frozenset((0x80, 0xB0))

__all__ = [
    "Irqchip", "IrqchipError", "ISA_IRQ_TO_IOAPIC_PIN", "IOAPIC_PIN_OF_IRQ", "IOAPIC_DEFAULT_BASE",
    "LAPIC_DEFAULT_BASE", "LAPIC_TIMER_HZ", "PIT_HZ", "PIT_IDENTITY_PIN",
]


class IrqchipError(AccelError):
    """A VMM-side misuse of the irqchip (bad IRQ number, vCPU index, port or address)."""

    def __init__(self, cause: str):
        super().__init__("irqchip", cause)


class Irqchip:
    LAPIC_TIMER_HZ = LAPIC_TIMER_HZ
    PIT_HZ = PIT_HZ

    def __init__(
        self,
        vcpu_count: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wake: Callable[[int], None] = lambda vcpu_index: None,
    ):
        if not 1 <= vcpu_count <= 255:
            raise IrqchipError(f"vcpu_count {vcpu_count} is outside 1..255 (8-bit xAPIC IDs, 0xFF is broadcast)")
        self.vcpu_count = vcpu_count
        self.clock = clock
        self._wake = wake
        self._lock = threading.Lock()
        self._wakes: set[int] = set()  # vCPUs to wake once the lock is released
        self.lapics = [LocalApic(i, self) for i in range(vcpu_count)]
        self.ioapic = IoApic(self._deliver)
        # an IOAPIC ID apart from the local APIC IDs (0..vcpu_count-1) where the 4-bit field allows
        self.ioapic.id = self.ioapic_id = min(vcpu_count, 0xF)
        self.pic = DualPic()
        self.pit = Pit()
        # vCPUs halted in wait-for-SIPI accept exactly one SIPI; the BSP starts running
        self._wait_for_sipi = [i != 0 for i in range(vcpu_count)]
        self._init_sipi: list[list[tuple[str, int]]] = [[] for _ in range(vcpu_count)]
        # per vCPU: an interrupt from another vCPU arrived since take_cross_cpu_ipi() was last asked
        self._cross_cpu_ipi = [False] * vcpu_count
        self._lapic_pages = frozenset()
        self._lowest_priority_next = 0
        self._next_due = math.inf  # earliest timer event of any kind, for a lock-free poll()
        # per vCPU, the earliest deadline a backend may be waiting for (see _recheck_deadlines)
        self._told = [math.inf] * vcpu_count
        self._refresh_pages()

    def on_wake(self, wake: Callable[[int], None]) -> None:
        """Name the backend's ``wake(vcpu_index)`` (the chip is made before the backend's vCPUs)."""
        self._wake = wake

    # --- locking helpers ---------------------------------------------------------
    def _flush_wakes(self) -> None:
        """Call ``wake`` for everyone notified under the lock (call after releasing it)."""
        if self._wakes:  # unlocked peek: a racing flush by another thread is harmless
            with self._lock:
                wakes, self._wakes = self._wakes, set()
            for index in sorted(wakes):
                self._wake(index)

    def _check_vcpu(self, vcpu_index: int) -> LocalApic:
        if not 0 <= vcpu_index < self.vcpu_count:
            raise IrqchipError(f"vCPU index {vcpu_index} is outside 0..{self.vcpu_count - 1}")
        return self.lapics[vcpu_index]

    # --- interrupt lines ---------------------------------------------------------
    def set_irq_line(self, irq: int, level: bool) -> None:
        pin = IOAPIC_PIN_OF_IRQ.get(irq)
        if pin is None:
            raise IrqchipError(f"IRQ {irq} cannot be driven (valid: 0, 1, 3-23; IRQ2 is the 8259 cascade)")
        with self._lock:
            self._set_line_locked(irq, pin, bool(level))
        self._flush_wakes()

    def _set_line_locked(self, irq: int, pin: int, level: bool) -> None:
        if irq < 16:
            before = self.pic.output
            self.pic.set_irq(irq, level)
            if self.pic.output and not before:
                self._notify_pic_receivers()
        self.ioapic.set_pin(pin, level)
        if irq == PIT_IRQ:
            self.ioapic.set_pin(PIT_IDENTITY_PIN, level)

    def _notify_pic_receivers(self) -> None:
        for lapic in self.lapics:
            if lapic.accepts_pic() or lapic.extint_pending:
                self._wakes.add(lapic.index)

    # --- the APIC bus ------------------------------------------------------------
    def _destinations(self, message: ApicMessage) -> list[LocalApic]:
        shorthand = message.shorthand
        if shorthand == 1:
            return [self.lapics[message.source]]
        if shorthand == 2:
            return [lapic for lapic in self.lapics if lapic.hw_enabled]
        if shorthand == 3:
            return [lapic for lapic in self.lapics if lapic.hw_enabled and lapic.index != message.source]
        return [lapic for lapic in self.lapics if lapic.matches(message.logical, message.destination)]

    def _deliver(self, message: ApicMessage, from_vcpu: int | None = None) -> bool:
        """Deliver an APIC-bus message (an IPI when ``from_vcpu`` is set); True if some local APIC accepted it."""
        targets = self._destinations(message)
        if not targets:
            return False
        mode = message.delivery_mode
        if mode == DM_LOWEST and len(targets) > 1:
            # lowest priority: the lowest PPR wins; ties rotate so the load spreads
            start = self._lowest_priority_next
            targets = [min(targets, key=lambda apic: (apic.ppr() >> 4, (apic.index - start) % self.vcpu_count))]
            self._lowest_priority_next = (targets[0].index + 1) % self.vcpu_count
        accepted = False
        for lapic in targets:
            index = lapic.index
            if mode in (DM_FIXED, DM_LOWEST):
                accepted |= lapic.accept_fixed(message.vector, message.level)
            elif mode == DM_NMI:
                lapic.nmi_pending = accepted = True
            elif mode == DM_INIT:
                lapic.reset()
                self._wait_for_sipi[index] = True
                self._init_sipi[index].append(("init", 0))
                self.timer_changed()
                accepted = True
            elif mode == DM_SIPI:
                if not self._wait_for_sipi[index]:
                    continue  # a running CPU ignores SIPIs (Linux sends two)
                self._wait_for_sipi[index] = False
                self._init_sipi[index].append(("sipi", message.vector))
                accepted = True
            elif mode == DM_EXTINT:
                lapic.extint_pending = accepted = True
            else:
                continue  # SMI and reserved modes
            if from_vcpu is not None and from_vcpu != index:
                self._cross_cpu_ipi[index] = True
            self._wakes.add(index)
        return accepted

    def take_cross_cpu_ipi(self, vcpu_index: int) -> bool:
        """True once after another vCPU sent this one an IPI.

        x86's protocol for code modified while other CPUs may run it (Linux's
        text_poke, jump labels, alternatives): the writer IPIs every other CPU
        and each executes a serializing instruction before running the new code.
        A backend that caches translated code per vCPU (the interpreter) flushes
        that cache when this returns True, before the guest runs on.
        """
        if not self._cross_cpu_ipi[vcpu_index]:  # lock-free peek: the common case
            return False
        with self._lock:
            seen, self._cross_cpu_ipi[vcpu_index] = self._cross_cpu_ipi[vcpu_index], False
        return seen

    # ApicBus protocol, called by LocalApic under the chip lock
    def send_ipi(self, source: LocalApic, message: ApicMessage) -> None:
        self._deliver(message, from_vcpu=source.index)

    def eoi_broadcast(self, vector: int) -> None:
        self.ioapic.eoi(vector)

    def timer_changed(self) -> None:
        due = self.pit.irq0_deadline()
        for lapic in self.lapics:
            if lapic.timer_due is not None and lapic.timer_due < due:
                due = lapic.timer_due
        self._next_due = due

    # --- port I/O ------------------------------------------------------------------
    _PORTS = PIC_PORTS | PIT_PORTS | {PORT_SYSTEM_CONTROL_B}

    def handles_port(self, port: int) -> bool:
        return port in self._PORTS

    def pio_read(self, vcpu_index: int, port: int, size: int) -> int:
        self._check_access(port, size, "port")
        if size == 1 and (port == PORT_SYSTEM_CONTROL_B or port in PIT_PORTS):
            # the calibration loops' hot path: no PIC state, no wakes
            with self._lock:
                return self.pit.read_port(self.clock(), port)
        with self._lock:
            now = self.clock()
            value = 0
            for i in range(size):  # ISA decomposes a wide access into byte accesses
                value |= self._read_port_byte(now, port + i) << (8 * i)
        self._flush_wakes()
        return value

    def pio_write(self, vcpu_index: int, port: int, size: int, value: int) -> None:
        self._check_access(port, size, "port")
        with self._lock:
            now = self.clock()
            for i in range(size):
                self._write_port_byte(now, port + i, (value >> (8 * i)) & 0xFF)
            self._recheck_deadlines()
        self._flush_wakes()

    def _check_access(self, where: int, size: int, kind: str) -> None:
        if size not in (1, 2, 4, 8) or (kind == "port" and size == 8):
            raise IrqchipError(f"{kind} access of {size} bytes at {where:#x}: size must be 1, 2 or 4")
        if kind == "port" and not self.handles_port(where):
            raise IrqchipError(f"port {where:#x} is not an irqchip port")

    def _read_port_byte(self, now: float, port: int) -> int:
        if port in PIC_PORTS:
            before = self.pic.output
            value = self.pic.read_port(port)  # a poll-mode read acknowledges
            if self.pic.output and not before:
                self._notify_pic_receivers()
            return value
        if port in PIT_PORTS or port == PORT_SYSTEM_CONTROL_B:
            return self.pit.read_port(now, port)
        return 0xFF

    def _write_port_byte(self, now: float, port: int, value: int) -> None:
        if port in PIC_PORTS:
            before = self.pic.output
            self.pic.write_port(port, value)
            if self.pic.output and not before:
                self._notify_pic_receivers()
        elif port in PIT_PORTS or port == PORT_SYSTEM_CONTROL_B:
            self.pit.write_port(now, port, value)
            if port in (0x40, 0x43):
                self.timer_changed()

    # --- MMIO ----------------------------------------------------------------------------
    def _refresh_pages(self) -> None:
        self._lapic_pages = frozenset(lapic.page for lapic in self.lapics if lapic.hw_enabled)

    def handles_mmio(self, addr: int) -> bool:
        page = addr & ~(PAGE - 1)
        return page == IOAPIC_DEFAULT_BASE or page in self._lapic_pages

    def mmio_read(self, vcpu_index: int, addr: int, size: int) -> int:
        lapic = self._check_vcpu(vcpu_index)
        self._check_access(addr, size, "MMIO")
        page, offset = addr & ~(PAGE - 1), addr & (PAGE - 1)
        register, byte = offset & ~0xF, offset & 0xF
        with self._lock:
            if page == lapic.page and lapic.hw_enabled:
                value = lapic.read(register, self.clock())
            elif page == IOAPIC_DEFAULT_BASE:
                value = self.ioapic.read(register)
            elif page in self._lapic_pages:
                value = 0  # another vCPU's relocated APIC page: not visible from this vCPU
            else:
                raise IrqchipError(f"MMIO read at {addr:#x} is not an irqchip address")
        # registers are 32 bits wide in 16-byte slots; narrower reads see their bytes
        return (value >> (8 * byte)) & ((1 << (8 * size)) - 1) if byte < 4 else 0

    def mmio_write(self, vcpu_index: int, addr: int, size: int, value: int) -> None:
        lapic = self._check_vcpu(vcpu_index)
        self._check_access(addr, size, "MMIO")
        page, offset = addr & ~(PAGE - 1), addr & (PAGE - 1)
        register, byte = offset & ~0xF, offset & 0xF
        with self._lock:
            if page == lapic.page and lapic.hw_enabled:
                # the SDM leaves non-dword APIC writes undefined: they are dropped
                if byte == 0 and size >= 4:
                    lapic.write(register, value & 0xFFFF_FFFF, self.clock())
                    if register in _UNBLOCKING and lapic.deliverable_vector() >= 0:
                        # an EOI or a lower TPR let a waiting IRR vector through: the guest
                        # takes it at its next instruction boundary with IF set
                        self._wakes.add(vcpu_index)
                    if register not in _NO_DEADLINE_EFFECT:
                        self._recheck_deadlines()
            elif page == IOAPIC_DEFAULT_BASE:
                if byte == 0 and size >= 4:
                    self.ioapic.write(register, value & 0xFFFF_FFFF)
                elif byte + size <= 4:  # a narrow write (IOREGSEL as a byte) merges into the register
                    mask = ((1 << (8 * size)) - 1) << (8 * byte)
                    merged = (self.ioapic.read(register) & ~mask) | ((value << (8 * byte)) & mask)
                    self.ioapic.write(register, merged)
                self._recheck_deadlines()
            elif page not in self._lapic_pages:
                raise IrqchipError(f"MMIO write at {addr:#x} is not an irqchip address")
        self._flush_wakes()

    # --- timers ----------------------------------------------------------------------------
    def poll(self) -> None:
        if self.clock() < self._next_due:  # lock-free fast path: nothing due
            return
        with self._lock:
            now = self.clock()
            edges = self.pit.take_irq0_edges(now)
            if edges:
                absorbed = self._irq0_pending()
                self._pulse_irq0()
                self.pit.owe_irq0_edges(edges - 1 + absorbed)
            for lapic in self.lapics:
                if lapic.timer_expire(now):
                    self._wakes.add(lapic.index)
            self.timer_changed()
        self._flush_wakes()

    def next_deadline(self, vcpu_index: int) -> float | None:
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            due = self._deadline_locked(lapic)
            self._told[vcpu_index] = due
        return None if due == math.inf else due

    def _deadline_locked(self, lapic: LocalApic) -> float:
        due = math.inf
        if lapic.timer_due is not None and not lapic.lvt[LVT_TIMER] & LVT_MASKED:
            due = lapic.timer_due
        pit_due = self.pit.irq0_deadline()
        if pit_due < due and self._receives_irq0(lapic):
            due = pit_due
        return due

    def _recheck_deadlines(self) -> None:
        """After a guest write: wake each vCPU whose next deadline moved earlier than it knew.

        A backend waits (halted, or running until it must stop to ``poll()``) until the
        ``next_deadline`` it last read; a timer programmed, or unmasked, meanwhile by any
        vCPU would otherwise wait for the next unrelated wake-up.
        """
        for lapic in self.lapics:
            due = self._deadline_locked(lapic)
            if due < self._told[lapic.index]:
                self._wakes.add(lapic.index)
            self._told[lapic.index] = due

    def _pulse_irq0(self) -> None:
        pin = ISA_IRQ_TO_IOAPIC_PIN[PIT_IRQ]
        self._set_line_locked(PIT_IRQ, pin, True)
        self._set_line_locked(PIT_IRQ, pin, False)

    def _irq0_vectors(self) -> set[int]:
        """Vectors the IOAPIC sends for IRQ0 (its unmasked edge pins 2 and 0)."""
        vectors = set()
        for pin in (ISA_IRQ_TO_IOAPIC_PIN[PIT_IRQ], PIT_IDENTITY_PIN):
            message = self.ioapic.pin_targets(pin)
            if message is not None and not message.level and message.delivery_mode in (DM_FIXED, DM_LOWEST):
                vectors.add(message.vector)
        return vectors

    def _irq0_pending(self) -> bool:
        """Is an earlier IRQ0 still waiting to be taken (so a new edge would merge into it)?"""
        if self.pic.master.irr & 1 and not self.pic.master.imr & 1:
            return True
        return any(lapic.irr >> vector & 1 for vector in self._irq0_vectors() for lapic in self.lapics)

    def _receives_irq0(self, lapic: LocalApic) -> bool:
        if lapic.accepts_pic() and not self.pic.master.imr & 1:
            return True
        for pin in (ISA_IRQ_TO_IOAPIC_PIN[PIT_IRQ], PIT_IDENTITY_PIN):
            message = self.ioapic.pin_targets(pin)
            if message is not None and lapic.matches(message.logical, message.destination):
                return True
        return False

    # --- interrupt acknowledge -----------------------------------------------------
    def has_interrupt(self, vcpu_index: int) -> bool:
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            if lapic.deliverable_vector() >= 0:
                return True
            return self.pic.output and (lapic.extint_pending or lapic.accepts_pic())

    def ack_interrupt(self, vcpu_index: int) -> int | None:
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            vector = lapic.acknowledge()
            irq0 = vector is not None and self.pit.irq0_backlog and vector in self._irq0_vectors()
            if vector is None and self.pic.output and (lapic.extint_pending or lapic.accepts_pic()):
                lapic.extint_pending = False
                vector = self.pic.acknowledge()
                irq0 = self.pic.last_irq == PIT_IRQ
            if irq0 and self.pit.take_owed_irq0_edge():
                self._pulse_irq0()  # an owed tick, taken after this one's EOI
        self._flush_wakes()
        return vector

    def has_nmi(self, vcpu_index: int) -> bool:
        return self._check_vcpu(vcpu_index).nmi_pending

    def ack_nmi(self, vcpu_index: int) -> bool:
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            pending, lapic.nmi_pending = lapic.nmi_pending, False
        return pending

    def take_init_sipi(self, vcpu_index: int) -> list[tuple[str, int]]:
        """INIT and SIPI events for this vCPU, oldest first.

        Only the first SIPI after an INIT (or after power-on for an AP) is reported:
        a CPU that left wait-for-SIPI ignores further SIPIs, as on hardware.
        """
        self._check_vcpu(vcpu_index)
        with self._lock:
            events, self._init_sipi[vcpu_index] = self._init_sipi[vcpu_index], []
        return events

    # --- IA32_TSC_DEADLINE -----------------------------------------------------------
    def get_tsc_deadline(self, vcpu_index: int) -> int:
        lapic = self._check_vcpu(vcpu_index)
        return lapic.tsc_deadline if lapic.tsc_deadline_mode else 0

    def set_tsc_deadline(self, vcpu_index: int, value: int, due: float | None) -> None:
        """WRMSR IA32_TSC_DEADLINE: ``due`` is the clock time the backend's TSC reaches ``value``."""
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            lapic.set_tsc_deadline(value, due)
            self._recheck_deadlines()
        self._flush_wakes()

    # --- CR8 (the task priority) ------------------------------------------------------
    def get_tpr(self, vcpu_index: int) -> int:
        """The local APIC's TPR, which MOV from CR8 reads as TPR[7:4]."""
        return self._check_vcpu(vcpu_index).tpr

    def set_tpr(self, vcpu_index: int, value: int) -> None:
        """MOV to CR8 (TPR = CR8 << 4): a lower priority may let a waiting vector through."""
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            lapic.tpr = value & 0xFF
            if lapic.hw_enabled and lapic.deliverable_vector() >= 0:
                self._wakes.add(vcpu_index)
        self._flush_wakes()

    # --- IA32_APIC_BASE ------------------------------------------------------------
    def get_apic_base(self, vcpu_index: int) -> int:
        return self._check_vcpu(vcpu_index).base

    def set_apic_base(self, vcpu_index: int, value: int) -> None:
        """WRMSR 0x1B: base address and global enable; the BSP flag is read-only, x2APIC is not offered."""
        lapic = self._check_vcpu(vcpu_index)
        with self._lock:
            bsp = APIC_BASE_BSP if vcpu_index == 0 else 0
            was_enabled = lapic.hw_enabled
            lapic.base = (value & (APIC_BASE_ADDRESS_MASK | APIC_BASE_ENABLE)) | bsp
            if was_enabled and not lapic.hw_enabled:
                # a global disable resets the APIC; re-enabling leaves it software-disabled
                lapic.reset()
                self.timer_changed()
            self._refresh_pages()
            self._recheck_deadlines()
        self._flush_wakes()
