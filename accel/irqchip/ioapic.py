"""The 82093AA I/O APIC: 24 pins, IOREGSEL/IOWIN, redirection table.

Sans-IO and lock-free: the owning ``Irqchip`` serialises calls and supplies
``deliver(message) -> bool`` (True when at least one local APIC accepted it).

Pin inputs are logical assertion levels (True = asserted): the polarity bit is
stored and read back but not applied, as in KVM's and QEMU's models, so the MP
table must describe every pin the way pyvmm's devices drive it (asserted = high).
Edge pins deliver on a rising edge while unmasked (an edge on a masked pin is
dropped, per the datasheet). Level pins deliver while asserted and unmasked with
Remote IRR clear; Remote IRR is set when a local APIC accepts the message and
cleared by the broadcast EOI for its vector, which re-delivers a still-asserted pin.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

IOAPIC_VERSION = 0x00170011  # version 0x11, 24 redirection entries (max index 0x17)
IOAPIC_PIN_COUNT = 24
IOREGSEL, IOWIN = 0x00, 0x10

DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
RTE_MASK = 1 << 16
RTE_LEVEL = 1 << 15
RTE_REMOTE_IRR = 1 << 14
RTE_DELIVERY_STATUS = 1 << 12
# writable bits of the low half: vector, delivery mode, dest mode, polarity, trigger, mask
RTE_WRITABLE_LOW = 0xFF | 0x700 | 0x800 | 0x2000 | RTE_LEVEL | RTE_MASK


class ApicMessage(NamedTuple):
    """An interrupt message on the APIC bus (from the IOAPIC or an ICR write)."""

    vector: int
    delivery_mode: int  # DM_*
    logical: bool  # destination mode
    destination: int  # 8-bit APIC ID or logical destination
    level: bool  # trigger mode (sets TMR; the EOI is broadcast to the IOAPIC)
    shorthand: int = 0  # ICR only: 0 none, 1 self, 2 all including self, 3 all excluding self
    source: int = -1  # the sending vCPU for shorthands


class IoApic:
    def __init__(self, deliver: Callable[[ApicMessage], bool]):
        self._deliver = deliver
        self.id = 0
        self.select = 0
        self.redirection = [RTE_MASK] * IOAPIC_PIN_COUNT  # 64-bit entries
        self.inputs = 0  # asserted pins

    # --- pins ------------------------------------------------------------------
    def set_pin(self, pin: int, level: bool) -> None:
        mask = 1 << pin
        was = bool(self.inputs & mask)
        if level:
            self.inputs |= mask
        else:
            self.inputs &= ~mask
        entry = self.redirection[pin]
        if entry & RTE_LEVEL:
            if level:
                self._service(pin)
        elif level and not was:
            self._service(pin)

    def _service(self, pin: int) -> None:
        entry = self.redirection[pin]
        if entry & RTE_MASK:
            return
        level = bool(entry & RTE_LEVEL)
        if level and entry & RTE_REMOTE_IRR:
            return  # the previous level interrupt is still in service
        message = ApicMessage(
            vector=entry & 0xFF,
            delivery_mode=(entry >> 8) & 7,
            logical=bool(entry & 0x800),
            destination=(entry >> 56) & 0xFF,
            level=level,
        )
        accepted = self._deliver(message)
        if level and accepted and message.delivery_mode in (DM_FIXED, DM_LOWEST):
            self.redirection[pin] |= RTE_REMOTE_IRR

    def eoi(self, vector: int) -> None:
        """A local APIC's broadcast EOI for a level-triggered ``vector``."""
        for pin, entry in enumerate(self.redirection):
            if entry & 0xFF == vector and entry & RTE_REMOTE_IRR:
                self.redirection[pin] = entry & ~RTE_REMOTE_IRR
                if entry & RTE_LEVEL and self.inputs & (1 << pin):
                    self._service(pin)

    def pin_targets(self, pin: int) -> ApicMessage | None:
        """The message an unmasked ``pin`` would send (for deadline routing), or None."""
        entry = self.redirection[pin]
        if entry & RTE_MASK:
            return None
        return ApicMessage(entry & 0xFF, (entry >> 8) & 7, bool(entry & 0x800), (entry >> 56) & 0xFF, bool(entry & RTE_LEVEL))

    # --- guest access --------------------------------------------------------
    def read(self, offset: int) -> int:
        """A 32-bit read of IOREGSEL or IOWIN (other offsets read 0)."""
        if offset == IOREGSEL:
            return self.select
        if offset != IOWIN:
            return 0
        index = self.select
        if index == 0x00:
            return self.id << 24
        if index == 0x01:
            return IOAPIC_VERSION
        if index == 0x02:
            return self.id << 24  # arbitration ID
        if 0x10 <= index < 0x10 + 2 * IOAPIC_PIN_COUNT:
            entry = self.redirection[(index - 0x10) >> 1]
            return (entry >> 32) & 0xFFFFFFFF if index & 1 else entry & 0xFFFFFFFF
        return 0

    def write(self, offset: int, value: int) -> None:
        if offset == IOREGSEL:
            self.select = value & 0xFF
            return
        if offset != IOWIN:
            return
        index = self.select
        if index == 0x00:
            self.id = (value >> 24) & 0x0F
        elif 0x10 <= index < 0x10 + 2 * IOAPIC_PIN_COUNT:
            pin = (index - 0x10) >> 1
            entry = self.redirection[pin]
            if index & 1:
                entry = (entry & 0xFFFFFFFF) | (value & 0xFF000000) << 32
            else:
                entry = (entry & ~RTE_WRITABLE_LOW) | (value & RTE_WRITABLE_LOW)
                if not entry & RTE_LEVEL:
                    entry &= ~RTE_REMOTE_IRR  # Remote IRR is undefined for edge pins: keep it clear
            self.redirection[pin] = entry
            # unmasking (or re-routing) a still-asserted level pin delivers it now
            if entry & RTE_LEVEL and self.inputs & (1 << pin):
                self._service(pin)
