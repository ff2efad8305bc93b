"""How a device raises an interrupt without knowing which backend runs.

The builder hands each device an ``IrqLine`` bound to the VM-level
``set_irq_line`` (KVM: KVM_IRQ_LINE or irqfd; interpreter: the userspace
IOAPIC/PIC). Devices only ever see this object.
"""

from __future__ import annotations

from typing import Callable


class IrqLine:
    __slots__ = ("irq", "_set", "level")

    def __init__(self, irq: int, set_line: Callable[[int, bool], None]):
        self.irq = irq
        self._set = set_line
        self.level = False

    def set_level(self, level: bool) -> None:
        """Level-triggered sources (the UART) call this whenever their condition changes."""
        level = bool(level)
        if level != self.level:
            self.level = level
            self._set(self.irq, level)

    def resync(self, level: bool) -> None:
        """Send ``level`` even where this object believes the line is there already. After a restore
        the line object is new (it believes the line low) while the interrupt controller comes back
        with the saved input: a "low" never sent would leave that input high, and the next rising
        edge (an edge-triggered IOAPIC pin) would be lost."""
        self.level = not level
        self.set_level(level)

    def pulse(self) -> None:
        """Edge-triggered sources: raise then lower."""
        self._set(self.irq, True)
        self._set(self.irq, False)
        self.level = False


class NullIrqLine(IrqLine):
    """A line connected to nothing (tests, or a device whose IRQ is unused)."""

    def __init__(self, irq: int = -1):
        super().__init__(irq, lambda irq, level: None)
