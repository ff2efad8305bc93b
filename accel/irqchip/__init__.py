"""Userspace LAPIC, IOAPIC, 8259 PIC pair and 8254 PIT for backends without in-kernel ones."""

from pyvmm.accel.irqchip.chip import (
    IOAPIC_DEFAULT_BASE,
    IOAPIC_PIN_OF_IRQ,
    ISA_IRQ_TO_IOAPIC_PIN,
    LAPIC_DEFAULT_BASE,
    LAPIC_TIMER_HZ,
    PIT_HZ,
    PIT_IDENTITY_PIN,
    Irqchip,
    IrqchipError,
)
from pyvmm.accel.irqchip.ioapic import IOAPIC_VERSION
from pyvmm.accel.irqchip.lapic import LAPIC_VERSION
from pyvmm.accel.irqchip.timebase import monotonic_raw, tsc_cpuid_leaves

__all__ = [
    "Irqchip", "IrqchipError", "ISA_IRQ_TO_IOAPIC_PIN", "IOAPIC_PIN_OF_IRQ", "IOAPIC_DEFAULT_BASE",
    "LAPIC_DEFAULT_BASE", "LAPIC_TIMER_HZ", "PIT_HZ", "PIT_IDENTITY_PIN", "IOAPIC_VERSION", "LAPIC_VERSION",
    "monotonic_raw", "tsc_cpuid_leaves",
]
